"""Switching the chat's model from the palette, and a theme remembered across runs (issue 22 §6).

Real app under Textual pilots, real models: the bundled SmolLM2 and a registered copy of it whose metadata
differ (so its file, and the SHA-256 an adapter checks, differ too), a real adapter for the bundled
model, a file llama.cpp refuses, and the real database.
"""
from __future__ import annotations

import dataclasses
import os
import time
import pytest
from textual.command import CommandList
from textual.widgets import Input

from assistant.tui.app import EmberApp
from assistant.tui.screens.chat_models import ModelNote
from assistant.tui.screens.models import ModelScreen
from assistant.tui.widgets.status_line import StatusLine
from storage import preferences
from tests.gguf_variants import variant
from tests.test_tui import SIZE, chat, notified, send
from tests.tui_helpers import TerminalRun, random_adapter, register_adapter, type_text, wait_until

VARIANT = "smol-variant"


@pytest.fixture(scope="session")
def variant_model(tmp_path_factory, model_path):
    """The bundled model with another `general.name`: loads the same, hashes differently."""
    return variant(model_path, tmp_path_factory.mktemp("models") / f"{VARIANT}.gguf",
                   set_strings={"general.name": "Smol Variant"})


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """One cache for the session: each model file's engine self-check runs once."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture
def quick(settings, model_cache):
    return dataclasses.replace(settings, max_tokens=6, cache=model_cache)


async def open_palette_command(pilot, title: str) -> None:
    """Ctrl+P, type the command's title, Enter on the first hit: as a person picks it from the palette."""
    await pilot.press("ctrl+p")
    await pilot.pause()
    await pick(pilot, title)


async def pick(pilot, text: str) -> None:
    """Type into the open command palette, wait for its search (a worker) to list `text`, Enter."""
    await type_text(pilot, text)
    hits = pilot.app.screen.query_one(CommandList)
    await wait_until(pilot, lambda: hits.option_count and text.lower() in str(hits.get_option_at_index(0).prompt).lower(),
                     timeout=10)
    await pilot.press("enter")
    await pilot.pause()


def notes(app) -> list[ModelNote]:
    return list(chat(app).query(ModelNote))


async def test_the_palette_switches_models_and_refuses_the_adapter_made_for_another_one(
        quick, model_path, variant_model, db, tmp_path):
    # A registered model (as `ember compress` leaves one) and an active adapter trained on the bundled model.
    quick.models_dir.mkdir(parents=True, exist_ok=True)
    (quick.models_dir / variant_model.name).symlink_to(variant_model)
    adapter = random_adapter(tmp_path / "a.gguf", model_path, quick.cache_dir)
    register_adapter(db, "a1", adapter, [])
    app = EmberApp(quick)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.engine is not None and app.engine.loaded_adapter == "a1")
        await pilot.press("f3", "f3")                         # memory off: no embedder, no router
        await open_palette_command(pilot, "Switch model")
        assert isinstance(app.screen, ModelScreen)
        options = app.screen.query_one("#model-list")
        listed = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
        assert listed[0].startswith("● SmolLM2") and "bundled default" in listed[0]   # the active one
        assert any(line.startswith(f"  {VARIANT}") and "ember compress" in line for line in listed)
        await pilot.press("down", "enter")                   # the registered model
        await wait_until(pilot, lambda: notes(app) and not app.switching_model)
        assert app.engine.path.name == f"{VARIANT}.gguf" and app.engine.name == "Smol Variant"
        assert app.engine.loaded_adapter is None                  # made for another model: not applied …
        said = str(notes(app)[-1].render())
        assert f"Model: {VARIANT}.gguf (was SmolLM2" in said and "Adapter a1 not used (adapter was trained on another" in said   # … and said
        assert f"model: {VARIANT}.gguf" in str(chat(app).query_one(StatusLine).render())
        assert app.settings.model_path == app.engine.path            # `Adapt now` trains on what the chat runs
        await send(pilot, "Hi")
        await wait_until(pilot, lambda: not chat(app).generating)
        reply = db.execute("SELECT model, status FROM messages WHERE role = 'assistant'").fetchone()
        assert reply[1] in ("complete", "length") and reply[0] == "Smol Variant"
        assert preferences.recent_models(db) == [str(app.engine.path)]

        # A file llama.cpp cannot load: one line in the chat, and the model in use stays.
        broken = tmp_path / "broken.gguf"
        broken.write_bytes(b"GGUF" + bytes(range(256)) * 8)
        await open_palette_command(pilot, "Switch model")
        await pilot.press("tab")                               # to the path box
        app.screen.query_one(Input).insert_text_at_cursor(str(broken))   # as pasted there
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(notes(app)) == 2 and not app.switching_model)
        failed = notes(app)[-1]
        assert failed.has_class("failed")
        line = str(failed.render())
        assert line.startswith("Model not switched:") and "broken.gguf" in line
        assert line.endswith(f"still using {VARIANT}.gguf.") and "\n" not in line
        assert app.engine.path.name == f"{VARIANT}.gguf"
        await send(pilot, "Still there?")
        await wait_until(pilot, lambda: not chat(app).generating)
        assert db.execute("SELECT COUNT(*) FROM messages WHERE role = 'assistant' AND status IN "
                          "('complete', 'length')").fetchone()[0] == 2

        # Back to the bundled model, chosen while a reply holds the engine: the switch waits for it to
        # end; then the adapter made for the bundled model applies again.
        await open_palette_command(pilot, "Switch model")
        await pilot.press("enter")                             # the one in use, highlighted: nothing to do
        await pilot.pause()
        assert len(notes(app)) == 2 and not app.switching_model and notified(app, "is the model in use")
        await open_palette_command(pilot, "Switch model")
        held = app.engine
        app.engine_lock.acquire()                              # what a reply being written holds
        try:
            await pilot.press("up", "enter")                   # the bundled model, listed first
            await pilot.pause(1.0)
            assert app.switching_model and app.engine is held and len(notes(app)) == 2
        finally:
            app.engine_lock.release()
        await wait_until(pilot, lambda: len(notes(app)) == 3 and not app.switching_model)
        assert app.engine.path == model_path and app.engine.loaded_adapter == "a1"
        assert "Adapter a1 applies to it" in str(notes(app)[-1].render())


async def test_a_theme_no_longer_known_falls_back_to_the_default(settings, engine, db):
    """A stored name this Textual does not have (from a newer one, or typed by hand) is not an error."""
    preferences.put(db, preferences.THEME, "no-such-theme")
    app = EmberApp(settings, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert app.theme == "textual-dark"
        app.theme = "nord"                              # what the palette's Theme command does
        await wait_until(pilot, lambda: preferences.get(db, preferences.THEME) == "nord", timeout=10)


def test_the_models_listed_are_the_bundled_registered_given_and_recent_each_once(settings, model_path, db, tmp_path):
    from assistant import models

    settings.models_dir.mkdir(parents=True, exist_ok=True)
    registered = settings.models_dir / "small.gguf"
    registered.write_bytes(b"GGUF")                         # listed by existing, as ember compress leaves one
    given, gone = tmp_path / "given.gguf", tmp_path / "gone.gguf"
    given.write_bytes(b"GGUF")
    for path in (gone, registered, model_path):             # recent: newest first; these repeat or are gone
        preferences.add_recent_model(db, str(path))
    listed = models.catalogue(settings, db, given=given)
    assert [(m["name"], m["kind"], m["exists"]) for m in listed] == [
        (model_path.stem, "bundled", True), ("given", "given", True), ("small", "registered", True),
        ("gone", "recent", False)]
    assert models.resolve(settings, "small") == registered   # a registered name, as --model NAME
    assert models.resolve(settings, "~/x.gguf").is_absolute()


NORD_BACKGROUND = b"48;2;46;52;64"   # nord's background, #2E3440, as a truecolor terminal is sent it


def test_the_theme_picked_in_a_real_ember_chat_is_the_one_the_next_starts_in(home):
    """Two runs of the real `ember chat` in a terminal: pick nord in the first, the second paints in it."""
    env = dict(os.environ, EMBER_HOME=str(home), COLORTERM="truecolor")
    env.pop("EMBER_DEBUG", None)

    def run(act) -> None:
        chat = TerminalRun(["chat"], env)
        try:
            chat.wait_for(b"Message Ember", timeout=60)
            act(chat)
            chat.type("\x11")                              # Ctrl+Q
            code = chat.wait(timeout=30)
        except BaseException:
            chat.kill(9)
            chat.wait()
            raise
        assert code == 0

    def pick_nord(chat) -> None:
        assert NORD_BACKGROUND not in chat.screen
        chat.type("\x10")                                  # Ctrl+P
        chat.wait_for(b"Search for commands", timeout=20)
        chat.type("Theme")
        chat.wait_for(b"Change the current theme", timeout=20)
        chat.type("\r")
        chat.wait_for(b"Search for themes", timeout=20)
        chat.type("nord")
        time.sleep(1.0)                                     # the palette searches in a worker
        chat.type("\r")
        chat.wait_for(NORD_BACKGROUND, timeout=20)

    run(pick_nord)
    run(lambda chat: chat.wait_for(NORD_BACKGROUND, timeout=10))
