"""Regenerate and branches in the chat app (issue 22 §1): Textual pilots on the real model and database."""
from __future__ import annotations

import dataclasses

from textual.widgets import TextArea

from assistant.tui.app import EmberApp
from assistant.tui.screens.edit_reply import EditReplyScreen
from assistant.tui.widgets.message import MessageView
from storage import conversations as convs
from tests.test_tui import SIZE, chat, header, notified, send
from tests.tui_helpers import wait_until


def shown(app) -> list[tuple[str, int | None, str]]:
    """The messages on screen: (role, id, their place among alternatives as the header says it)."""
    return [(v.role, v.message_id, header(v)) for v in chat(app).query(MessageView)]


async def test_regenerate_keeps_the_old_reply_and_alternatives_page_and_edits_branch(settings, engine, db):
    app = EmberApp(dataclasses.replace(settings, max_tokens=6), engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        screen = chat(app)
        await pilot.press("f3", "f3")                 # memory off: the base model answers, no router
        await send(pilot, "Name a fruit.")
        await wait_until(pilot, lambda: not screen.generating)
        cid = screen.conversation_id
        question, first = [m["id"] for m in convs.messages(db, cid)]

        await pilot.press("ctrl+g")                   # regenerate: a second reply beside the first
        await wait_until(pilot, lambda: not screen.generating and len(convs.messages(db, cid)) == 3)
        second = convs.messages(db, cid)[-1]
        assert second["role"] == "assistant" and second["parent_id"] == question and second["status"] != "generating"
        assert [m["id"] for m in convs.branch(db, cid)] == [question, second["id"]]
        views = list(screen.query(MessageView))
        assert len(views) == 2 and views[1].message_id == second["id"] and "‹ 2/2 ›" in header(views[1])

        await pilot.press("alt+left")                 # page back to the first reply: it is the kept one now
        await pilot.pause()
        assert [m["id"] for m in convs.branch(db, cid)] == [question, first]
        assert [(r, i) for r, i, _ in shown(app)] == [("user", question), ("assistant", first)]
        assert "‹ 1/2 ›" in shown(app)[1][2]
        await pilot.press("alt+left")                 # there is nothing before the first
        assert notified(app, "first alternative")

        # ↑ in the empty prompt goes up to the messages; ↑ again to the question; Enter edits it.
        await pilot.press("up")
        assert screen.focused is screen.query(MessageView)[-1]
        await pilot.press("up", "enter")
        await wait_until(pilot, lambda: isinstance(app.screen, EditReplyScreen), timeout=10)
        area = app.screen.query_one(TextArea)
        assert area.text == "Name a fruit."
        area.load_text("Name a vegetable.")
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: app.screen is screen and not screen.generating)
        rows = convs.messages(db, cid)
        edited = [m for m in rows if m["content"] == "Name a vegetable."]
        assert len(rows) == 5 and len(edited) == 1 and edited[0]["parent_id"] is None
        kept = convs.branch(db, cid)
        assert [m["id"] for m in kept[:1]] == [edited[0]["id"]] and len(kept) == 2
        assert kept[1]["parent_id"] == edited[0]["id"] and kept[1]["status"] != "generating"
        assert [(r, i) for r, i, _ in shown(app)] == [("user", edited[0]["id"]), ("assistant", kept[1]["id"])]
        assert "‹ 2/2 ›" in shown(app)[0][2]

        # The old branch is still there: ← on the edited message goes back to it, whole.
        screen.query(MessageView)[0].focus()
        await pilot.press("left")
        await pilot.pause()
        assert [m["content"] for m in convs.branch(db, cid)][0] == "Name a fruit."
        assert [(r, i) for r, i, _ in shown(app)][0] == ("user", question)
        assert app.screen.focused is screen.query(MessageView)[0]

        # The model reads the kept branch only: a follow-up's history has the fruit, not the vegetable.
        await pilot.press("escape")
        await send(pilot, "And another?")
        await wait_until(pilot, lambda: not screen.generating)
        kept = convs.branch(db, cid)
        assert [m["content"] for m in kept][0] == "Name a fruit." and kept[-2]["content"] == "And another?"
        assert "Name a vegetable." not in [m["content"] for m in kept]
