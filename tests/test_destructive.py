"""Destructive commands (`forget`, `memory remove`, `adapters remove`) count, ask on a terminal, refuse off
one without --yes, list with --dry-run, and `--match` takes whole exchanges. The real `ember` in
subprocesses: off a terminal through pipes, on one through a real pty."""
from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

from storage import conversations as convs
from storage import memory, registry
from storage.db import open_db
from tests.conftest import assert_clean_error

PICNIC = [("user", "Plan a picnic for Saturday"), ("assistant", "Bring bread, cheese and a blanket."),
          ("user", "What about drinks?"), ("assistant", "Lemonade and water.")]


def seed(db, conversations: int = 3) -> list[int]:
    """Conversations of two exchanges each, their messages made into memories; returns conversation ids."""
    ids = []
    for _ in range(conversations):
        cid = convs.create_conversation(db)
        for role, text in PICNIC:
            convs.add_message(db, cid, role, text)
        ids.append(cid)
    memory.sync_messages(db)
    return ids


def counts(db) -> tuple[int, int, int]:
    return (db["messages"].count, db["conversations"].count, db["memory_chunks"].count)


def on_a_terminal(home, *args: str, answer: str | None, timeout: float = 60) -> tuple[int, str]:
    """Run `ember ARGS` with a real pty as its terminal; type `answer` at the [y/N] prompt."""
    master, slave = pty.openpty()
    env = dict(os.environ, EMBER_HOME=str(home))
    env.pop("EMBER_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-m", "assistant", *args], stdin=slave, stdout=slave, stderr=slave,
                            env=env, close_fds=True)
    os.close(slave)
    out, answered, deadline = b"", answer is None, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:        # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
            if not answered and b"[y/N]" in out:
                os.write(master, answer.encode() + b"\r")
                answered = True
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return proc.returncode, out.decode("utf-8", "replace").replace("\r\n", "\n")


def test_forget_all_off_a_terminal_deletes_nothing_whatever_is_piped(ember, home):
    db = open_db(home)
    seed(db)
    before = counts(db)
    for piped in ("n\n", "y\n", ""):
        result = ember("forget", "--all", input=piped)
        assert_clean_error(result, contains="--yes")
        assert "12 messages" in result.err and "3 whole conversations" in result.err
        assert counts(db) == before


def test_forget_with_yes_reports_the_counts(ember, home):
    db = open_db(home)
    seed(db)
    result = ember("forget", "--all", "--yes", "--json", input="")
    assert result.returncode == 0, result.err
    assert json.loads(result.out)["deleted"] == {"messages": 12, "conversations": 3, "memories": 12,
                                                 "adapters_tainted": 0, "runs_dropped": 0}
    assert counts(db) == (0, 0, 0)
    assert "Nothing to delete" in ember("forget", "--all", input="").out


def test_dry_run_lists_the_matches_and_deletes_nothing(ember, home):
    db = open_db(home)
    first, *_ = seed(db)
    before = counts(db)
    result = ember("forget", "--match", "cheese", "--dry-run", input="")
    assert result.returncode == 0, result.err
    assert "Would delete 6 messages and 6 memories:" in result.out
    assert "Plan a picnic" in result.out and "Bring bread" in result.out and "nothing was deleted" in result.out
    preview = json.loads(ember("forget", "--match", "cheese", "--dry-run", "--json", input="").out)
    assert preview["dry_run"] and preview["would_delete"]["messages"] == 6
    assert {m["conversation_id"] for m in preview["items"]} >= {first}
    preview = json.loads(ember("forget", "--conversation", str(first), "--dry-run", "--json").out)
    assert preview["would_delete"] == {"messages": 4, "conversations": 1, "memories": 4, "adapters_tainted": 0,
                                       "runs_dropped": 0}
    assert counts(db) == before


def test_match_deletes_whole_exchanges_unless_asked_for_single_messages(ember, home):
    db = open_db(home)
    first, second, _ = seed(db)
    result = ember("forget", "--match", "cheese", "--yes", "--json")
    assert json.loads(result.out)["deleted"]["messages"] == 6, result.err
    # The question went with its answer; the next exchange is whole.
    assert [m["content"] for m in convs.messages(db, first)] == ["What about drinks?", "Lemonade and water."]
    fourth = seed(db, 1)[0]
    result = ember("forget", "--match", "LEMONADE", "--messages-only", "--yes", "--json")
    assert json.loads(result.out)["deleted"]["messages"] == 4
    assert [m["content"] for m in convs.messages(db, second)] == ["What about drinks?"]
    assert [m["role"] for m in convs.messages(db, fourth)] == ["user", "assistant", "user"]
    assert_clean_error(ember("forget", "--all", "--messages-only"), contains="--messages-only goes with --match")


def test_on_a_terminal_forget_says_what_it_deletes_and_asks(home):
    db = open_db(home)
    seed(db, 2)
    code, screen = on_a_terminal(home, "forget", "--match", "drinks", answer="n")
    assert "Delete 4 messages and 4 memories? [y/N]" in screen and "What about drinks?" in screen
    assert code != 0 and "nothing was deleted" in screen
    assert counts(db) == (8, 2, 8)
    code, screen = on_a_terminal(home, "forget", "--all", answer="y")
    assert "Delete 8 messages, 2 whole conversations and 8 memories? [y/N]" in screen
    assert code == 0 and "Forgot 8 messages" in screen
    assert counts(db) == (0, 0, 0)


def test_memory_remove_counts_asks_and_previews(ember, home, tmp_path):
    db = open_db(home)
    memory.upsert_records(db, [{"id": "n1", "text": "The spare key is under the blue pot."}])
    cid = seed(db, 1)[0]
    note = db.execute("SELECT id FROM memory_chunks WHERE source = 'import'").fetchone()[0]
    message = db.execute("SELECT id, message_id FROM memory_chunks WHERE message_id IS NOT NULL "
                         "ORDER BY id LIMIT 1").fetchone()
    result = ember("memory", "remove", str(note), input="y\n")
    assert_clean_error(result, contains="--yes")
    assert "imported record 'n1'" in result.err
    preview = json.loads(ember("memory", "remove", str(message[0]), "--dry-run", "--json").out)
    assert preview["would_delete"] == {"messages": 1, "conversations": 0, "memories": 1, "adapters_tainted": 0}
    assert db["memory_chunks"].count == 5
    code, screen = on_a_terminal(home, "memory", "remove", str(message[0]), answer="y")
    assert code == 0 and f"and the message it comes from ({message[1]})? [y/N]" in screen
    assert len(convs.messages(db, cid)) == 3
    done = json.loads(ember("memory", "remove", str(note), "--yes", "--json").out)
    assert done["deleted"]["memories"] == 1 and done["removed"]["source_id"] == "n1"


def test_adapters_remove_counts_asks_and_keeps_the_file_until_confirmed(ember, home):
    db = open_db(home)
    cid = seed(db, 1)[0]
    path = home / "adapters" / "a1.gguf"
    path.parent.mkdir(mode=0o700)
    path.write_bytes(b"adapter")
    sources = [(m["id"], "train") for m in convs.messages(db, cid)]
    registry.register(db, {"id": "a1", "path": str(path), "kind": "lora", "method": "lora", "base_sha256": "x",
                           "status": "inactive", "examples": 4}, sources, activate=True)
    result = ember("adapters", "remove", "a1", input="y\n")
    assert_clean_error(result, contains="--yes")
    assert "a1 (active)" in result.err and "4 messages it learned from" in result.err
    assert path.exists() and registry.active(db)["id"] == "a1"
    preview = json.loads(ember("adapters", "remove", "a1", "--dry-run", "--json").out)
    assert preview["would_delete"] == {"adapters": 1, "active": True, "sources": 4} and path.exists()
    code, screen = on_a_terminal(home, "adapters", "remove", "a1", answer="n")
    assert code != 0 and "goes back to the base model? [y/N]" in screen and path.exists()
    done = json.loads(ember("adapters", "remove", "a1", "--yes", "--json").out)
    assert done["removed"] == "a1" and done["was_active"] and not path.exists()
    assert registry.list_adapters(db) == [] and len(convs.messages(db, cid)) == 4


def test_forget_counts_the_adapters_it_withdraws(ember, home):
    db = open_db(home)
    cid = seed(db, 1)[0]
    first = convs.messages(db, cid)[0]["id"]
    registry.register(db, {"id": "a1", "path": str(home / "a1.gguf"), "kind": "lora", "method": "lora",
                           "base_sha256": "x", "status": "inactive", "examples": 1}, [(first, "train")],
                      activate=True)
    result = ember("forget", "--message", str(first), input="")
    assert_clean_error(result, contains="withdrawing 1 adapter trained on them")
    assert registry.get(db, "a1")["status"] == "active"
    assert convs.preview_delete(db, cid) == {"messages": 4, "conversations": 1, "memories": 4,
                                             "adapters_tainted": 1}
    done = json.loads(ember("forget", "--message", str(first), "--yes", "--json").out)["deleted"]
    assert done["adapters_tainted"] == 1 and registry.get(db, "a1")["status"] == "tainted"
