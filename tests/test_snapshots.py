"""How the main screens look (pytest-textual-snapshot; update with `pytest --snapshot-update`)."""
from __future__ import annotations

import pytest

from assistant.tui.app import EmberApp
from tests.tui_helpers import seed_conversations, type_text

SIZE = (110, 30)


@pytest.fixture
def seeded_app(settings, engine, db):
    def make(**kwargs) -> EmberApp:
        ids = seed_conversations(db)
        return EmberApp(settings, engine=engine, conversation_id=ids[1], **kwargs)
    return make


def test_chat_screen_with_a_past_conversation(snap_compare, seeded_app):
    assert snap_compare(seeded_app(), terminal_size=SIZE)


def test_new_conversation_screen(snap_compare, settings, engine):
    assert snap_compare(EmberApp(settings, engine=engine), terminal_size=SIZE)


def test_search_screen_with_results(snap_compare, seeded_app):
    async def search(pilot):
        await pilot.press("ctrl+f")
        await type_text(pilot, "pancakes")
        await pilot.pause()

    assert snap_compare(seeded_app(), terminal_size=SIZE, run_before=search)


def test_rename_dialog(snap_compare, seeded_app):
    assert snap_compare(seeded_app(), terminal_size=SIZE, press=["ctrl+r"])


def test_delete_confirmation(snap_compare, seeded_app):
    assert snap_compare(seeded_app(), terminal_size=SIZE, press=["f8"])
