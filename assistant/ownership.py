"""Who computes on this machine right now: `ember serve` answering a request, or the daemon training.

Two lock files in the data directory (0600; flock, released by the kernel when a process dies):
- `serving.lock`: `ember serve` holds it shared from the moment it accepts a request until the reply
  is finished (logged or not, `ember ask` included). The daemon does not start a run while it is held,
  and a run in progress sees it after its current step, checkpoints and pauses, as when the user returns.
- `training.lock`: the daemon holds it exclusively while it checks and runs (training or a router
  refit). The server's engine takes it shared before each reply, so a request that arrives mid-run
  waits for that step to end (about a second) and never computes beside training.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from pathlib import Path
from typing import Iterator

SERVING = "serving.lock"
TRAINING = "training.lock"
POLL_SECONDS = 0.05


def _open(path: Path) -> int:
    return os.open(path, os.O_CREAT | os.O_RDWR, 0o600)


def serving(home: Path) -> bool:
    """Whether an `ember serve` of this data directory is in the middle of a request."""
    path = home / SERVING
    if not path.exists():
        return False
    fd = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)      # closing drops the probe's lock (a lock file, never the database)
    return False


class Serving:
    """The server's side of `serving.lock`: held while at least one request is in flight."""

    def __init__(self, home: Path):
        self.fd = _open(home / SERVING)
        self.count = 0
        self.lock = threading.Lock()

    def enter(self) -> None:
        with self.lock:
            self.count += 1
            if self.count == 1:
                fcntl.flock(self.fd, fcntl.LOCK_SH)

    def leave(self) -> None:
        with self.lock:
            self.count -= 1
            if self.count == 0:
                fcntl.flock(self.fd, fcntl.LOCK_UN)


@contextlib.contextmanager
def training(home: Path) -> Iterator[None]:
    """The daemon's side: hold `training.lock` for a check and the run it starts (waits out a reply)."""
    fd = _open(home / TRAINING)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def replying(home: Path, cancel: threading.Event | None = None) -> Iterator[None]:
    """The server's engine, around one reply: wait until no training step runs, and keep it so."""
    fd = _open(home / TRAINING)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if cancel is not None and cancel.is_set():
                    break      # the client left while waiting: answer nothing, quickly
                time.sleep(POLL_SECONDS)
        yield
    finally:
        os.close(fd)
