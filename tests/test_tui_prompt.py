"""The chat's prompt keeps whatever the user typed or pasted, whole and literal (issue 14 §4).

Pilots on the real app; tests/test_tui_pty.py does the same in a real terminal.
"""
from __future__ import annotations

import dataclasses

import pytest
from textual import events

from assistant.tui.app import EmberApp
from assistant.tui.screens.chat import ChatScreen
from assistant.tui.widgets.message import MessageView
from assistant.tui.widgets.prompt import PromptInput
from storage import conversations as convs
from tests.tui_helpers import type_text, wait_until

SIZE = (120, 40)


@pytest.fixture
def quick(settings):
    """Short replies: these tests are about what the user sent."""
    return dataclasses.replace(settings, max_tokens=8)


def prompt_of(app) -> PromptInput:
    return app.screen.query_one(PromptInput)


async def press_enter(pilot) -> None:
    """Enter, then wait until the prompt has decided it meant "send" (it waits a moment for a paste)."""
    await pilot.press("enter")
    prompt = prompt_of(pilot.app)
    await wait_until(pilot, lambda: not prompt.submit_pending, timeout=10)


async def paste(pilot, text: str) -> None:
    """A bracketed paste, as the terminal driver delivers it."""
    pilot.app.post_message(events.Paste(text))
    await pilot.pause()


def user_messages(db) -> list[str]:
    return [r["content"] for r in db["messages"].rows_where("role = 'user'", order_by="id")]


async def test_a_multi_line_paste_is_kept_whole_and_sent_as_one_message(quick, engine, db):
    text = "picnic:\n- bread\n- cheese\n\n  indented\tand tabbed"
    app = EmberApp(quick, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await paste(pilot, text)
        assert prompt_of(app).text == text        # every line, every space, in the box
        await press_enter(pilot)
        await wait_until(pilot, lambda: not app.screen.generating)
        assert user_messages(db) == [text]
        assert app.screen.query(MessageView)[0].content == text
        assert prompt_of(app).text == ""


@pytest.mark.parametrize("before, after", [("sidebar", "prompt"), ("prompt", "sidebar")])
async def test_a_paste_lands_once_in_the_prompt_when_the_focus_moves_while_it_arrives(quick, engine, before, after):
    """The app routes a paste by the focus at the moment it arrives; focus() is applied later (at start-up
    the screen's auto-focus and the prompt's focus race). The paste must land in the prompt once either way:
    the old check ("is the prompt focused now?") lost it when the focus reached the prompt in between,
    which made the paste test above fail now and then on a loaded machine."""
    app = EmberApp(quick, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        widgets = {"sidebar": app.screen.query_one("#sidebar"), "prompt": prompt_of(app)}
        app.set_focus(widgets[before])
        await pilot.pause()
        app.post_message(events.Paste("one\ntwo"))
        widgets[after].focus()
        await pilot.pause()
        assert prompt_of(app).text == "one\ntwo"


async def test_ctrl_j_shift_enter_and_alt_enter_add_lines_and_enter_sends(quick, engine, db):
    app = EmberApp(quick, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await type_text(pilot, "one")
        await pilot.press("ctrl+j")
        await type_text(pilot, "two")
        await pilot.press("shift+enter")
        await type_text(pilot, "three")
        await pilot.press("alt+enter")
        await type_text(pilot, "four")
        assert prompt_of(app).text == "one\ntwo\nthree\nfour" and not user_messages(db)
        await press_enter(pilot)
        await wait_until(pilot, lambda: not app.screen.generating)
        assert user_messages(db) == ["one\ntwo\nthree\nfour"]


async def test_returns_arriving_in_one_burst_are_line_breaks_not_sends(quick, engine, db):
    """A paste without brackets arrives as keys: its returns come with the text right behind them."""
    app = EmberApp(quick, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        for ch in "bread\rcheese\rfruit":   # posted at once, as the terminal driver does with one read
            app.post_message(events.Key("enter", "\r") if ch == "\r" else events.Key(ch, ch))
        await pilot.pause(0.3)
        assert prompt_of(app).text == "bread\ncheese\nfruit" and not user_messages(db)
        await press_enter(pilot)               # pressed by a person: nothing follows it, so it sends
        await wait_until(pilot, lambda: not app.screen.generating)
        assert user_messages(db) == ["bread\ncheese\nfruit"]


async def test_the_prompt_grows_with_its_lines_then_scrolls(settings, engine):
    app = EmberApp(settings, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        prompt = prompt_of(app)
        one_line = prompt.outer_size.height
        await paste(pilot, "a\nb\nc")
        assert prompt.outer_size.height == one_line + 2
        await paste(pilot, "".join(f"\nline {i}" for i in range(30)))
        await pilot.pause()
        assert prompt.outer_size.height == 8                  # capped by the stylesheet
        assert prompt.scroll_offset.y > 0 and prompt.cursor_location[0] == 32   # the cursor stays in view
        assert prompt.text.count("\n") == 32


async def test_a_prompt_of_only_invisible_characters_is_refused_and_kept(settings, engine, db):
    app = EmberApp(settings, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await paste(pilot, "\u200b\u200b")
        await press_enter(pilot)
        assert any("empty" in n.message and n.severity == "warning" for n in app._notifications)
        assert prompt_of(app).text == "\u200b\u200b"          # left for the user to fix
        assert not app.screen.generating and db["messages"].count == 0 and db["conversations"].count == 0


async def test_a_paste_while_the_sidebar_has_focus_lands_in_the_prompt(settings, engine, db):
    picnic = convs.create_conversation(db)
    convs.add_message(db, picnic, "user", "Ideas for a picnic")
    app = EmberApp(settings, engine=engine, conversation_id=picnic)
    async with app.run_test(size=SIZE) as pilot:
        app.screen.query_one("#sidebar").focus()
        await pilot.pause()
        await paste(pilot, "first\nsecond")
        assert prompt_of(app).text == "first\nsecond" and prompt_of(app).has_focus


async def test_keys_typed_after_an_enter_are_kept_when_it_sends(quick, engine, db):
    app = EmberApp(quick, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await type_text(pilot, "first")
        await press_enter(pilot)
        assert user_messages(db) == ["first"] and prompt_of(app).text == ""
        await type_text(pilot, "typed while it replies")
        await wait_until(pilot, lambda: not app.screen.generating)
        assert prompt_of(app).text == "typed while it replies"   # a send never takes what came after
        assert isinstance(app.screen, ChatScreen)
