"""How the main screens look (pytest-textual-snapshot; update with `pytest --snapshot-update`)."""
from __future__ import annotations

import pytest
from textual.widgets import TextArea

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


def test_help_screen(snap_compare, seeded_app):
    assert snap_compare(seeded_app(), terminal_size=SIZE, press=["f1"])


def test_a_regenerated_reply_shows_its_place_among_alternatives(snap_compare, settings, engine, db):
    from storage import conversations as convs

    cid = convs.create_conversation(db)
    question = convs.add_message(db, cid, "user", "Suggest a name for my cat.")
    convs.add_message(db, cid, "assistant", "Whiskers is a fine name.")
    convs.add_message(db, cid, "assistant", "Call her **Marmalade**.", parent_id=question)
    stamp = "2026-05-03T10:00:00.000+00:00"
    db.execute("UPDATE conversations SET created = ?, updated = ? WHERE id = ?", [stamp, stamp, cid])
    db.execute("UPDATE messages SET created = ? WHERE conversation_id = ?", [stamp, cid])
    db.conn.commit()
    assert snap_compare(EmberApp(settings, engine=engine, conversation_id=cid), terminal_size=SIZE)


def test_learning_screen(snap_compare, settings, engine, db):
    from storage import conversations as convs
    from storage import ledger, registry

    picnic, pancakes = seed_conversations(db)
    runs = [("lora-20260501-090000-aaaa", 8.0, [3.9, 3.7, 3.5, 3.4, 3.3, 3.2], [picnic]),
            ("lora-20260502-090000-bbbb", 4.0, [3.8, 3.4, 3.0, 2.9, 2.7], [picnic, pancakes])]
    for i, (adapter_id, epsilon, losses, conversations) in enumerate(runs, start=1):
        sources = [m["id"] for c in conversations for m in convs.messages(db, c)]
        registry.register(db, {"id": adapter_id, "path": f"/nowhere/{adapter_id}.gguf", "kind": "lora",
                               "method": "lora", "base_sha256": "x", "params": {},
                               "eval": {"heldout_loss": 3.5, "base_loss": 3.73, "train_losses": losses},
                               "status": "inactive", "epsilon": epsilon, "delta": 1e-6,
                               "examples": len(sources), "created": f"2026-05-0{i}T09:00:00.000+00:00"},
                          [(m, "train") for m in sources], activate=False)
        ledger.record(db, f"run-{i}", method="lora", dp=True, epsilon=epsilon, delta=1e-6, sigma=1.2, clip=1.0,
                      sample_rate=0.2, steps=len(losses), examples=len(sources))
        db.execute("UPDATE privacy_ledger SET created = ? WHERE run_id = ?", [f"2026-05-0{i}T09:00:00", f"run-{i}"])
    db.conn.commit()
    assert snap_compare(EmberApp(settings, engine=engine), terminal_size=(130, 40), press=["ctrl+l"])


def test_model_switch_screen(snap_compare, settings, engine):
    settings.models_dir.mkdir(parents=True)
    (settings.models_dir / "smol-q4_0-luc.gguf").write_bytes(b"GGUF")   # as ember compress registers one

    async def open_it(pilot):
        pilot.app.screen.action_switch_model()
        await pilot.pause()

    assert snap_compare(EmberApp(settings, engine=engine), terminal_size=SIZE, run_before=open_it)


def test_persona_picker(snap_compare, settings, engine, db):
    from storage import personas

    personas.add_persona(db, "pirate", "You are a pirate. Answer like one.", route="base", temperature=0.9,
                         default=True)
    personas.add_persona(db, "terse", "Answer in one line.")
    assert snap_compare(EmberApp(settings, engine=engine), terminal_size=SIZE, press=["ctrl+t"])


def test_incognito_conversation(snap_compare, seeded_app):
    assert snap_compare(seeded_app(), terminal_size=SIZE, press=["f9"])


def test_context_view_of_a_past_reply(snap_compare, seeded_app):
    async def show(pilot):
        # The prompt's cursor blinks every 0.5 s: held still, the picture cannot depend on when it is taken.
        for area in pilot.app.screen.query(TextArea):
            area.cursor_blink = False
        await pilot.press("ctrl+o")
        await pilot.pause(0.5)   # counted in a worker

    assert snap_compare(seeded_app(), terminal_size=SIZE, run_before=show)
