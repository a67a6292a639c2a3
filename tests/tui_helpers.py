"""Helpers for driving the real chat app with Textual pilots."""
from __future__ import annotations

import asyncio
import fcntl
import itertools
import os
import pty
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path
from typing import Callable

from benchmarks.everyday import random_adapter  # noqa: F401  (the tests' random LoRA, shared with the benchmark)
from storage import conversations as convs
from storage import registry


async def wait_until(pilot, condition: Callable[[], bool], timeout: float = 180.0) -> None:
    """Let the app run until `condition()` holds (the model works in a thread)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.05)
    await pilot.pause()


def seed_conversations(db) -> list[int]:
    """Two past conversations with fixed times, as a user would have them."""
    stamps = ["2026-05-01T09:00:00.000+00:00", "2026-05-02T18:30:00.000+00:00"]
    ids = []
    for stamp, (question, answer) in zip(stamps, [
        ("Ideas for a picnic in the park", "Bring **sandwiches**, fruit and a blanket."),
        ("How do I make pancakes?", "Mix flour, eggs and milk:\n\n1. Whisk\n2. Rest 10 minutes\n3. Fry"),
    ]):
        cid = convs.create_conversation(db)
        convs.add_message(db, cid, "user", question)
        convs.add_message(db, cid, "assistant", answer)
        db.execute("UPDATE conversations SET created = ?, updated = ? WHERE id = ?", [stamp, stamp, cid])
        db.execute("UPDATE messages SET created = ? WHERE conversation_id = ?", [stamp, cid])
        ids.append(cid)
    db.conn.commit()
    return ids


def register_adapter(db, adapter_id: str, path: Path, sources: list[int]) -> None:
    """Register an adapter file as `ember adapt` would after promoting it: active at once."""
    registry.register(db, {"id": adapter_id, "path": str(path), "kind": "lora", "method": "lora",
                           "base_sha256": "recorded-by-adapt", "base_name": "SmolLM2-135M",
                           "params": {"rank": 2}, "eval": {"heldout_loss": 1.0}, "status": "inactive",
                           "epsilon": 8.0, "delta": 1e-6, "examples": len(sources)},
                      [(m, "train") for m in sources], activate=True)


async def type_text(pilot, text: str) -> None:
    """Type into the focused widget, as a person would."""
    await pilot.press(*[{" ": "space"}.get(ch, ch) for ch in text])
    await asyncio.sleep(0)


class TerminalRun:
    """The real `ember` command in a pseudo-terminal, as a person runs it."""

    def __init__(self, args: list[str], env: dict[str, str], size: tuple[int, int] = (120, 40)) -> None:
        self.screen = bytearray()
        self.pid, self.fd = pty.fork()
        if self.pid == 0:   # the child becomes `ember ...` on the pseudo-terminal
            os.execve(sys.executable, [sys.executable, "-m", "assistant", *args],
                      dict(env, TERM="xterm-256color"))
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", size[1], size[0], 0, 0))
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        # Keep reading so that the app never blocks on a full terminal.
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:
                return
            if not data:
                return
            self.screen.extend(data)

    def wait_for(self, text: bytes, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never appeared on the terminal")
            time.sleep(0.05)

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def kill(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 30) -> int:
        """The exit code (negative: killed by that signal)."""
        deadline = time.monotonic() + timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                raise AssertionError("the process did not exit")
            time.sleep(0.05)


def gguf_with_template(source: Path, target: Path, template: str | None) -> Path:
    """A copy of a GGUF model with another chat template, or (None) with none at all, as model files
    found in the wild come; llama.cpp loads the copy like the original."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(source, "r")
    writer = gguf.GGUFWriter(target, arch=reader.get_field(gguf.Keys.General.ARCHITECTURE).contents(),
                             endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    key = gguf.Keys.Tokenizer.CHAT_TEMPLATE
    new = {} if template is None else {key: MetadataDetails(gguf.GGUFValueType.STRING, template)}
    copy_with_new_metadata(reader, writer, new, [key] if template is None else [])
    return target


_sessions = itertools.count()


class TmuxRun:
    """The real `ember` command in a tmux window (its own tmux server): `screen()` is what a person sees.

    A terminal emulator, not a byte stream: what a frame lost on its way to the terminal does to the
    screen shows here, as it did to the user.
    """

    def __init__(self, args: list[str], env: dict[str, str], size: tuple[int, int] = (120, 40), *,
                 program: list[str] | None = None) -> None:
        if shutil.which("tmux") is None:
            import pytest

            pytest.skip("tmux is not installed")
        self.socket = f"ember-test-{os.getpid()}-{next(_sessions)}"
        self.env = env
        # The shell around the program records its exit status: tmux reports a pane dead when the
        # terminal closes, and may not have reaped the process (nor know its status) for a while.
        self._status = Path(tempfile.mkdtemp(prefix="ember-tmux-")) / "status"
        command = (shlex.join([*(program or [sys.executable, "-m", "assistant"]), *args])
                   + f"; echo $? > {shlex.quote(str(self._status))}")
        # The window stays after the program ends, so that what it printed last can be read.
        self._tmux("new-session", "-d", "-s", "ember", "-x", str(size[0]), "-y", str(size[1]), command,
                   ";", "set-option", "-t", "ember", "remain-on-exit", "on")
        self.socket_path = self._tmux("display-message", "-p", "#{socket_path}").strip()

    def _tmux(self, *args: str, input: bytes | None = None) -> str:
        result = subprocess.run(["tmux", "-L", self.socket, "-f", os.devnull, *args], env=self.env,
                                input=input, capture_output=True, timeout=30)
        return result.stdout.decode("utf-8", "replace") if result.returncode == 0 else ""

    def screen(self) -> str:
        """The window's text as it is shown now."""
        return self._tmux("capture-pane", "-p", "-t", "ember")

    def _pane(self, field: str, timeout: float = 10) -> str:
        # A tmux client can fail on a loaded machine (its reply is then empty): ask again, never read a
        # failed query as "the program ended".
        deadline = time.monotonic() + timeout
        while not (value := self._tmux("display-message", "-p", "-t", "ember", f"#{{{field}}}").strip()):
            if time.monotonic() > deadline:
                raise AssertionError(f"tmux did not answer for {field}")
            time.sleep(0.1)
        return value

    def running(self) -> bool:
        return self._pane("pane_dead") == "0"

    def exit_status(self, timeout: float = 30) -> int:
        """Wait for the program to end; its exit status (128 + N when signal N killed it)."""
        deadline = time.monotonic() + timeout
        while not (self._status.is_file() and self._status.read_text().strip()):
            if time.monotonic() > deadline:
                raise AssertionError("the program did not exit")
            time.sleep(0.1)
        return int(self._status.read_text())

    def wait_for(self, condition: Callable[[str], bool] | str, timeout: float = 120) -> str:
        """Poll the screen until `condition(screen)` holds (or the text is on it); returns that screen."""
        check = (lambda screen: condition in screen) if isinstance(condition, str) else condition
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if check(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"the screen never showed what was awaited; it shows:\n{screen}")
            time.sleep(0.1)

    def keys(self, *keys: str, literal: bool = False) -> None:
        """Type keys (tmux names: Enter, C-j, Escape …), or with `literal` the characters as they are."""
        self._tmux("send-keys", "-t", "ember", *(["-l"] if literal else []), *keys)

    def paste(self, text: str) -> None:
        """Paste as a terminal does: bracketed when the program asked for it, line feeds sent as returns."""
        self._tmux("load-buffer", "-", input=text.encode())
        self._tmux("paste-buffer", "-p", "-d", "-t", "ember")

    def close(self) -> None:
        self._tmux("kill-server")
        if self.socket_path:   # tmux leaves its socket file behind when killed
            Path(self.socket_path).unlink(missing_ok=True)
