"""Nothing the user writes is lost: concurrent processes, kills at every moment, broken templates."""
from __future__ import annotations

import builtins
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from assistant.conversation import log_question, respond
from storage import conversations as convs
from storage.db import DB_NAME, connections, integrity_ok, open_db
from tests import stress


def _count_elsewhere(home: Path) -> int:
    """How many messages another process sees."""
    code = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
            "print(c.execute('SELECT count(*) FROM messages').fetchone()[0])")
    return int(subprocess.check_output([sys.executable, "-c", code, str(home / DB_NAME)]))


def test_another_process_closing_its_connection_keeps_our_wal(home):
    # The minimal form: two connections here, a third process opens and closes one.
    db1 = open_db(home)
    db2 = open_db(home)
    cid = convs.create_conversation(db2)
    convs.add_message(db2, cid, "user", "first")
    subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from storage.db import open_db; "
                    "open_db(Path(sys.argv[1])).conn.close()", str(home)], check=True)
    convs.add_message(db2, cid, "user", "second")
    assert (home / f"{DB_NAME}-wal").exists() and (home / f"{DB_NAME}-shm").exists()
    assert _count_elsewhere(home) == 2
    db1.close()
    db2.close()


def test_nothing_opens_the_database_file_outside_sqlite(home, engine, settings, monkeypatch):
    # The whole kind of fault: any descriptor of ember.db* opened and closed by Python drops our locks.
    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def spy_os_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    db = open_db(home)
    again = open_db(home)
    respond(again, engine, settings, "Hello there", route="base", max_tokens=4)
    db.close()
    again.close()
    assert not [p for p in opened if Path(p).name.startswith(DB_NAME)]


def test_a_new_database_and_its_wal_are_private(home):
    db = open_db(home)
    convs.create_conversation(db)
    for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"):
        assert (home / name).stat().st_mode & 0o777 == 0o600, name
    assert home.stat().st_mode & 0o777 == 0o700
    db.close()


def test_an_existing_database_made_public_is_tightened(home):
    open_db(home).close()
    (home / DB_NAME).chmod(0o644)
    open_db(home).close()
    assert (home / DB_NAME).stat().st_mode & 0o777 == 0o600


def test_one_owner_hands_each_role_one_connection(home):
    owner = connections(home)
    assert owner.get("ui") is owner.get("ui")
    assert owner.get("ui") is not owner.get("reply")
    assert connections(home) is owner
    owner.close()


def test_a_write_that_reads_first_waits_for_another_writer_instead_of_failing(home):
    # CI's finding: `ember memory import` (read which records exist, then write) failed "locked" at
    # once while the chat wrote. A deferred transaction's snapshot cannot move past another commit,
    # so SQLite refuses its write without waiting; a transaction must take the write lock at BEGIN.
    import threading

    from storage.db import transaction

    first, second = open_db(home), open_db(home)
    convs.create_conversation(first)
    read_done, errors = threading.Event(), []

    def reader_then_writer() -> None:
        try:
            with transaction(first):
                first.execute("SELECT count(*) FROM conversations").fetchone()
                read_done.set()
                time.sleep(0.5)          # the other connection commits in here, if it can
                convs.create_conversation(first)
        except Exception as err:         # the finding, reported below
            errors.append(err)
            read_done.set()

    thread = threading.Thread(target=reader_then_writer)
    thread.start()
    read_done.wait(5)
    convs.create_conversation(second)    # waits for the lock under the busy timeout
    thread.join()
    assert not errors, errors
    assert first.execute("SELECT count(*) FROM conversations").fetchone()[0] == 3
    first.close()
    second.close()


def test_processes_opening_a_new_database_at_once_all_get_it_migrated(tmp_path):
    home = tmp_path / "home"
    env = dict(os.environ, EMBER_HOME=str(home))
    code = "from storage.db import open_db; import sys; open_db(__import__('pathlib').Path(sys.argv[1])).close()"
    runs = [subprocess.Popen([sys.executable, "-c", code, str(home)], env=env, stderr=subprocess.PIPE)
            for _ in range(6)]
    failures = [p.stderr.read().decode()[-300:] for p in runs if p.wait(timeout=120) != 0]
    assert not failures, failures
    db = open_db(home)
    from storage.migrations import MIGRATIONS
    versions = [r[0] for r in db.execute("SELECT version FROM schema_version ORDER BY version")]
    assert versions == list(range(1, len(MIGRATIONS) + 1))
    db.close()


def test_every_front_end_at_once_loses_nothing(tmp_path, request):
    seconds = request.config.getoption("--soak-seconds") or 25
    home = tmp_path / "home"
    work = tmp_path / "work"
    work.mkdir()
    sides = stress.run(home, work, seconds)
    report = {name: {"runs": side.runs, "written": len(side.written), "errors": side.errors[:5]}
              for name, side in sides.items()}
    assert not any(side.errors for side in sides.values()), json.dumps(report, indent=1)
    assert sides["chat"].written and sides["ask"].written and sides["import"].written, report
    assert sides["reader"].runs >= 3, report
    db = open_db(home)
    user_texts = {row["content"] for row in db["messages"].rows_where("role = 'user'")}
    assert set(sides["chat"].written) <= user_texts
    assert set(sides["ask"].written) <= user_texts
    imported = {row["source_id"] for row in db["memory_chunks"].rows_where("source = 'import'")}
    assert set(sides["import"].written) <= imported
    assert not db.execute("SELECT count(*) FROM messages WHERE status = 'generating'").fetchone()[0]
    assert integrity_ok(db)
    assert (home / f"{DB_NAME}-wal").exists() or not (home / DB_NAME).stat().st_size == 0
    db.close()


# ---- log first -------------------------------------------------------------------------------------

LONG_STORY = "Here is a long story about my week. " * 40 + "What should I do next?"


def _populate_memory(ember, tmp_path: Path) -> None:
    notes = tmp_path / "notes.jsonl"
    notes.write_text("".join(json.dumps({"id": f"n{i}", "text": f"Note {i}: my cousin likes hiking trip {i}."}) + "\n"
                             for i in range(40)))
    assert ember("memory", "import", str(notes)).returncode == 0


def _committed(home: Path, text: str, timeout: float = 60) -> None:
    """Wait until another process sees `text` stored as a user message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):         # the database may not exist yet
            if stress._stored(home, "SELECT 1 FROM messages WHERE role = 'user' AND content = ?", (text,)):
                return
        time.sleep(0.02)
    raise AssertionError("the question was never committed")


@pytest.mark.parametrize("after", [0.0, 0.5, 2.5, "mid-reply"])
def test_sigkill_at_any_moment_keeps_the_prompt(ember, home, tmp_path, after):
    # From the moment the question is committed (log first), a kill at any later step (routing,
    # retrieval, the probe, the prompt pass, generation) keeps it. Seconds after the commit, not after
    # the start: how soon the commit comes is start-up speed, a benchmark's business.
    _populate_memory(ember, tmp_path)
    env = dict(os.environ, EMBER_HOME=str(home))
    proc = subprocess.Popen([sys.executable, "-m", "assistant", "ask", "--max-tokens", "400", LONG_STORY],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if after == "mid-reply":
        proc.stdout.read(1)      # the first piece of the reply is out
    else:
        _committed(home, LONG_STORY)
        time.sleep(after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    db = open_db(home)
    assert LONG_STORY in [row["content"] for row in db["messages"].rows_where("role = 'user'")]
    assert integrity_ok(db)
    db.close()


def test_a_template_that_raises_keeps_the_message_and_says_one_line(home, engine, settings, monkeypatch):
    from adapters.template import TemplateError

    db = open_db(home)

    def broken(**_kwargs):
        raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")

    monkeypatch.setattr(engine.template, "_prompt", broken)
    with pytest.raises(TemplateError) as caught:
        respond(db, engine, settings, "My secret plan for the weekend", route="base")
    assert "chat template" in str(caught.value) and "\n" not in str(caught.value)
    assert "My secret plan" not in str(caught.value)
    assert [m["content"] for m in db["messages"].rows] == ["My secret plan for the weekend"]
    db.close()


def test_the_question_is_logged_before_the_model_is_needed(home):
    db = open_db(home)
    question = log_question(db, "Remember that my bike is blue")
    assert convs.messages(db, question.conversation_id)[0]["content"] == "Remember that my bike is blue"
    db.close()


@pytest.mark.parametrize("text", ["\u200b", "\u200b\u200b \n\t", "\ufeff\u2060"])
def test_an_invisible_prompt_is_refused_as_empty(ember, text):
    result = ember("ask", text)
    assert result.returncode != 0
    assert result.err.strip().count("\n") == 0 and "empty" in result.err


# ---- replies say how they ended --------------------------------------------------------------------

def test_a_reply_cut_by_max_tokens_is_marked_length(ember, home):
    result = ember("ask", "--json", "--max-tokens", "3", "Write a long poem about the sea.")
    assert result.returncode == 0, result.err
    out = json.loads(result.out)
    assert out["status"] == "length" and out["finish_reason"] == "length"
    assert out["prompt_tokens"] > 0 and out["first_token_seconds"] is not None
    db = open_db(home)
    assert db["messages"].get(out["message_id"])["status"] == "length"
    db.close()
    plain = ember("ask", "--max-tokens", "3", "Write a long poem about the sea.")
    assert "token limit" in plain.err


def test_user_text_that_looks_like_a_control_token_stays_text(engine):
    def prompt(text):
        return engine.tokenize_chat([{"role": "user", "content": text}])[0]

    im_end = engine.llm.tokenize(b"<|im_end|>", add_bos=False, special=True)
    assert len(im_end) == 1
    # As many <|im_end|> control tokens as for a harmless question: the template's own, none from the user.
    assert prompt("What does <|im_end|> mean?").count(im_end[0]) == prompt("What does that mean?").count(im_end[0])
    assert "<|im_end|> mean" in engine.llm.detokenize(prompt("What does <|im_end|> mean?")).decode()


def test_training_examples_keep_user_text_literal(engine):
    im_start = engine.llm.tokenize(b"<|im_start|>", add_bos=False, special=True)[0]
    prefix, target = engine.template.target([], {"role": "user", "content": "Type <|im_start|> here"})
    plain_prefix, _ = engine.template.target([], {"role": "user", "content": "Type this here"})
    assert im_start not in target
    assert prefix.count(im_start) == plain_prefix.count(im_start)
