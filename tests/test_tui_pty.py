"""The real `ember chat` in a real terminal (tmux): what the user sees and what gets stored.

Pilots run headless and never lose a frame; these tests catch what only a terminal shows (a first paint
written while llama.cpp had the terminal's descriptor pointed at /dev/null), and what only a terminal
sends (bracketed pastes, pastes without brackets, returns vs line feeds).
"""
from __future__ import annotations

import json
import os
import sys
import time

import pytest

from storage import conversations as convs
from storage.db import open_db
from tests.tui_helpers import TmuxRun, gguf_with_template

READY = "│ ready"


def idle(screen: str) -> bool:
    """The status line says Ember is waiting for the user (after a reply: `ready`, or how it ended)."""
    return READY in screen or "│ reply " in screen


@pytest.fixture
def chat_env(home):
    """`ember chat` with short replies (config.toml), in this test's data directory."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    config = home / "config.toml"
    config.write_text("max_tokens = 8\ntemperature = 0.0\n")
    config.chmod(0o600)
    return dict(os.environ, EMBER_HOME=str(home))


def stored_user_messages(ember) -> list[str]:
    """What `ember history --json` says the user wrote, oldest first."""
    result = ember("history", "--json")
    assert result.returncode == 0, result.err
    found = []
    for conversation in json.loads(result.out):
        found += [m for m in conversation["messages"] if m["role"] == "user"]
    return [m["content"] for m in sorted(found, key=lambda m: m["id"])]


def replies_done(home) -> bool:
    db = open_db(home)
    try:
        return db.execute("SELECT COUNT(*) FROM messages WHERE status = 'generating'").fetchone()[0] == 0
    finally:
        db.close()


def send_and_wait(term: TmuxRun, home, ember, expected: str) -> None:
    """Press Enter and wait until `expected` is stored and its reply has been written."""
    term.keys("Enter")
    deadline = time.monotonic() + 180
    while not (stored_user_messages(ember)[-1:] == [expected] and replies_done(home)):
        assert time.monotonic() < deadline, f"never stored: {expected!r}; screen:\n{term.screen()}"
        time.sleep(0.3)
    term.wait_for(idle)


def test_a_past_conversation_is_on_screen_at_first_paint(home, chat_env):
    """`ember chat --conversation N` painted only the footer, status and prompt in 14 of 16 tries."""
    db = open_db(home)
    cid = convs.create_conversation(db)
    for i in range(3):
        convs.add_message(db, cid, "user", f"Question {i} about the picnic")
        convs.add_message(db, cid, "assistant", f"Answer {i}: bring **sandwiches** and fruit.")
    db.close()
    blank = 0
    for _ in range(8):
        term = TmuxRun(["chat", "--conversation", str(cid)], chat_env)
        try:
            term.wait_for(READY)
            try:   # the model has loaded; the messages must be on screen without a resize
                term.wait_for(lambda s: "Question 0 about the picnic" in s and "Answer 2: bring" in s, timeout=5)
            except AssertionError:
                blank += 1
        finally:
            term.close()
    assert blank == 0, f"{blank} of 8 first paints left the conversation blank"


# A Textual app that paints while another thread points descriptor 2 at /dev/null for a second, as
# llama-cpp-python's quiet model load does (the engine no longer does, but any other loader may).
REDIRECTING_APP = """
import os, sys, threading, time
from textual.app import App
from textual.widgets import Static
from assistant.tui.driver import PrivateOutputDriver

class Probe(App):
    def compose(self):
        yield Static("starting", id="text")
        yield Static("loading", id="status")

    def on_mount(self):
        self.call_after_refresh(threading.Thread(target=self.quiet_load).start)

    def quiet_load(self):
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        self.call_from_thread(self.query_one("#text").update, "painted during the load")
        time.sleep(1.0)
        os.dup2(saved, 2)
        self.call_from_thread(self.query_one("#status").update, "ready")   # as the chat's status line

Probe(driver_class=PrivateOutputDriver if sys.argv[1] == "private" else None).run()
"""


@pytest.mark.parametrize("driver, shown", [("private", True), ("textual", False)])
def test_frames_painted_while_stderr_is_redirected_reach_the_terminal(driver, shown, tmp_path):
    """The chat's driver keeps frames that Textual's own loses (the control run shows the fault)."""
    term = TmuxRun([driver], dict(os.environ), program=[sys.executable, "-c", REDIRECTING_APP])
    try:
        term.wait_for("ready", timeout=60)    # the "load" is over and what changed since is painted
        time.sleep(0.5)
        assert ("painted during the load" in term.screen()) is shown
    finally:
        term.close()


def test_pastes_and_new_lines_in_a_real_terminal_are_stored_whole(home, chat_env, ember):
    term = TmuxRun(["chat"], chat_env)
    try:
        term.wait_for(READY)
        # A bracketed paste, byte for byte as a terminal sends it, then Enter.
        term.keys("\x1b[200~line1\nline2\nline3\x1b[201~", literal=True)
        term.wait_for("line3")
        send_and_wait(term, home, ember, "line1\nline2\nline3")

        # tmux's own paste: bracketed (the app asked for it), line feeds turned into returns.
        term.paste("picnic:\n- bread\n- cheese")
        term.wait_for("- cheese")
        send_and_wait(term, home, ember, "picnic:\n- bread\n- cheese")

        # No brackets, line feeds: they are Ctrl+J, a new line (the old prompt glued "picnic:- bread").
        term.keys("one\ntwo\nthree", literal=True)
        term.wait_for("three")
        send_and_wait(term, home, ember, "one\ntwo\nthree")

        # No brackets, returns: Enters with the text right behind them are line breaks, not sends.
        term.keys("red\rgreen\rblue", literal=True)
        term.wait_for("blue")
        time.sleep(0.5)
        assert stored_user_messages(ember)[-1] == "one\ntwo\nthree"   # nothing was sent early
        send_and_wait(term, home, ember, "red\ngreen\nblue")

        # Typed by hand: Ctrl+J adds a line, Enter sends.
        term.keys("first", literal=True)
        term.keys("C-j")
        term.keys("second", literal=True)
        term.wait_for("second")
        send_and_wait(term, home, ember, "first\nsecond")
    finally:
        term.close()
    assert stored_user_messages(ember) == ["line1\nline2\nline3", "picnic:\n- bread\n- cheese",
                                           "one\ntwo\nthree", "red\ngreen\nblue", "first\nsecond"]


def test_a_chat_template_that_raises_is_one_line_in_the_chat_not_a_crash(home, chat_env, ember, model_path,
                                                                          tmp_path):
    from tests.test_tui_replies import ALTERNATING

    broken = gguf_with_template(model_path, tmp_path / "alternating.gguf", ALTERNATING)
    db = open_db(home)
    cid = convs.create_conversation(db)
    convs.add_message(db, cid, "user", "Tell me about tides, secret 7731.")
    db.close()
    term = TmuxRun(["chat", "--model", str(broken), "--conversation", str(cid)], chat_env)
    try:
        term.wait_for(READY)
        term.keys("And the moon? secret 4410", literal=True)
        term.keys("Enter")
        screen = term.wait_for(lambda s: "not answered" in s and "Conversation roles must" in s)
        assert "Traceback" not in screen
        time.sleep(1)
        assert term.running()                  # the chat goes on
        assert stored_user_messages(ember) == ["Tell me about tides, secret 7731.", "And the moon? secret 4410"]
        term.keys("C-q")
        assert term.exit_status() == 0
        after = term.screen()
        assert "Traceback" not in after and "secret" not in after   # nothing printed on the way out
    finally:
        term.close()
