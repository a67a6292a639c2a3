"""`ember serve`: an OpenAI-compatible HTTP API on this machine, answering through Ember's one request path."""
from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import socket
import stat
from pathlib import Path

import click

from assistant import resident
from assistant.cli.common import model_option, settings_from
from assistant.errors import EmberError, InvalidInput
from storage.db import ensure_private_dir

TOKEN_NAME = "api-token"
LOOPBACK_NAMES = ("localhost",)


class TokenRequired(EmberError):
    """Binding beyond this machine without a bearer token."""

    exit_code = 2


def loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_token(path: Path) -> str:
    """Write a fresh token to `path` (0600, its directory 0700) and return it."""
    ensure_private_dir(path.parent)
    token = secrets.token_urlsafe(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)     # an existing file keeps its mode through O_TRUNC: tighten it first
    with os.fdopen(descriptor, "w") as f:
        f.write(token + "\n")
    return token


def read_token(path: Path) -> str:
    """The token in `path`: it must exist, be private to its owner and hold one non-empty line."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidInput(f"token file {path} does not exist; create one with --new-token") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidInput(f"cannot read token file {path}: {err}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InvalidInput(f"token file {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
                           f"run chmod 600 {path}")
    token = text.strip()
    if not token or len(token) < 16 or any(ch.isspace() for ch in token):
        raise InvalidInput(f"token file {path} must hold one token of at least 16 characters, without spaces")
    return token


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or one line saying why not (port taken, unknown host)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as err:
        raise InvalidInput(f"cannot listen on {host}:{port} ({err.strerror or err}); "
                           "pick another --port or --host") from None
    sock.set_inheritable(True)
    return sock


def bind_unix(path: Path) -> socket.socket | None:
    """The resident engine's socket for `ember ask` (0600), or None when another live server of this
    data directory already answers there. A stale file left by a killed server is replaced."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return None                       # someone answers: the data directory has its resident engine
    except FileNotFoundError:
        pass
    except OSError:
        path.unlink(missing_ok=True)      # nobody listens: a killed server's leftover
    finally:
        probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)                 # born 0600: never a moment when others could connect
    try:
        sock.bind(str(path))
    except OSError as err:
        sock.close()
        raise InvalidInput(f"cannot listen on {path} ({err.strerror or err})") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback needs --token-file or --new-token.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True,
              help="Port to listen on (0: any free port, printed at start).")
@click.option("--token-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Require `Authorization: Bearer <token>` with the token in this file (mode 600).")
@click.option("--new-token", "new_token_", is_flag=True,
              help="Write a new token (to --token-file, or <data dir>/api-token), print it once, require it.")
@click.option("--queue", "queue_size", type=click.IntRange(0, 1000), default=4, show_default=True,
              help="Requests that may wait behind the running one; beyond them: 429 with Retry-After.")
@click.option("--max-body", type=click.IntRange(1024), default=1_000_000, show_default=True,
              help="Largest request body, in bytes (413 beyond it).")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="Allow browser pages from this origin (repeatable). No CORS unless given.")
@click.option("--no-learn", is_flag=True, help="Exclude every conversation that comes through the API from learning.")
@model_option
def serve(host, port, token_file, new_token_, queue_size, max_body, cors_origins, no_learn, model):
    """Serve an OpenAI-compatible API (chat completions, models, embeddings) on this machine."""
    settings = settings_from(model=model)
    token = None
    if new_token_:
        path = token_file or settings.home / TOKEN_NAME
        token = new_token(path)
        click.echo(token)   # the one time it is shown; it stays in the file
        click.echo(f"ember: new API token written to {path} (mode 600)", err=True)
    elif token_file is not None:
        token = read_token(token_file)
    if token is None and not loopback(host):
        raise TokenRequired(f"refusing to listen on {host} without a token: anyone who can reach it could read "
                            "and write your conversations; pass --token-file FILE or --new-token")
    import uvicorn   # lazy: no other command pays for the web stack

    from assistant.server.app import ServeOptions, create_app

    sock = bind(host, port)
    ensure_private_dir(settings.home)
    uds_path = resident.socket_path(settings.home)
    uds = bind_unix(uds_path)
    ours = os.stat(uds_path).st_ino if uds is not None else None
    options = ServeOptions(token=token, queue=queue_size, max_body=max_body, cors_origins=tuple(cors_origins),
                           learn=not no_learn)
    app = create_app(settings, options)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"ember: serving on http://{shown}:{sock.getsockname()[1]}/v1 "
               f"({'token required' if token else 'no token: this machine only'}); Ctrl-C stops", err=True)
    if uds is None:
        click.echo(f"ember: another `ember serve` answers `ember ask` for this data directory ({uds_path}); "
                   "this one serves HTTP only", err=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=10,
                            server_header=False, h11_max_incomplete_event_size=64 * 1024)
    # One uvicorn server on both sockets: one app, one lifespan, one engine worker and queue for the
    # network's requests and `ember ask`'s alike (a second Server would run the lifespan, and load the
    # model, twice, and the two would fight over the signal handlers).
    try:
        uvicorn.Server(config).run(sockets=[sock] + ([uds] if uds else []))
    finally:
        if uds is not None:
            with contextlib.suppress(OSError):
                if os.stat(uds_path).st_ino == ours:     # not a later server's
                    uds_path.unlink()


COMMANDS = [serve]
