"""Input and conventions in the chat app (issue 22 §6): the help screen lists every key, the footer's keys
fit in 100 columns with quit among them, and the prompt's hint stays in sight while typing."""
from __future__ import annotations

from textual.binding import Binding
from textual.widgets import DataTable
from textual.widgets._footer import FooterKey

from assistant.tui.app import EmberApp
from assistant.tui.screens.chat import ChatScreen
from assistant.tui.screens.help import HelpScreen
from assistant.tui.widgets.message import MessageView
from assistant.tui.widgets.prompt import PromptInput
from tests.test_tui import chat
from tests.tui_helpers import seed_conversations, type_text, wait_until


async def test_f1_lists_every_key_of_the_chat_a_message_and_the_prompt(settings, engine):
    app = EmberApp(settings, engine=engine)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("f1")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen), timeout=10)
        table = app.screen.query_one(DataTable)
        rows = [tuple(str(cell) for cell in table.get_row_at(i)) for i in range(table.row_count)]
        listed = {(key, where) for key, _does, where in rows}
        for binding in Binding.make_bindings(ChatScreen.BINDINGS):
            assert (app.get_key_display(binding), "chat") in listed, binding.key
        for binding in Binding.make_bindings(MessageView.BINDINGS):
            assert (app.get_key_display(binding), "a focused message") in listed, binding.key
        assert {app.get_key_display(Binding(k, "")) for k in ("enter", "ctrl+j", "up")} <= {
            key for key, _does, where in rows if where == "prompt"}
        assert any("Regenerate" in does or "again" in does for _key, does, _where in rows)
        await pilot.press("escape")
        assert isinstance(app.screen, ChatScreen)


async def test_the_footer_keys_fit_in_100_columns_quit_included(settings, engine):
    app = EmberApp(settings, engine=engine)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        keys = [k for k in app.screen.query(FooterKey)]
        shown = {k.key for k in keys}
        assert {"ctrl+q", "ctrl+n", "ctrl+g", "f1", "ctrl+p"} <= shown
        for key in keys:
            assert key.region.width > 0 and key.region.right <= 100, (key.key, key.region)


async def test_the_prompt_hint_stays_while_typing_and_the_box_grows(settings, engine, db):
    seed_conversations(db)
    app = EmberApp(settings, engine=engine)
    async with app.run_test(size=(120, 40)) as pilot:
        prompt = chat(app).query_one(PromptInput)
        assert "Ctrl+J" in str(prompt.border_subtitle) and "Shift+Enter" in str(prompt.border_subtitle)
        before = prompt.region.height
        await type_text(pilot, "first line")
        await pilot.press("ctrl+j")
        await type_text(pilot, "second line")
        await pilot.press("ctrl+j")
        await pilot.pause()
        assert prompt.text == "first line\nsecond line\n"
        assert prompt.region.height == before + 2
        assert "Ctrl+J" in str(prompt.border_subtitle)
