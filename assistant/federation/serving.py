"""`ember federate serve`: the household's server as real processes. Flower's SuperLink on the given
address with TLS and SuperNode authentication (only the registered keys are admitted), and the household's
run started through its Control API (`StartRun`, what `flwr run` sends) with a FAB built from two files
whose components are `deployed.py`'s ServerApp and ClientApp, signed with the household's app-signing key
(`signing.py`). The signed FAB is stored in the SuperLink's own state (its SQLite database, through
Flower's `LinkState.store_app`) before the SuperLink starts, and the run is started from that stored app,
the one path on which Flower 1.42's SuperLink hands the SuperNodes a FAB with its verifications. The
SuperLink launches no ServerApp itself (`--isolation process`, its Runtime API's task queue guarded by
`--superexec-auth-secret-file`): `launcher.py` launches the household's run and refuses any other, so a
run someone else starts through the Control API runs no code on this machine. Process handling is
`processes.py`'s.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from adapters.base import write_private
from assistant.config import Settings
from assistant.federation import credentials, signing
from assistant.federation.plan import Household
from assistant.federation.processes import (ServerStopped, child_env, command, control_client, credential, joined,
                                            last_line, parse_address, public_keys, start, stop)
from storage.errors import EmberError, InvalidInput
from storage.private import private_dirs


APP_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "ember-household"
version = "1.0.0"
description = "Ember household learning: the ServerApp and ClientApp of assistant/federation"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "ember"

[tool.flwr.app.components]
serverapp = "ember_household:server"
clientapp = "ember_household:client"

[tool.flwr.app.config]
household = ""
devices = 1
model = ""
timeout = 3600.0
outcome = ""
nodes = ""
"""

APP_MODULE = '''"""Ember household learning: the apps live in Ember itself (assistant/federation/deployed.py)."""
from assistant.federation.deployed import client, server  # noqa: F401
'''


APP_ID = "@ember/ember-household"      # f"@{publisher}/{name}", as the SuperLink derives it from the FAB


def flower_app(folder: Path) -> tuple[bytes, str]:
    """The household's Flower App as a FAB (bytes, SHA-256), built with Flower's own builder from a two-file
    app whose components are Ember's ServerApp and ClientApp."""
    from flwr.cli.build import build_fab_from_disk

    private_dirs(folder)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT)
    (folder / "ember_household.py").write_text(APP_MODULE)
    fab = build_fab_from_disk(folder)
    return fab, hashlib.sha256(fab).hexdigest()


def store_signed_app(database: Path, fab: bytes, verifications: dict[str, str]) -> str:
    """Put the signed FAB, with its verifications, into the SuperLink state at `database` as the app
    `APP_ID` of Flower's default federation (what the SuperLink's AddApp does with a Hub app); its hash."""
    from flwr.common.constant import NOOP_FLWR_AID
    from flwr.supercore.constant import NOOP_FEDERATION_ID, TaskType
    from flwr.supercore.fab import Fab
    from flwr.superlink.config_loader import get_federation_manager, get_objectstore_linkstate_factories

    os.close(os.open(database, os.O_CREAT | os.O_WRONLY, 0o600))     # an empty file is an empty database; 0600
    _, factory = get_objectstore_linkstate_factories(str(database), get_federation_manager())
    fab_hash = hashlib.sha256(fab).hexdigest()
    factory.state().store_app(fab=Fab(fab_hash, fab, verifications), federation_id=NOOP_FEDERATION_ID,
                              app_id=APP_ID, app_type=TaskType.SERVER_APP, added_by=NOOP_FLWR_AID)
    return fab_hash


@dataclasses.dataclass
class ServeResult:
    """What `ember federate serve` reports."""

    address: str
    run_id: int
    kind: str
    rounds: int
    devices: int
    status: str
    outcome: dict[str, Any]
    seconds: float
    refused_runs: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _wait_listening(host: str, port: int, process: subprocess.Popen, log: Path, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerStopped(f"the SuperLink did not start on {joined(host, port)}: {last_line(log)}")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise ServerStopped(f"the SuperLink did not listen on {joined(host, port)} within {timeout:.0f} s: {last_line(log)}")


def serve(settings: Settings, plan: Household, *, address: str, devices: int, authorized: Sequence[Path],
          timeout: float = 3600.0, on_event: Callable[[str], None] | None = None) -> ServeResult:
    """Run the household's server for one run of `plan.rounds` rounds over `devices` devices: a SuperLink
    on `address` with TLS and SuperNode authentication (only the keys in `authorized` are admitted), and
    the household's ServerApp; returns when the run ends (the SuperLink is stopped then)."""
    say = on_event or (lambda _line: None)
    host, port = parse_address(address)
    link_address = joined(host, port)
    ca, cert, key = (credential(settings, name) for name in ("ca.pem", "superlink.pem", "superlink.key"))
    signer = signing.load_private(credential(settings, signing.PRIVATE))
    if not authorized:
        raise InvalidInput("no device may join: pass each device's supernode.pub with --authorized-key")
    keys = public_keys(authorized)
    superlink = command("flower-superlink")
    _check_bindable(host, port)
    work = credentials.folder(settings.home) / "serve"
    private_dirs(work)
    log = work / "superlink.log"
    _remove_stale(work)
    stamp = f"{os.getpid()}-{int(time.time())}"
    outcome_path = work / f"outcome-{stamp}.json"
    # A fresh state per serve: a restarted server forgets the old run and its nodes, as before.
    database = work / f"superlink-{stamp}.db"
    fab, _ = flower_app(work / "app")
    fab_hash = store_signed_app(database, fab, signing.verifications(fab, signer))
    secret = work / f"superexec-{stamp}.secret"      # only this server's launcher may take ServerApp tasks
    write_private(secret, os.urandom(32))
    env = child_env(settings, work / "flwr")
    began = time.monotonic()
    process = start([superlink, "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                     "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                     "--isolation", "process", "--superexec-auth-secret-file", str(secret),
                     "--database", str(database), "--host", host, "--port", str(port)], env, log)
    launcher = Launcher(work / "launcher.log", env, link_address, ca, secret, fab_hash)
    # Its group is its own: the pid lets anyone stop it whole (the launcher and the ServerApp follow `serve`).
    (work / "superlink.pid").write_text(f"{process.pid}\n")
    try:
        _wait_listening(host, port, process, log, timeout=60)
        client = control_client(link_address, ca)
        try:
            status, run_id = _run(client, keys, launcher, plan, settings, devices, timeout, outcome_path, process,
                                  log, link_address, say)
        except EmberError:
            raise
        except Exception as err:   # the Control API failed: Flower's client errors, as one line
            raise ServerStopped(f"the SuperLink on {link_address} did not answer its Control API "
                                f"({type(err).__name__}: {str(err)[:200]}); see {log}") from err
        finally:
            client.close()
    finally:
        stop(launcher.process)          # and the ServerApp, its child, with it
        stop(process)
        for path in (secret, *(Path(f"{database}{suffix}") for suffix in ("", "-wal", "-shm", "-journal"))):
            path.unlink(missing_ok=True)
    outcome = json.loads(outcome_path.read_text()) if outcome_path.is_file() else {}
    outcome_path.unlink(missing_ok=True)
    if status != "completed" or not outcome.get("finished"):
        raise ServerStopped(f"the household's run {run_id} ended {status}: "
                            f"{outcome.get('error') or last_line(log)}")
    return ServeResult(link_address, run_id, plan.kind, plan.rounds, devices, status, outcome,
                       round(time.monotonic() - began, 1), launcher.refused())


def _remove_stale(work: Path) -> None:
    """The SuperLink state and Runtime secret a killed `serve` left behind (its pid is in their names)."""
    for path in [*work.glob("superlink-*.db*"), *work.glob("superexec-*.secret")]:
        pid = path.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            path.unlink(missing_ok=True)


def _check_bindable(host: str, port: int) -> None:
    """`InvalidInput` when the SuperLink could not listen on (host, port): in use, or not this machine's."""
    import errno

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except socket.gaierror:
        raise InvalidInput(f"bad address {joined(host, port)}: {host} is not a name this machine resolves") from None
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise InvalidInput(f"{joined(host, port)} is in use (another `ember federate serve`?); "
                               "pick another --address port") from None
        raise InvalidInput(f"cannot listen on {joined(host, port)} ({err.strerror}); give an address of this "
                           "machine") from None


class Launcher:
    """`launcher.py` as a process of its own, for the household's run."""

    def __init__(self, log: Path, env: dict[str, str], address: str, ca: Path, secret: Path, fab_hash: str) -> None:
        self.log, self.env, self.fab_hash = log, env, fab_hash
        self.args = [address, str(ca), str(secret)]
        self.offset = log.stat().st_size if log.is_file() else 0
        self.process: subprocess.Popen | None = None

    def start(self, run_id: int) -> None:
        """Launch the ServerApp of run `run_id` (of the signed FAB) once the SuperLink queues it."""
        self.process = start([sys.executable, "-m", "assistant.federation.launcher", *self.args, str(run_id),
                              self.fab_hash, str(os.getpid())], self.env, self.log)

    def failed(self) -> str | None:
        """What went wrong, when the launcher stopped before launching the household's run."""
        if self.process is None or self.process.poll() is None:
            return None
        return last_line(self.log) or f"the launcher exited with {self.process.returncode}"

    def refused(self) -> list[dict[str, Any]]:
        """The runs the launcher refused to launch: `[{run, reason}]`."""
        from assistant.federation.launcher import REFUSED

        try:
            with open(self.log, "rb") as f:
                f.seek(self.offset)
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return []
        found = []
        for line in lines:
            if line.startswith(REFUSED):
                run, _, reason = line[len(REFUSED):].strip().partition(": ")
                found.append({"run": int(run), "reason": reason})
        return found


def _run(client: Any, keys: list[bytes], launcher: Launcher, plan: Household, settings: Settings, devices: int,
         timeout: float, outcome_path: Path, process: subprocess.Popen, log: Path, link_address: str,
         say: Callable[[str], None]) -> tuple[str, int]:
    """Register the devices' keys, start the household's run of the stored signed app through the Control
    API (a FAB with a hash and no content: the SuperLink takes the stored FAB and its verifications), wait
    for its end."""
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import (  # pylint: disable=no-name-in-module
        ListRunsRequest, RegisterNodeRequest, StartRunRequest)
    from flwr.supercore.fab import Fab

    nodes = [int(client.RegisterNode(RegisterNodeRequest(public_key=public_key)).node_id) for public_key in keys]
    config = {"household": json.dumps(plan.config()), "devices": int(devices),
              "model": str(settings.model_path), "timeout": float(timeout), "outcome": str(outcome_path),
              "nodes": ",".join(str(node) for node in nodes)}
    fab_hash = launcher.fab_hash
    response = client.StartRun(StartRunRequest(fab=fab_to_proto(Fab(fab_hash, b"", {})), app_spec=APP_ID,
                                               override_config=user_config_to_proto(config)))
    run_id = int(response.run_id)
    launcher.start(run_id)
    say(f"SuperLink on {link_address} (TLS, {len(keys)} authorized SuperNode key(s)); run {run_id} of the "
        f"signed app {fab_hash[:12]}: "
        f"{plan.rounds} {plan.kind} round(s) over {devices} device(s)")
    return _wait_run(client, run_id, process, log, ListRunsRequest, launcher), run_id


def _wait_run(client: Any, run_id: int, process: subprocess.Popen, log: Path, request: Any,
              launcher: Launcher) -> str:
    """Poll the Control API until the run is finished; its sub-status (completed, failed, stopped)."""
    while True:
        if process.poll() is not None:
            raise ServerStopped(f"the SuperLink stopped during run {run_id}: {last_line(log)}")
        if (why := launcher.failed()):
            raise ServerStopped(f"the household's ServerApp could not be launched for run {run_id}: {why}")
        run = client.ListRuns(request(run_id=run_id)).run_dict[run_id]
        if run.status.status == "finished":
            return str(run.status.sub_status)
        time.sleep(1.0)
