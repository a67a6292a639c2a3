"""Helpers for driving the real chat app with Textual pilots."""
from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import struct
import sys
import termios
import threading
import time
from pathlib import Path
from typing import Callable

from storage import conversations as convs
from storage import registry


async def wait_until(pilot, condition: Callable[[], bool], timeout: float = 60.0) -> None:
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


def random_adapter(path: Path, model_path: Path, cache_dir: Path, *, seed: int = 0) -> Path:
    """A small random LoRA adapter for the bundled SmolLM2-135M: r=2 on the last layer's q_proj and v_proj."""
    import numpy as np

    from adapters.base import file_sha256
    from adapters.export import write_lora_gguf

    rng = np.random.default_rng(seed)
    hidden, kv_out, rank = 576, 192, 2   # 9 heads of 64; 3 key/value heads
    weights = {"model.layers.29.self_attn.q_proj": (rng.standard_normal((rank, hidden)) / hidden ** 0.5,
                                                    rng.standard_normal((hidden, rank)) * 0.05),
               "model.layers.29.self_attn.v_proj": (rng.standard_normal((rank, hidden)) / hidden ** 0.5,
                                                    rng.standard_normal((kv_out, rank)) * 0.05)}
    return write_lora_gguf(path, weights, alpha=rank, n_head=9, n_head_kv=3,
                           base_sha256=file_sha256(model_path, cache_dir), base_name=model_path.name)


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
