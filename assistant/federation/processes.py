"""What `ember federate serve` (`serving.py`) and `join` (`joining.py`) share: addresses, credentials,
Flower's commands and their processes. The SuperLink runs Ember's Flower App (a FAB of `deployed.py`);
each device's SuperNode runs its `flwr-clientapp` processes, which train through the one learning path and
gate the global update (`client.py`, the same code as the in-process rounds).

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

import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from adapters.errors import TrainingUnavailable
from assistant.config import Settings
from assistant.federation import credentials
from storage.errors import EmberError, InvalidInput

DEFAULT_PORT = 9092
LOOPBACK = "127.0.0.1"
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
    Flower's files in this device's data directory, no runtime installation, no telemetry or update check."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    # Flower phones home by default (flwr/supercore/telemetry.py, update_check.py): not from these devices.
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
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


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start one of Flower's processes in its own session, its output to `log` (0600). A SIGTERM to
    this process then stops it as Ctrl-C does, so Flower's processes are stopped with it.

    The process gets SIGINT's default action even when this one ignores it (`ember federate serve &` in a
    script: a shell without job control starts background commands with SIGINT ignored, and exec keeps
    that). Flower's parent monitors (`start_parent_process_monitor`: the launcher watching `serve`, the
    ServerApp watching the launcher) end their process with a SIGINT to itself when the parent is gone;
    ignored, it left both running forever after `serve` was killed. Being in its own session, the
    process is never sent a terminal's Ctrl-C either way.
    """
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    # Only in that case: preexec_fn runs between fork and exec, which the subprocess docs advise
    # against while other threads run; resetting one signal there touches no lock.
    inherit_ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    fd = os.open(log, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
    try:
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_default_sigint if inherit_ignored else None)
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
