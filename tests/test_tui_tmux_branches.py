"""Under tmux, as a person uses it (issue 22 tests): a multi-line paste, a regenerate, a branch."""
from __future__ import annotations

import time

from storage import conversations as convs
from storage.db import open_db
from tests.test_tui_pty import chat_env, idle, replies_done, stored_user_messages  # noqa: F401 (fixture)
from tests.tui_helpers import TmuxRun


def wait_stored(home, count: int, term: TmuxRun) -> list[dict]:
    """Until the log holds `count` messages, none still being written; returns them."""
    deadline = time.monotonic() + 180
    while True:
        db = open_db(home)
        try:
            rows = [dict(r) for r in db["messages"].rows_where(order_by="id")]
        finally:
            db.close()
        if len(rows) >= count and replies_done(home):
            term.wait_for(idle)
            return rows
        assert time.monotonic() < deadline, f"never stored {count} messages; screen:\n{term.screen()}"
        time.sleep(0.3)


def test_paste_regenerate_and_branch_in_a_real_terminal(home, chat_env, ember):
    term = TmuxRun(["chat"], chat_env, size=(120, 40))
    try:
        term.wait_for("│ ready")
        term.keys("F3", "F3")                          # memory off: the base model answers at once
        term.paste("Shopping list:\n- bread\n- cheese")
        term.keys("Enter")
        rows = wait_stored(home, 2, term)
        assert rows[0]["content"] == "Shopping list:\n- bread\n- cheese"

        term.keys("C-g")                               # regenerate: the old reply stays beside the new
        rows = wait_stored(home, 3, term)
        assert rows[2]["role"] == "assistant" and rows[2]["parent_id"] == rows[0]["id"]
        term.wait_for("‹ 2/2 ›")

        term.keys("Up", "Up", "Enter")                 # up to my message, Enter edits it into a branch
        term.wait_for("Edit your message")
        time.sleep(0.5)                                # as a person reads the dialog before typing
        for key in ("Up", "Up", "C-a"):                 # to the start of the first line, key by key
            term.keys(key)
            time.sleep(0.2)
        term.keys("Weekly ", literal=True)
        term.keys("C-s")
        rows = wait_stored(home, 5, term)
        edited = rows[3]
        assert edited["content"] == "Weekly Shopping list:\n- bread\n- cheese" and edited["parent_id"] is None
        screen = term.wait_for(lambda s: s.count("‹ 2/2 ›") >= 1 and "Weekly Shopping list:" in s)
        assert "- cheese" in screen
        db = open_db(home)
        try:
            assert [m["id"] for m in convs.branch(db, rows[0]["conversation_id"])] == [edited["id"], rows[4]["id"]]
        finally:
            db.close()
        term.keys("C-q")
        assert term.exit_status() == 0
    finally:
        term.close()
