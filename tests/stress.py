"""Every Ember front-end at once against one data directory, every write each of them made counted.

Used by tests/test_reliability.py: short in the normal suite, long with `pytest --soak-seconds N`.
Each side is a real process (the chat in a pseudo-terminal, the `ember` command in subprocesses, the
daemon), so SQLite's locks are exercised across processes as a user's machine exercises them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from storage.db import DB_NAME
from tests.tui_helpers import TerminalRun


@dataclasses.dataclass
class Side:
    """What one side did: the texts it wrote (and saw stored, for the chat) and the errors it saw."""

    name: str
    written: list[str] = dataclasses.field(default_factory=list)
    runs: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)


def _ember(home: Path, *args: str, input: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, EMBER_HOME=str(home))
    env.pop("EMBER_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "assistant", *args], input=input, capture_output=True,
                          timeout=timeout, env=env)


def _stored(home: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Read the database as another process would (a fresh read-only connection each time)."""
    import sqlean

    conn = sqlean.connect(f"file:{home / DB_NAME}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def _loop(side: Side, stop: threading.Event, step) -> None:
    i = 0
    while not stop.is_set():
        try:
            step(i)
        except Exception as err:   # a test harness: whatever went wrong is the finding
            side.errors.append(f"{type(err).__name__}: {err}")
        side.runs += 1
        i += 1


def ask_side(home: Path, side: Side, i: int) -> None:
    text = f"ask-{i} what is two plus two?"
    result = _ember(home, "ask", "--json", "--max-tokens", "4", "--temperature", "0", text)
    if result.returncode != 0:
        side.errors.append(result.stderr.decode(errors="replace").strip())
        return
    json.loads(result.stdout)
    side.written.append(text)


def import_side(home: Path, side: Side, i: int, work: Path) -> None:
    notes = [f"import-{i}-{j} my note number {j} of batch {i}" for j in range(5)]
    path = work / f"notes-{i}.jsonl"
    path.write_text("".join(json.dumps({"id": f"import-{i}-{j}", "text": t}) + "\n" for j, t in enumerate(notes)))
    result = _ember(home, "memory", "import", str(path))
    if result.returncode != 0:
        side.errors.append(result.stderr.decode(errors="replace").strip())
        return
    side.written += [f"import-{i}-{j}" for j in range(5)]


def reader_side(home: Path, side: Side, i: int) -> None:
    command = [("status", "--json"), ("history", "--json", "--limit", "5"), ("export", "--format", "json")][i % 3]
    result = _ember(home, *command)
    if result.returncode != 0:
        side.errors.append(f"{command[0]}: " + result.stderr.decode(errors="replace").strip())
    else:
        json.loads(result.stdout)


def chat_side(home: Path, side: Side, stop: threading.Event) -> None:
    """The chat in a real pseudo-terminal: send a message, wait until another process sees it stored
    with its reply finished, send the next."""
    env = dict(os.environ, EMBER_HOME=str(home))
    env.pop("EMBER_DEBUG", None)
    chat = TerminalRun(["chat"], env)
    try:
        chat.wait_for(b"Message Ember", timeout=60)
        i = 0
        while not stop.is_set():
            text = f"chat-{i} say hi"
            chat.type(text)
            time.sleep(0.2)
            chat.type("\r")
            deadline = time.monotonic() + 180   # a reply on two loaded cores can take a while
            retry_at = time.monotonic() + 15
            while True:
                rows = _stored(home, "SELECT m.id, m.conversation_id FROM messages m WHERE m.content = ? "
                               "AND m.role = 'user'", (text,))
                if rows:
                    reply = _stored(home, "SELECT status FROM messages WHERE conversation_id = ? AND id > ? "
                                    "AND role = 'assistant' ORDER BY id LIMIT 1", (rows[0][1], rows[0][0]))
                    if reply and reply[0][0] != "generating":
                        break
                elif time.monotonic() > retry_at:
                    # Enter while the last reply is still being finished is refused with a notice and
                    # the text stays in the box (the chat's rule): press it again, as a person would.
                    chat.type("\r")
                    retry_at = time.monotonic() + 15
                if time.monotonic() > deadline:
                    side.errors.append(f"{text!r} (or its reply) never became visible to other processes")
                    return
                time.sleep(0.2)
            time.sleep(0.5)   # let the chat finish painting the reply before the next message
            side.written.append(text)
            side.runs += 1
            i += 1
    finally:
        chat.type("\x11")    # Ctrl+Q
        try:
            code = chat.wait(timeout=20)
            if code != 0:
                side.errors.append(f"chat exited with {code}")
        except AssertionError:
            chat.kill(signal.SIGKILL)
            side.errors.append("chat did not quit on Ctrl+Q")


def run(home: Path, work: Path, seconds: float) -> dict[str, Side]:
    """Run every side at once for `seconds`; returns what each side wrote and saw."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text("max_tokens = 8\ntemperature = 0.0\ndaemon_check_seconds = 1\n")
    _ember(home, "status")   # create and migrate the database once, before the crowd
    sides = {name: Side(name) for name in ("chat", "ask", "import", "reader", "daemon")}
    stop = threading.Event()
    env = dict(os.environ, EMBER_HOME=str(home))
    env.pop("EMBER_DEBUG", None)
    daemon = subprocess.Popen([sys.executable, "-m", "assistant", "daemon", "run"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    threads = [
        threading.Thread(target=chat_side, args=(home, sides["chat"], stop)),
        threading.Thread(target=_loop, args=(sides["ask"], stop, lambda i: ask_side(home, sides["ask"], i))),
        threading.Thread(target=_loop, args=(sides["import"], stop,
                                             lambda i: import_side(home, sides["import"], i, work))),
        threading.Thread(target=_loop, args=(sides["reader"], stop, lambda i: reader_side(home, sides["reader"], i))),
    ]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=180)
    daemon.send_signal(signal.SIGTERM)
    try:
        _, err = daemon.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        daemon.kill()
        _, err = daemon.communicate()
        sides["daemon"].errors.append("the daemon did not stop on SIGTERM")
    if daemon.returncode not in (0, -signal.SIGTERM):
        sides["daemon"].errors.append(f"daemon exited {daemon.returncode}: {err.decode(errors='replace')[-500:]}")
    sides["daemon"].runs = 1
    return sides
