"""The `ember` command as a user runs it: the real CLI in a subprocess, the real model, real files."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from storage import conversations as convs
from storage.db import DB_NAME, open_db
from tests.conftest import another_process_holds_the_lock, assert_clean_error, without_root_overrides

GREEDY = ("--temperature", "0", "--seed", "1")


def test_ask_json_follows_the_contract_and_is_logged(ember, home):
    result = ember("ask", "Say hello.", "--json", "--max-tokens", "8", *GREEDY)
    assert result.returncode == 0, result.err
    answer = json.loads(result.out)
    assert {"conversation_id", "message_id", "text", "route", "adapter", "tokens", "seconds"} <= set(answer)
    assert answer["route"] == "base" and answer["adapter"] is None
    assert 0 < answer["tokens"] <= 9 and answer["text"]
    db = open_db(home)
    reply = db["messages"].get(answer["message_id"])
    assert (reply["content"], reply["status"], reply["role"]) == (answer["text"], answer["status"], "assistant")
    assert answer["status"] in ("complete", "length")   # 8 tokens may cut it: then it says so
    question = db["messages"].get(answer["message_id"] - 1)
    assert question["content"] == "Say hello." and question["created"] <= reply["created"]


def test_ask_streams_the_same_text_it_stores(ember, home):
    result = ember("ask", "Name three colours.", "--max-tokens", "24", *GREEDY)
    assert result.returncode == 0, result.err
    stored = open_db(home).execute(
        "SELECT content FROM messages WHERE role = 'assistant'").fetchone()[0]
    assert result.out == stored + "\n"


def test_ask_reads_the_prompt_from_a_pipe(ember):
    result = ember("ask", "--json", "--max-tokens", "4", *GREEDY, input="What is two plus two?")
    assert result.returncode == 0, result.err
    assert json.loads(result.out)["text"]


def test_no_log_stores_nothing(ember, home):
    result = ember("ask", "Say hi.", "--no-log", "--json", "--max-tokens", "4", *GREEDY)
    answer = json.loads(result.out)
    assert answer["conversation_id"] is None and answer["message_id"] is None
    assert open_db(home)["messages"].count == 0


def test_conversation_continues_with_its_history_in_context(ember, home):
    first = json.loads(ember("ask", "My name is Zoltan.", "--json", "--max-tokens", "8", *GREEDY).out)
    second = ember("ask", "What is my name?", "--conversation", str(first["conversation_id"]),
                   "--json", "--max-tokens", "16", *GREEDY)
    answer = json.loads(second.out)
    assert answer["conversation_id"] == first["conversation_id"]
    assert "Zoltan" in answer["text"]   # only the history can have told it
    history = json.loads(ember("history", "--json").out)
    assert len(history) == 1 and len(history[0]["messages"]) == 4


def test_history_export_and_forget(ember, home, tmp_path):
    for prompt in ("Plan a picnic", "Recipe for pancakes"):
        assert ember("ask", prompt, "--max-tokens", "4", *GREEDY).returncode == 0
    history = json.loads(ember("history", "--json", "--limit", "1").out)
    assert [c["title"] for c in history] == ["Recipe for pancakes"]
    text = ember("history").out
    assert "Plan a picnic" in text and "Recipe for pancakes" in text
    assert "pancakes" in ember("history", "--search", "pancake").out

    out = tmp_path / "export.json"
    assert ember("export", "-o", str(out)).returncode == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    exported = json.loads(out.read_text())
    assert [c["title"] for c in exported["conversations"]] == ["Plan a picnic", "Recipe for pancakes"]
    md = ember("export", "--format", "md").out
    assert md.startswith("# Ember conversations") and "## Plan a picnic" in md and "**user**" in md

    gone = json.loads(ember("forget", "--match", "picnic", "--yes", "--json").out)
    assert gone["deleted"]["messages"] == 2        # the question and its reply
    assert json.loads(ember("history", "--search", "picnic", "--json").out) == []
    cid = history[0]["id"]
    assert ember("forget", "--conversation", str(cid), "--yes").returncode == 0
    remaining = json.loads(ember("history", "--json").out)
    assert all(c["id"] != cid for c in remaining)
    assert ember("forget", "--all", "--yes", "--json").returncode == 0
    assert json.loads(ember("history", "--json").out) == []


def test_status_reports_model_and_log_without_loading_the_model(ember, model_path):
    status = json.loads(ember("status", "--json").out)
    assert status["model"]["path"] == str(model_path)
    assert status["adapter"] is None
    assert status["database"]["messages"] == 0 and status["database"]["schema_version"] >= 3
    assert {"privacy", "memory", "daemon"} <= set(status) and status["memory"]["chunks"] == 0


@pytest.mark.parametrize("args, message", [
    (("ask", "hi", "--model", "/nonexistent/model.gguf"), "does not exist"),
    (("ask", "hi", "--model", "/tmp"), "is a directory"),
    (("ask", "   "), "empty"),
    (("ask", "hi", "--route", "adapter"), "needs an active adapter"),
    (("ask", "hi", "--conversation", "999"), "no conversation with id 999"),
    (("forget",), "exactly one of"),
    (("forget", "--message", "42"), "no message with id 42"),
    (("history", "--conversation", "7"), "no conversation with id 7"),
])
def test_bad_input_is_one_clear_line_and_a_nonzero_exit(ember, args, message):
    assert_clean_error(ember(*args), contains=message)


def test_corrupt_and_truncated_models_are_refused(ember, tmp_path, model_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(2048))
    assert_clean_error(ember("ask", "hi", "--model", str(junk)), contains="not a GGUF")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(model_path.read_bytes()[:100_000])
    assert_clean_error(ember("ask", "hi", "--model", str(truncated)), contains="could not load")


def test_invalid_utf8_from_a_pipe_is_refused_and_nothing_is_stored(ember, home):
    assert_clean_error(ember("ask", input=b"caf\xe9 au lait"), contains="not valid UTF-8")
    assert open_db(home)["messages"].count == 0


def test_a_prompt_longer_than_the_context_is_refused_and_kept(ember, home):
    result = ember("ask", "-", input="lorem ipsum " * 5000)
    assert_clean_error(result, contains="context holds")
    # Log first: what the user wrote is stored before anything can refuse it; no reply row is left.
    rows = list(open_db(home)["messages"].rows)
    assert [(m["role"], m["content"]) for m in rows] == [("user", "lorem ipsum " * 5000)]


def test_a_locked_database_is_a_clear_error_and_loses_nothing(ember, home):
    assert ember("ask", "First question", "--max-tokens", "4", *GREEDY).returncode == 0
    with another_process_holds_the_lock(home):
        assert_clean_error(ember("ask", "Second question", "--max-tokens", "4", *GREEDY,
                                 env={"EMBER_BUSY_TIMEOUT_MS": "300"}), contains="locked")
    assert [m["content"] for m in open_db(home)["messages"].rows if m["role"] == "user"] == ["First question"]


def test_a_corrupt_database_is_a_clear_error(ember, home):
    home.mkdir(mode=0o700)
    (home / DB_NAME).write_bytes(b"garbage" * 1000)
    assert_clean_error(ember("history"), contains="unreadable")


def test_an_unreadable_data_dir_is_a_clear_error(home):
    home.mkdir(mode=0o700)
    home.chmod(0)
    try:
        env = dict(os.environ, EMBER_HOME=str(home))
        result = subprocess.run([*without_root_overrides(), sys.executable, "-m", "assistant", "status"],
                                capture_output=True, text=True, env=env)
        result.out, result.err = result.stdout, result.stderr
        assert_clean_error(result, contains="not readable")
    finally:
        home.chmod(0o700)


def test_sigkill_mid_reply_loses_no_earlier_message_and_keeps_the_database_sound(ember, home):
    assert ember("ask", "Remember: the spare key is under the blue pot.", "--max-tokens", "8",
                 *GREEDY).returncode == 0
    env = dict(os.environ, EMBER_HOME=str(home))
    proc = subprocess.Popen([sys.executable, "-m", "assistant", "ask", "Write a very long story about the sea.",
                             "--max-tokens", "1500", "--conversation", "1", *GREEDY],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    db = open_db(home)
    deadline = time.monotonic() + 60
    partial = ""
    while time.monotonic() < deadline and not partial:
        row = db.execute("SELECT content FROM messages WHERE status = 'generating'").fetchone()
        partial = row[0] if row else ""
        time.sleep(0.05)
    assert partial, "the streaming reply should be saved while it is written"
    during = json.loads(ember("history", "--json").out)
    assert during[0]["messages"][-1]["status"] == "generating"    # its live writer keeps it
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    db.close()

    history = json.loads(ember("history", "--json").out)
    contents = [m["content"] for m in history[0]["messages"]]
    assert contents[0] == "Remember: the spare key is under the blue pot."
    assert contents[2] == "Write a very long story about the sea."
    last = history[0]["messages"][-1]
    assert last["status"] == "interrupted" and last["content"].startswith(partial)
    db = open_db(home)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_sigterm_mid_reply_marks_it_interrupted(ember, home):
    env = dict(os.environ, EMBER_HOME=str(home))
    proc = subprocess.Popen([sys.executable, "-m", "assistant", "ask", "Write a very long story.",
                             "--max-tokens", "1500", *GREEDY],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout.read(20)   # it has started streaming
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and b"Traceback" not in err
    reply = open_db(home).execute("SELECT status, content FROM messages WHERE role = 'assistant'").fetchone()
    assert reply[0] == "interrupted" and reply[1]


def test_odd_dates_and_titles_never_hide_the_history_or_break_the_export(ember, home):
    db = open_db(home)
    rows = {}
    for title, text in (("Fine", "A normal question"), ("", "An untitled one"),
                        ("Red\x1b[31m alert\nsecond line\u202e\u200b", "Escapes in the title")):
        rows[text] = convs.create_conversation(db)
        convs.add_message(db, rows[text], "user", text)
        db["conversations"].update(rows[text], {"title": title})
    odd = rows["An untitled one"]
    db["conversations"].update(odd, {"updated": "last Tuesday", "created": 1700000000})
    db.execute("UPDATE messages SET created = 'soon' WHERE conversation_id = ?", [odd])
    db.conn.commit()

    result = ember("history")
    assert result.returncode == 0, result.err
    assert f"#{odd} Untitled  (date unknown, 1 messages)" in result.out
    assert "A normal question" in result.out and "Red alert second line" in result.out
    assert "\x1b" not in result.out and "\u202e" not in result.out
    assert ember("history", "--conversation", str(odd)).returncode == 0
    assert len(json.loads(ember("history", "--json").out)) == 3
    md = ember("export", "--format", "md")
    assert md.returncode == 0, md.err
    headings = [line for line in md.out.splitlines() if line.startswith("## ")]
    assert sorted(headings) == ["## Fine", "## Red alert second line", "## Untitled"]
    assert "**user** — date unknown" in md.out and "started date unknown" in md.out
    exported = {c["id"]: c for c in json.loads(ember("export").out)["conversations"]}
    assert exported[odd]["updated"] == "last Tuesday"          # the JSON export keeps what is stored


def test_a_reply_left_generating_by_a_pid_now_used_by_another_program_shows_as_interrupted(ember, home):
    db = open_db(home)
    cid = convs.create_conversation(db)
    convs.add_message(db, cid, "user", "Tell me a story")
    reply = convs.start_reply(db, cid)
    convs.update_reply(db, reply, "Once upon")
    other = subprocess.Popen(["sleep", "60"])       # the writer is gone; its pid now runs something else
    try:
        db["messages"].update(reply, {"writer_pid": other.pid})
        result = ember("history")
        assert f"assistant {reply} [interrupted]: Once upon" in result.out, result.out + result.err
    finally:
        other.kill()
        other.wait()
    assert db["messages"].get(reply)["status"] == "interrupted"
