"""The context view (issue 22 §4): what the model saw for a reply, toggled under it, on the real model."""
from __future__ import annotations

import dataclasses

from assistant.tui.app import EmberApp
from assistant.tui.widgets.context_bar import ContextBar
from assistant.tui.widgets.message import MessageView
from storage import conversations as convs
from tests.conftest import N_CTX
from tests.test_tui import chat, send
from tests.tui_helpers import wait_until


async def test_ctrl_o_shows_a_stored_replys_context_with_the_history_that_no_longer_fit(settings, engine, db):
    cid = convs.create_conversation(db)
    for i in range(8):
        convs.add_message(db, cid, "user", f"Note {i}: " + "the quick brown fox jumps over the lazy dog " * 30)
        convs.add_message(db, cid, "assistant", f"Noted, number {i}.")
    convs.add_message(db, cid, "user", "What was note 0 about?")
    convs.add_message(db, cid, "assistant", "A fox.", tokens=3)
    app = EmberApp(dataclasses.replace(settings, max_tokens=8), engine=engine, conversation_id=cid)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = chat(app)
        await pilot.press("ctrl+o")                   # the last reply's context, rebuilt from the log
        reply = screen.query(MessageView)[-1]
        await wait_until(pilot, lambda: bool(reply.query(ContextBar)), timeout=30)
        found = reply.query_one(ContextBar).budget
        assert found.n_ctx == N_CTX and found.reserved == 8 and found.reply == 3
        assert 0 < found.dropped_messages < 16 and found.dropped_messages % 2 == 0   # whole exchanges
        assert found.history_messages == 16 - found.dropped_messages and found.dropped_tokens > 0
        assert found.prompt + found.reserved <= N_CTX and found.history > found.question > 0
        assert found.prompt == found.system + found.memories + found.history + found.question
        shown = str(reply.query_one(ContextBar).render())
        assert f"{found.dropped_messages} older messages" in shown and "history" in shown
        await pilot.press("ctrl+o")                   # again: hidden
        await pilot.pause()
        assert not reply.query(ContextBar)

        # The first reply, focused: nothing before it, nothing dropped.
        screen.query(MessageView)[1].focus()
        await pilot.press("ctrl+o")
        first = screen.query(MessageView)[1]
        await wait_until(pilot, lambda: bool(first.query(ContextBar)), timeout=30)
        old = first.query_one(ContextBar).budget
        assert old.history_messages == 0 and old.dropped_messages == 0 and old.question > 0


async def test_an_incognito_reply_shows_its_context_from_the_screen_alone(settings, engine, db):
    app = EmberApp(dataclasses.replace(settings, max_tokens=6), engine=engine)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = chat(app)
        await pilot.press("f9", "f3", "f3")
        await send(pilot, "Hello there.")
        await wait_until(pilot, lambda: not screen.generating)
        await send(pilot, "And again.")
        await wait_until(pilot, lambda: not screen.generating)
        await pilot.press("ctrl+o")
        reply = screen.query(MessageView)[-1]
        await wait_until(pilot, lambda: bool(reply.query(ContextBar)), timeout=30)
        found = reply.query_one(ContextBar).budget
        assert found.history_messages == 2 and found.history > 0 and found.memories == 0
        assert db["messages"].count == 0
