"""The resident engine: `ember ask` answered by a running `ember serve` over a Unix socket.

`ember serve` listens, besides its TCP port, on `<data dir>/serve.sock` (mode 0600 in the 0700 data
dir: the file's permissions are the authentication). `ember ask` looks for that socket first; when a
server answers there with the same settings, the question goes through the server's one engine worker
and `conversation.respond`, exactly as it would in-process, and `ask` prints what the server sends.
When nothing answers (no socket, a stale socket left by a killed server, a server that does not
answer its health check within 3 s, one still loading, a full queue, other settings such as another
`--model`), `ask` raises `Unavailable` before anything is stored and the caller answers in-process,
silently. The health check comes before the question is sent, so that a stalled server which wakes
later does not store a question this process has already answered.

The client is the standard library's `http.client` over an AF_UNIX socket: it is on `ember ask`'s start-up
path, and httpx costs ~75 ms to import there against ~20 ms for `http.client` (`python -X importtime`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

from assistant.config import Settings
from assistant.errors import EmberError

SOCKET_NAME = "serve.sock"
ASK_PATH = "/ember/ask"
CONNECT_SECONDS = 3.0       # to connect and hear from /health: a server that cannot is passed over
ACCEPT_SECONDS = 15.0       # then until it has committed the question (a busy database waits 10 s)


class Unavailable(Exception):
    """No resident engine can answer this question: answer it in-process. Nothing was stored."""


class RemoteError(EmberError):
    """An error the server met answering: the same line and exit code `ember ask` would give in-process."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def socket_path(home: Path) -> Path:
    """Where `ember serve` for the data directory `home` listens for `ember ask`."""
    return home / SOCKET_NAME


def settings_key(settings: Settings) -> dict[str, str | None]:
    """The settings an answer depends on, comparable across processes: the server honours a question
    only when the asking process would have used the same ones (same model, context, sampling …)."""
    return {f.name: None if getattr(settings, f.name) is None else str(getattr(settings, f.name))
            for f in dataclasses.fields(settings) if f.name != "home"}   # the socket is in home already


def _connection(path: Path, timeout: float):
    """An HTTP/1.1 connection over the Unix socket at `path` (http.client is imported only when a
    socket exists: the in-process path, which logs the question first, pays nothing for it)."""
    import http.client
    import socket

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(path))
            except OSError:
                sock.close()
                raise
            self.sock = sock

    return UnixConnection("localhost", timeout=timeout)


def ask(settings: Settings, request: dict[str, Any], *, on_piece: Callable[[str], None] | None = None,
        on_warning: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Ask the resident engine; returns `Exchange.report()` as the server sent it.

    Raises `Unavailable` when no server can take the question (before it is stored), `RemoteError`
    for an error answering it (stored or not, as in-process), and `EmberError` when the server goes
    away mid-answer (what was written is kept and marked by the server).
    """
    path = socket_path(settings.home)
    if not path.exists():
        raise Unavailable("no socket")
    import http.client

    connection = _connection(path, CONNECT_SECONDS)
    body = json.dumps({**request, "settings": settings_key(settings)}).encode("utf-8")
    try:
        connection.connect()
        # Is anyone there? A stopped or stalled server fails this before it has the question: had it
        # the question, it might store it when it wakes, after this process has answered it too.
        connection.request("GET", "/health")
        probe = connection.getresponse()
        ready = probe.status == 200 and json.loads(probe.read()).get("status") == "ready"
        if not ready:
            raise Unavailable("the server is not ready")
        connection.sock.settimeout(ACCEPT_SECONDS)
        connection.request("POST", ASK_PATH, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
    except (OSError, ValueError, http.client.HTTPException) as err:   # refused (stale socket), timed out, reset
        connection.close()
        raise Unavailable(str(err)) from None
    except Unavailable:
        connection.close()
        raise
    if response.status != 200:
        try:
            error = json.loads(response.read()).get("error", {})
        except (OSError, ValueError, http.client.HTTPException, AttributeError):
            error = {}
        connection.close()
        if response.status in (400, 404, 413) and "exit_code" in error:
            raise RemoteError(error["message"], error["exit_code"])
        raise Unavailable(f"{response.status}: {error.get('message')}")
    connection.sock.settimeout(None)     # accepted: the question is stored; wait for the answer as long as it takes
    try:
        for line in response:
            event = json.loads(line)
            if "piece" in event:
                if on_piece is not None:
                    on_piece(event["piece"])
            elif "warning" in event:
                if on_warning is not None:
                    on_warning(event["warning"])
            elif "error" in event:
                raise RemoteError(event["error"]["message"], event["error"]["exit_code"])
            elif "done" in event:
                return event["done"]
    except (OSError, ValueError, http.client.HTTPException):
        pass
    finally:
        connection.close()
    raise EmberError("ember serve stopped before the answer was complete; your question and the reply so far "
                     "are saved (`ember history`)")
