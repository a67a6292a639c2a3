"""Household learning across real processes: `ember federate serve` runs Flower's SuperLink and hands it
the household's Flower App (a FAB of `deployed.py`); `ember federate join ADDRESS` runs this device's
SuperNode, whose `flwr-clientapp` processes train through the one learning path and gate the global
update (`client.py`, the same code as the in-process rounds).

Flower 1.42's deployment runtime (flwr/superlink/cli/flower_superlink.py, flwr/supernode/cli/
flower_supernode.py): the SuperLink serves its Fleet, Control and Runtime APIs over HTTPS on one address
(`--host/--port`, TLS from `--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`); with
`--enable-supernode-auth` it admits only SuperNodes whose EC public key was registered through the
Control API (`RegisterNode`, what `flwr supernode register` sends); a SuperNode verifies the SuperLink
with `--root-certificates` and signs its requests with `--auth-supernode-private-key`. A run starts with
the Control API's `StartRun` (what `flwr run` sends). Runtime dependency installation is off everywhere:
these machines install nothing at run time. Every Flower file goes under `<data dir>/federation/`
(`FLWR_HOME`), never the user's home.
"""
from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from adapters.errors import TrainingUnavailable
from assistant.config import Settings
from assistant.federation import credentials
from assistant.federation.plan import Household
from storage.errors import EmberError, InvalidInput

DEFAULT_PORT = 9092
LOOPBACK = "127.0.0.1"
ACTIVATED = "SuperNode ID:"      # what Flower's SuperNode logs once the SuperLink has admitted it
INSTALL = "household learning needs Flower: pip install -e '.[federated]'"


class NoCredentials(EmberError):
    """This device has no household credentials (TLS certificates, SuperNode key)."""


class Unreachable(EmberError):
    """The household's SuperLink cannot be reached, or went away and did not come back in time."""


class NotAuthorized(EmberError):
    """The SuperLink refused this device's SuperNode key."""


class ServerStopped(EmberError):
    """The SuperLink or the household's ServerApp stopped before the run finished."""


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:PORT; the port defaults to 9092) → (host, port); `InvalidInput` when bad."""
    bad = InvalidInput(f"bad address {text!r}: give HOST:PORT, e.g. 192.168.1.5:{DEFAULT_PORT}")
    text = text.strip()
    if not text or any(c.isspace() for c in text) or "://" in text or "/" in text:
        raise bad
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ("" if closed and not rest else None)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        host, port_text = text, ""                      # a bare IPv6 address
    else:
        host, port_text = text, ""
    if port_text is None or not host:
        raise bad
    try:
        port = int(port_text) if port_text else DEFAULT_PORT
    except ValueError:
        raise bad from None
    if not 0 < port < 65536:
        raise bad
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not all(part and (part.isalnum() or set(part) <= set("abcdefghijklmnopqrstuvwxyz0123456789-"))
                   for part in host.lower().split(".")):
            raise bad from None
    return host, port


def joined(host: str, port: int) -> str:
    """(host, port) → HOST:PORT as Flower takes it ([v6]:PORT)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def command(name: str) -> str:
    """The path of one of Flower's commands installed next to this Python, or `TrainingUnavailable`."""
    import shutil

    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if not found:
        raise TrainingUnavailable(INSTALL)
    return found


def child_env(settings: Settings, flwr_home: Path) -> dict[str, str]:
    """The environment of Flower's processes: Flower's commands and Ember importable (the FAB imports it),
    Flower's files in this device's data directory, no runtime installation."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["EMBER_HOME"] = str(settings.home)
    return env


def credential(settings: Settings, name: str, override: Path | None = None) -> Path:
    """A credential file of this device (or `override`), or `NoCredentials` saying what to run."""
    path = Path(override) if override else credentials.folder(settings.home) / name
    if not path.is_file():
        if override:
            raise NoCredentials(f"{path} does not exist")
        raise NoCredentials(f"this device has no household credentials ({name} is missing); "
                            "run `ember federate init` first")
    return path


def public_keys(files: Sequence[Path]) -> list[bytes]:
    """The SuperNode public keys in `files` (OpenSSH lines, `supernode.pub` as `ember federate init` makes
    it), as Flower's Control API takes them; `InvalidInput` for a file that holds none or a bad one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    keys = []
    for path in files:
        try:
            lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise InvalidInput(f"cannot read the SuperNode key {path}: {err}") from err
        if not lines:
            raise InvalidInput(f"{path} holds no SuperNode public key")
        for line in lines:
            try:
                key = serialization.load_ssh_public_key(line.encode())
            except (ValueError, TypeError) as err:
                raise InvalidInput(f"{path} is not a SuperNode public key (supernode.pub): {err}") from err
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise InvalidInput(f"{path} is not an EC public key; use the supernode.pub `ember federate init` made")
            keys.append(public_key_to_bytes(key))
    return keys


def free_port() -> int:
    """A free TCP port on loopback (for a SuperNode's local Runtime API)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def check_reachable(host: str, port: int, ca: Path, *, timeout: float = 5.0) -> None:
    """A TLS handshake with the SuperLink, verified against `ca`: `Unreachable` when nothing answers,
    `InvalidInput` when what answers is not the household's SuperLink (wrong CA or name)."""
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host):
                return
    except ssl.SSLCertVerificationError as err:
        raise InvalidInput(f"the server at {joined(host, port)} is not this household's SuperLink "
                           f"({err.verify_message}); pass the server's ca.pem with --ca") from None
    except ssl.SSLError as err:
        raise Unreachable(f"no TLS SuperLink at {joined(host, port)} ({err.reason or err}); "
                          "is `ember federate serve` running there?") from None
    except OSError as err:
        raise Unreachable(f"cannot reach the household's SuperLink at {joined(host, port)} "
                          f"({err.strerror or err}); is `ember federate serve` running there?") from None


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start one of Flower's processes in its own process group, its output to `log` (0600). A SIGTERM to
    this process then stops it as Ctrl-C does, so Flower's processes are stopped with it."""
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    fd = os.open(log, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
    try:
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        os.close(fd)


def stop(process: subprocess.Popen | None, *, grace: float = 10.0) -> None:
    """SIGTERM to the process's group (Flower's SuperExec and app processes with it), SIGKILL after `grace`."""
    if process is None or process.poll() is not None and not _group_alive(process.pid):
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + wait
        while _group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _group_alive(process.pid):
            return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def last_line(log: Path, *, containing: Sequence[str] = ("ERROR", "Error", "error")) -> str:
    """The last log line that mentions an error (else the last line), without colour codes."""
    import re

    try:
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [line for line in lines if line]
    marked = [line for line in lines if any(word in line for word in containing)]
    return (marked or lines or [""])[-1][:300]


def control_client(address: str, ca: Path) -> Any:
    """A client of the SuperLink's Control API over HTTPS, verified against `ca`."""
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

    return ControlHttpClient.from_server_address(address, insecure=False, root_certificates=str(ca),
                                                 interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")])


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
"""

APP_MODULE = '''"""Ember household learning: the apps live in Ember itself (assistant/federation/deployed.py)."""
from assistant.federation.deployed import client, server  # noqa: F401
'''


def flower_app(folder: Path) -> tuple[bytes, str]:
    """The household's Flower App as a FAB (bytes, SHA-256), built with Flower's own builder from a two-file
    app whose components are Ember's ServerApp and ClientApp."""
    from flwr.cli.build import build_fab_from_disk

    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT)
    (folder / "ember_household.py").write_text(APP_MODULE)
    fab = build_fab_from_disk(folder)
    return fab, hashlib.sha256(fab).hexdigest()


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
    if not authorized:
        raise InvalidInput("no device may join: pass each device's supernode.pub with --authorized-key")
    keys = public_keys(authorized)
    superlink = command("flower-superlink")
    _check_bindable(host, port)
    work = credentials.folder(settings.home) / "serve"
    work.mkdir(parents=True, exist_ok=True, mode=0o700)
    log = work / "superlink.log"
    outcome_path = work / f"outcome-{os.getpid()}-{int(time.time())}.json"
    env = child_env(settings, work / "flwr")
    began = time.monotonic()
    process = start([superlink, "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                     "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                     "--host", host, "--port", str(port)], env, log)
    # Its group is its own (SuperExec and the ServerApp run in it): the pid lets anyone stop it whole.
    (work / "superlink.pid").write_text(f"{process.pid}\n")
    try:
        _wait_listening(host, port, process, log, timeout=60)
        client = control_client(link_address, ca)
        try:
            status, run_id = _run(client, keys, work, plan, settings, devices, timeout, outcome_path, process, log,
                                  link_address, say)
        except EmberError:
            raise
        except Exception as err:   # the Control API failed: Flower's client errors, as one line
            raise ServerStopped(f"the SuperLink on {link_address} did not answer its Control API "
                                f"({type(err).__name__}: {str(err)[:200]}); see {log}") from err
        finally:
            client.close()
    finally:
        stop(process)
    outcome = json.loads(outcome_path.read_text()) if outcome_path.is_file() else {}
    outcome_path.unlink(missing_ok=True)
    if status != "completed" or not outcome.get("finished"):
        raise ServerStopped(f"the household's run {run_id} ended {status}: "
                            f"{outcome.get('error') or last_line(log)}")
    return ServeResult(link_address, run_id, plan.kind, plan.rounds, devices, status, outcome,
                       round(time.monotonic() - began, 1))


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


def _run(client: Any, keys: list[bytes], work: Path, plan: Household, settings: Settings, devices: int,
         timeout: float, outcome_path: Path, process: subprocess.Popen, log: Path, link_address: str,
         say: Callable[[str], None]) -> tuple[str, int]:
    """Register the devices' keys, start the household's run through the Control API, wait for its end."""
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import (  # pylint: disable=no-name-in-module
        ListRunsRequest, RegisterNodeRequest, StartRunRequest)
    from flwr.supercore.fab import Fab

    for public_key in keys:
        client.RegisterNode(RegisterNodeRequest(public_key=public_key))
    fab, fab_hash = flower_app(work / "app")
    config = {"household": json.dumps(plan.config()), "devices": int(devices),
              "model": str(settings.model_path), "timeout": float(timeout), "outcome": str(outcome_path)}
    response = client.StartRun(StartRunRequest(fab=fab_to_proto(Fab(fab_hash, fab, {})),
                                               override_config=user_config_to_proto(config)))
    run_id = int(response.run_id)
    say(f"SuperLink on {link_address} (TLS, {len(keys)} authorized SuperNode key(s)); run {run_id}: "
        f"{plan.rounds} {plan.kind} round(s) over {devices} device(s)")
    return _wait_run(client, run_id, process, log, ListRunsRequest), run_id


def _wait_run(client: Any, run_id: int, process: subprocess.Popen, log: Path, request: Any) -> str:
    """Poll the Control API until the run is finished; its sub-status (completed, failed, stopped)."""
    while True:
        if process.poll() is not None:
            raise ServerStopped(f"the SuperLink stopped during run {run_id}: {last_line(log)}")
        run = client.ListRuns(request(run_id=run_id)).run_dict[run_id]
        if run.status.status == "finished":
            return str(run.status.sub_status)
        time.sleep(1.0)


@dataclasses.dataclass
class JoinResult:
    """What `ember federate join` reports: this device's rows of the run it took part in."""

    address: str
    rounds: list[dict[str, Any]]
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def join(settings: Settings, db: Any, *, address: str, ca: Path | None = None, max_wait: float = 120.0,
         on_event: Callable[[str], None] | None = None) -> JoinResult:
    """Run this device's SuperNode against the household's SuperLink at `address` until the household's
    run has done its last round here (its gate's verdict recorded and the reply delivered). A SuperLink
    that goes away is waited for up to `max_wait` seconds (Flower's SuperNode reconnects), then
    `Unreachable`; nothing local is lost either way."""
    from storage import federation as rounds

    say = on_event or (lambda _line: None)
    host, port = parse_address(address)
    link_address = joined(host, port)
    key = credential(settings, "supernode.key")
    ca = credential(settings, "ca.pem", ca)
    supernode = command("flower-supernode")
    check_reachable(host, port, ca)
    work = credentials.folder(settings.home) / "join"
    work.mkdir(parents=True, exist_ok=True, mode=0o700)
    log = work / "supernode.log"
    offset = log.stat().st_size if log.is_file() else 0
    node_config = " ".join(f"{k}={json.dumps(v)}" for k, v in
                           {"ember-home": str(settings.home), "model": str(settings.model_path),
                            "server": link_address}.items())
    first = rounds.latest_id(db)
    began = time.monotonic()
    argv = [supernode, "--superlink", link_address, "--root-certificates", str(ca), "--auth-supernode-private-key",
            str(key), "--max-wait-time", str(max_wait), "--port", str(free_port()), "--node-config", node_config]
    env = child_env(settings, work / "flwr")
    process = start(argv, env, log)
    say(f"SuperNode started for the household at {link_address}; waiting for rounds")
    connected, lost_since, done_at = False, None, None
    try:
        while True:
            rows = [r for r in rounds.since(db, first) if r["server"] == link_address]
            final = [r for r in rows if r["rounds"] and r["round"] >= r["rounds"]
                     and (r["phase"] == "evaluate" or r["status"] == "refused")]
            if final and done_at is None:
                done_at = time.monotonic()
            if done_at is not None and (_run_over(link_address, ca) or time.monotonic() - done_at > 60):
                return JoinResult(link_address, rows, round(time.monotonic() - began, 1))
            text = _new_log(log, offset) if process.poll() is not None or lost_since is not None else ""
            if process.poll() is None:
                if lost_since is not None and ACTIVATED in text:
                    lost_since, offset = None, log.stat().st_size      # taken back: the household goes on
                    say("back in the household")
                time.sleep(1.0)
                continue
            connected = connected or ACTIVATED in text
            if not connected:
                raise _why_stopped(text, link_address, max_wait, rows)
            # The SuperLink went away, or came back without this node (a restarted SuperLink forgets its
            # nodes and Flower's SuperNode then exits): start the SuperNode again while the server returns.
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > max_wait:
                raise _why_stopped(text, link_address, max_wait, rows, lost=True)
            try:
                check_reachable(host, port, ca, timeout=2.0)
            except EmberError:
                time.sleep(2.0)
                continue
            say(f"the household's SuperLink at {link_address} is back; joining again")
            stop(process)                   # whatever of the old SuperNode's group is left
            offset = log.stat().st_size
            process = start(argv, env, log)
            time.sleep(2.0)
    finally:
        stop(process)


def _run_over(address: str, ca: Path) -> bool:
    """Whether the SuperLink has no run still going (or is gone: it stops only after its run ended)."""
    try:
        from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=no-name-in-module

        client = control_client(address, ca)
        try:
            runs = client.ListRuns(ListRunsRequest()).run_dict
        finally:
            client.close()
        return all(run.status.status == "finished" for run in runs.values())
    except Exception:   # unreachable or refusing: the server has stopped, after the run it served
        return True


def _new_log(log: Path, offset: int) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _why_stopped(text: str, address: str, max_wait: float, rows: list[dict[str, Any]], *,
                 lost: bool = False) -> EmberError:
    """One line for a SuperNode that exited before the run ended."""
    lowered = text.lower()
    kept = "; this device's data, adapters and ledger are unchanged" if not rows else \
        "; every round this device finished is recorded, nothing local was lost"
    # Flower's SuperLink answers an unregistered key with ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED (2004),
    # which the SuperNode logs as "[code: 2004] Failed to activate SuperNode" before exiting with 305.
    if not lost and ("code: 2004" in text or "failed to activate supernode" in lowered):
        return NotAuthorized(f"the SuperLink at {address} refused this device's key; add its supernode.pub "
                             f"to the server's --authorized-key{kept}")
    if lost:
        return Unreachable(f"lost the household's SuperLink at {address} and it did not take this device back "
                           f"within {max_wait:.0f} s{kept}")
    return Unreachable(f"could not stay connected to the household's SuperLink at {address} "
                       f"({last_line_of(text)}){kept}")


def last_line_of(text: str) -> str:
    """The last non-empty line of a log excerpt that is not a traceback frame."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith(("File ", "Traceback", "^"))]
    return (lines or ["no output"])[-1][:200]
