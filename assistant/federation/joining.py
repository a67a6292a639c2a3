"""`ember federate join ADDRESS`: this device in the household's rounds as real processes. Flower's
SuperNode (verifying the SuperLink against the household's CA, signing with this device's key, and running
only Flower Apps signed by the household's app-signing key: `--trusted-entities`, see `signing.py`) whose
`flwr-clientapp` processes run `deployed.py`'s ClientApp over this data directory; the command leaves once
the run's last round is done here, and starts the SuperNode again when a restarted SuperLink forgets it.
A run whose app is unsigned or signed by another key is refused by the SuperNode before any ClientApp
starts; join reports each such run and goes on waiting for the household's.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any, Callable

from assistant.config import Settings
from assistant.federation import credentials, signing
from assistant.federation.processes import (NotAuthorized, Unreachable, check_reachable, child_env, command,
                                            control_client, credential, free_port, joined, parse_address, start,
                                            stop)
from storage.errors import EmberError
from storage.private import private_dirs

ACTIVATED = "SuperNode ID:"      # what Flower's SuperNode logs once the SuperLink has admitted it
# What Flower's SuperNode logs when it refuses a run's FAB (flwr/supernode/start_client_internal.py):
UNSIGNED = "App verification is not supported by the connected SuperLink"      # no verification at all
UNTRUSTED = "FAB verification failed"                                          # no trusted key verifies it


@dataclasses.dataclass
class JoinResult:
    """What `ember federate join` reports: this device's rows of the run it took part in."""

    address: str
    rounds: list[dict[str, Any]]
    seconds: float
    refused: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def join(settings: Settings, db: Any, *, address: str, ca: Path | None = None, signer: Path | None = None,
         max_wait: float = 120.0, on_event: Callable[[str], None] | None = None) -> JoinResult:
    """Run this device's SuperNode against the household's SuperLink at `address` until the household's
    run has done its last round here (its gate's verdict recorded and the reply delivered). A SuperLink
    that goes away is waited for up to `max_wait` seconds (Flower's SuperNode reconnects), then
    `Unreachable`; nothing local is lost either way. Only apps signed by the key in `signer` (the server's
    app-signing.pub; default this device's own) run here; refused runs are listed in the result."""
    from storage import federation as rounds

    say = on_event or (lambda _line: None)
    host, port = parse_address(address)
    link_address = joined(host, port)
    key = credential(settings, "supernode.key")
    ca = credential(settings, "ca.pem", ca)
    trusted = signing.load_public(credential(settings, signing.PUBLIC, signer))
    supernode = command("flower-supernode")
    check_reachable(host, port, ca)
    work = credentials.folder(settings.home) / "join"
    private_dirs(work)
    log = work / "supernode.log"
    offset = log.stat().st_size if log.is_file() else 0
    entities = signing.write_trusted_entities(work / "trusted-entities.yaml", trusted)
    refused: dict[int, str] = {}
    scan: dict[str, Any] = {"offset": offset, "run": None}
    node_config = " ".join(f"{k}={json.dumps(v)}" for k, v in
                           {"ember-home": str(settings.home), "model": str(settings.model_path),
                            "server": link_address}.items())
    first = rounds.latest_id(db)
    began = time.monotonic()
    argv = [supernode, "--superlink", link_address, "--root-certificates", str(ca), "--auth-supernode-private-key",
            str(key), "--trusted-entities", str(entities), "--max-wait-time", str(max_wait), "--port",
            str(free_port()), "--node-config", node_config]
    env = child_env(settings, work / "flwr")
    process = start(argv, env, log)
    say(f"SuperNode started for the household at {link_address}; waiting for rounds of apps signed by "
        f"{signing.key_id(trusted)}")
    connected, lost_since, done_at = False, None, None

    def result() -> JoinResult:
        return JoinResult(link_address, rows, round(time.monotonic() - began, 1),
                          [{"run": run, "reason": why} for run, why in refused.items()])

    try:
        while True:
            _scan_refusals(log, scan, refused, say)
            rows = [r for r in rounds.since(db, first) if r["server"] == link_address]
            final = [r for r in rows if r["rounds"] and r["round"] >= r["rounds"]
                     and (r["phase"] == "evaluate" or r["status"] == "refused")]
            if final and done_at is None:
                done_at = time.monotonic()
            if done_at is not None and (_run_over(link_address, ca) or time.monotonic() - done_at > 60):
                return result()
            text = _new_log(log, offset) if process.poll() is not None or lost_since is not None else ""
            if process.poll() is None:
                if lost_since is not None and ACTIVATED in text:
                    lost_since, offset = None, log.stat().st_size      # taken back: the household goes on
                    say("back in the household")
                time.sleep(1.0)
                continue
            connected = connected or ACTIVATED in text
            if not connected:
                raise _why_stopped(text, link_address, max_wait, rows, refused=refused)
            # The SuperLink went away, or came back without this node (a restarted SuperLink forgets its
            # nodes and Flower's SuperNode then exits): start the SuperNode again while the server returns.
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > max_wait:
                raise _why_stopped(text, link_address, max_wait, rows, lost=True, refused=refused)
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


def _scan_refusals(log: Path, scan: dict[str, Any], refused: dict[int, str], say: Callable[[str], None]) -> None:
    """Find the runs the SuperNode refused to run in its log's lines past `scan["offset"]` (it names the
    run on the `[RUN n...]` line before its error); add them to `refused` and say each once."""
    try:
        with open(log, "rb") as f:
            f.seek(scan["offset"])
            data = f.read()
    except OSError:
        return
    end = data.rfind(b"\n") + 1            # whole lines only; the rest is read next time
    scan["offset"] += end
    for line in data[:end].decode(errors="replace").splitlines():
        if (found := re.search(r"\[RUN (\d+)", line)):
            scan["run"] = int(found.group(1))
        elif (UNSIGNED in line or UNTRUSTED in line) and scan["run"] is not None and scan["run"] not in refused:
            refused[scan["run"]] = ("its app carries no signature" if UNSIGNED in line else
                                    "its app is not signed by the household's key")
            say(f"refused run {scan['run']}: {refused[scan['run']]}; nothing of it ran on this device")


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
                 lost: bool = False, refused: dict[int, str] | None = None) -> EmberError:
    """One line for a SuperNode that exited before the run ended."""
    lowered = text.lower()
    kept = "; this device's data, adapters and ledger are unchanged" if not rows else \
        "; every round this device finished is recorded, nothing local was lost"
    if refused and not rows:
        runs = ", ".join(str(run) for run in refused)
        return signing.UntrustedSigner(
            f"this device refused run(s) {runs} at {address}: {next(iter(refused.values()))}; if it was the "
            f"household's, pass the server's app-signing.pub with --app-signer{kept}")
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
