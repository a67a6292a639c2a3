"""The chat app, driven by Textual pilots on the real model and a real database."""
from __future__ import annotations

import dataclasses
import os
import signal
import time

import pytest
from textual.widgets import Button, Collapsible, Markdown, TextArea

from assistant.tui.app import EmberApp
from assistant.tui.screens.chat import ACTIONS, ChatScreen
from assistant.tui.screens.edit_reply import EditReplyScreen
from assistant.tui.screens.modals import ConfirmScreen, RenameScreen
from assistant.tui.screens.search import SearchScreen
from assistant.tui.widgets.conversation_list import ConversationItem
from assistant.tui.widgets.message import MemoryItem, MessageView
from assistant.tui.widgets.prompt import PromptInput
from assistant.tui.widgets.status_line import StatusLine
from storage import conversations as convs
from storage import feedback, memory, registry, routing, runs
from storage.db import integrity_ok, open_db
from tests.conftest import another_process_holds_the_lock
from tests.tui_helpers import (TerminalRun, random_adapter, register_adapter, seed_conversations, type_text,
                               wait_until)

SIZE = (120, 40)


def chat(app) -> ChatScreen:
    assert isinstance(app.screen, ChatScreen)
    return app.screen


async def send(pilot, text: str) -> None:
    """Type `text` and press Enter; returns once the prompt has sent it (Enter waits a moment to tell
    typing from a paste)."""
    await type_text(pilot, text)
    await pilot.press("enter")
    prompt = pilot.app.screen.query_one(PromptInput)
    await wait_until(pilot, lambda: not prompt.submit_pending, timeout=10)


def header(view: MessageView) -> str:
    return str(view.query_one(".message-header").render())


def status(app) -> str:
    return str(app.screen.query_one(StatusLine).render())


def notified(app, text: str, severity: str | None = None) -> bool:
    return any(text in n.message and severity in (None, n.severity) for n in app._notifications)


def record_notifications(app) -> list[str]:
    """Every notification's message, also after it has left the screen."""
    said: list[str] = []
    notify = app.notify

    def recording(message: str, **kwargs) -> None:
        said.append(message)
        notify(message, **kwargs)

    app.notify = recording
    return said


@pytest.fixture
def swappable(engine):
    """The session's engine, left without an adapter for the next test."""
    yield engine
    engine.load_adapter(None, None)
    engine.refused_adapter = None


async def test_the_prompt_is_ready_before_the_model_has_loaded(settings):
    app = EmberApp(settings)   # loads the model itself, in a worker thread
    async with app.run_test(size=SIZE) as pilot:
        assert isinstance(app.focused, PromptInput)   # `ember bench engine` measures how soon
        await send(pilot, "Say hello.")   # typed while the model may still be loading: queued, not lost
        await wait_until(pilot, lambda: app.engine_ready.is_set() and not chat(app).generating)
        replies = [v for v in app.screen.query(MessageView) if v.role == "assistant"]
        assert replies and replies[-1].content and replies[-1].status == "complete"
        assert app.screen.query_one(StatusLine).state == "ready"


async def test_a_reply_streams_into_the_log_and_is_stored(settings, engine, db):
    app = EmberApp(dataclasses.replace(settings, max_tokens=300), engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "Tell me about the history of Paris.")
        screen = chat(app)
        seen_lengths = set()
        await wait_until(pilot, lambda: seen_lengths.add(len(app.screen.query(MessageView)[-1].content))
                         or not screen.generating)
        view = app.screen.query(MessageView)[-1]
        assert len(seen_lengths) > 2, "the reply should appear piece by piece"
        rows = convs.messages(db, screen.conversation_id)
        assert [r["role"] for r in rows] == ["user", "assistant"]
        # Greedy, this reply runs past 300 tokens: stored and shown as cut at the limit (issue 14 §6).
        assert rows[1]["content"] == view.content and rows[1]["status"] == view.status == "length"
        assert convs.get_conversation(db, screen.conversation_id)["title"] == "Tell me about the history of Paris."
        assert app.screen.query_one(StatusLine).speed > 0
        assert "tok/s" in str(app.screen.query_one(StatusLine).render())


async def test_escape_cancels_and_the_partial_reply_is_kept_and_marked(settings, engine, db):
    app = EmberApp(dataclasses.replace(settings, max_tokens=600), engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "Write a very long story about a lighthouse keeper.")
        screen = chat(app)
        await wait_until(pilot, lambda: len(app.screen.query(MessageView)[-1].content) > 20)
        await pilot.press("escape")
        await wait_until(pilot, lambda: not screen.generating)
        view = app.screen.query(MessageView)[-1]
        assert view.status == "cancelled"
        assert "cancelled" in str(view.query_one(".message-header").render())
        row = convs.messages(db, screen.conversation_id)[-1]
        assert row["status"] == "cancelled" and row["content"] == view.content and row["content"]
        assert row["tokens"] < 600


async def test_switching_conversations_shows_their_messages(settings, engine, db):
    picnic, pancakes = seed_conversations(db)
    app = EmberApp(settings, engine=engine, conversation_id=picnic)
    async with app.run_test(size=SIZE) as pilot:
        screen = chat(app)
        assert [v.content for v in app.screen.query(MessageView)][0] == "Ideas for a picnic in the park"
        sidebar = app.screen.query_one("#sidebar")
        sidebar.focus()
        await pilot.press("up", "enter")      # most recent first: pancakes is above picnic
        await pilot.pause()
        assert screen.conversation_id == pancakes
        assert [v.role for v in app.screen.query(MessageView)] == ["user", "assistant"]
        assert app.screen.query(MessageView)[0].content == "How do I make pancakes?"
        # A reply in the switched-to conversation carries its history.
        await send(pilot, "And for two people?")
        await wait_until(pilot, lambda: not screen.generating)
        assert len(convs.messages(db, pancakes)) == 4 and len(convs.messages(db, picnic)) == 2


async def test_new_rename_and_delete_conversations(settings, engine, db):
    picnic, pancakes = seed_conversations(db)
    app = EmberApp(settings, engine=engine, conversation_id=picnic)
    async with app.run_test(size=SIZE) as pilot:
        screen = chat(app)
        await pilot.press("ctrl+r")
        assert isinstance(app.screen, RenameScreen)
        await pilot.press("ctrl+u")
        await type_text(pilot, "Saturday picnic")
        await pilot.press("enter")
        assert convs.get_conversation(db, picnic)["title"] == "Saturday picnic"
        assert str(app.screen.query_one("#conversation-title").render()) == "Saturday picnic"

        await pilot.press("f8")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")                 # keep it
        assert db["conversations"].count == 2
        await pilot.press("f8", "y")
        await pilot.pause()
        assert [c["id"] for c in convs.list_conversations(db)] == [pancakes]
        assert screen.conversation_id is None and not app.screen.query(MessageView)

        await pilot.press("ctrl+n")
        assert screen.conversation_id is None
        await send(pilot, "Hello there")
        await wait_until(pilot, lambda: not screen.generating)
        assert db["conversations"].count == 2 and screen.conversation_id not in (picnic, pancakes)


async def test_search_finds_a_past_conversation_and_opens_it(settings, engine, db):
    picnic, pancakes = seed_conversations(db)
    app = EmberApp(settings, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+f")
        assert isinstance(app.screen, SearchScreen)
        await type_text(pilot, "blanket")
        await pilot.pause()
        assert app.screen.query_one("#search-results").option_count == 1
        await pilot.press("enter")
        await pilot.pause()
        assert chat(app).conversation_id == picnic
        assert app.screen.query(MessageView)[1].content.startswith("Bring **sandwiches**")


async def test_opening_the_chat_and_typing_count_as_the_user_being_here(settings, engine, db, monkeypatch):
    monkeypatch.setattr("assistant.tui.app.PRESENCE_SECONDS", 0.0)
    app = EmberApp(settings, engine=engine)
    kinds = lambda: [r["kind"] for r in db["activity"].rows_where(order_by="id")]   # noqa: E731
    async with app.run_test(size=SIZE) as pilot:
        assert kinds() == ["chat_open"]             # the idle-time daemon pauses for this
        await type_text(pilot, "half a thought")    # not sent: typing alone says the user is back
        assert "typing" in kinds()


async def test_copy_last_reply(settings, engine, db):
    _picnic, pancakes = seed_conversations(db)
    app = EmberApp(settings, engine=engine, conversation_id=pancakes)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+y")
        assert app.clipboard.startswith("Mix flour, eggs and milk")


async def test_every_action_is_in_the_command_palette(settings, engine):
    app = EmberApp(settings, engine=engine)
    async with app.run_test(size=SIZE):
        titles = {command.title for command in app.get_system_commands(app.screen)}
        assert {title for _action, title, _help in ACTIONS} <= titles
        bound = {binding.action for binding in ChatScreen.BINDINGS}
        # Editing one of your messages is Enter on it (MessageView's binding), or the palette.
        assert bound | {"edit_message"} == {action for action, _title, _help in ACTIONS}


async def test_an_interrupted_reply_from_a_killed_process_is_shown_as_interrupted(settings, engine, db):
    cid = convs.create_conversation(db)
    convs.add_message(db, cid, "user", "Tell me a story")
    reply = convs.start_reply(db, cid)
    convs.update_reply(db, reply, "Once upon a time")
    db["messages"].update(reply, {"writer_pid": 2 ** 22 + 999})   # a process that no longer exists
    app = EmberApp(settings, engine=engine, conversation_id=cid)
    async with app.run_test(size=SIZE):
        view = app.screen.query(MessageView)[-1]
        assert view.status == "interrupted" and view.content == "Once upon a time"


def test_sigkill_of_the_chat_mid_reply_loses_no_earlier_message(home, ember):
    """The real `ember chat` in a pseudo-terminal, killed while it streams a reply."""
    assert ember("ask", "My locker code is 4412.", "--max-tokens", "4", "--temperature", "0").returncode == 0
    term = TerminalRun(["chat", "--conversation", "1"], dict(os.environ, EMBER_HOME=str(home)))
    db = open_db(home)
    try:
        term.wait_for(b"Message Ember")
        term.type("Write a very long story about a lighthouse keeper.\r")
        partial = ""
        deadline = time.monotonic() + 60
        while not partial and time.monotonic() < deadline:
            row = db.execute("SELECT content FROM messages WHERE status = 'generating'").fetchone()
            partial = row[0] if row else ""
            time.sleep(0.05)
        assert partial, "the reply should be saved while it streams"
    finally:
        term.kill(signal.SIGKILL)
        assert term.wait() == -signal.SIGKILL
    db.close()
    db = open_db(home)
    convs.recover_interrupted(db)
    rows = convs.messages(db, 1)
    assert rows[0]["content"] == "My locker code is 4412."
    assert rows[2]["content"] == "Write a very long story about a lighthouse keeper."
    assert rows[3]["status"] == "interrupted" and rows[3]["content"].startswith(partial)
    assert integrity_ok(db)


def test_chat_with_a_model_llama_cpp_cannot_load_exits_with_one_clear_line(home, tmp_path, model_path):
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(model_path.read_bytes()[:100_000])
    term = TerminalRun(["chat", "--model", str(truncated)], dict(os.environ, EMBER_HOME=str(home)))
    assert term.wait() == 1
    text = term.screen.decode("utf-8", "replace")
    assert "ember: llama.cpp could not load" in text and "Traceback" not in text


async def test_a_locked_database_during_rename_is_a_notification_not_a_crash(settings, engine, db, home):
    picnic, _ = seed_conversations(db)
    app = EmberApp(dataclasses.replace(settings, busy_timeout_ms=100), engine=engine, conversation_id=picnic)
    async with app.run_test(size=SIZE) as pilot:
        with another_process_holds_the_lock(home):
            await pilot.press("ctrl+r")
            await type_text(pilot, " outdoors")
            await pilot.press("enter")
            await pilot.pause()
            assert any("locked" in n.message for n in app._notifications)
            assert isinstance(app.screen, ChatScreen) and app.is_running
        assert convs.get_conversation(db, picnic)["title"] == "Ideas for a picnic in the park"


async def test_memory_route_shows_the_memories_used_and_forgets_one(settings, engine, embedder, db):
    memory.upsert_records(db, [{"id": "wifi", "text": "The wifi password at the cabin is pinecone42."},
                               {"id": "car", "text": "I parked on level four."}])
    app = EmberApp(settings, engine=engine, embedder=embedder)
    async with app.run_test(size=SIZE) as pilot:
        screen = chat(app)
        assert screen.route == "auto" and "memory: auto" in str(app.screen.query_one(StatusLine).render())
        await pilot.press("f3")                 # auto → on: every reply uses memories
        assert screen.route == "rag" and "memory: on" in str(app.screen.query_one(StatusLine).render())
        await send(pilot, "What is the wifi password at the cabin?")
        await wait_until(pilot, lambda: not screen.generating)
        reply = app.screen.query(MessageView)[-1]
        assert reply.route == "rag" and reply.memories[0]["text"].startswith("The wifi password")
        panel = reply.query_one(Collapsible)
        assert panel.collapsed and "Memories used" in panel.title
        panel.collapsed = False
        await pilot.pause()
        await pilot.click(reply.query(MemoryItem)[0].query_one(Button))
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await pilot.pause()
        assert [r["source_id"] for r in memory.list_chunks(db) if r["source"] == "import"] == ["car"]
        # Reopened later, the reply still lists what it was given (minus what was forgotten).
        app.screen.open_conversation(screen.conversation_id)
        await pilot.pause()
        assert all(m["source_id"] != "wifi" for m in app.screen.query(MessageView)[-1].memories)


async def test_the_router_picks_memory_for_a_fact_and_f2_says_why(settings, engine, embedder, db):
    memory.upsert_records(db, [{"id": "wifi", "text": "The wifi password at the cabin is pinecone42."},
                               {"id": "car", "text": "I parked on level four."}])
    app = EmberApp(settings, engine=engine, embedder=embedder)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")
        assert notified(app, "No reply yet")
        await send(pilot, "What is the wifi password at the cabin?")
        await wait_until(pilot, lambda: not chat(app).generating)
        reply = app.screen.query(MessageView)[-1]
        assert reply.route == "rag" and "route: rag" in header(reply)
        assert reply.memories[0]["text"].startswith("The wifi password")
        await pilot.press("f2")
        assert notified(app, "Route rag: open question; best note 0.")
        decided = routing.decision_for(db, reply.message_id)
        assert decided["route"] == "rag" and decided["features"]["similarity"] > 0.6
        await pilot.press("f3", "f3")           # memory off: by hand, and F2 says so
        await send(pilot, "What is the wifi password at the cabin?")
        await wait_until(pilot, lambda: not chat(app).generating)
        assert app.screen.query(MessageView)[-1].route == "base"
        await pilot.press("f2")
        assert notified(app, "chosen by hand")


async def test_rating_the_last_reply_is_stored_shown_and_toggled(settings, engine, db):
    _picnic, pancakes = seed_conversations(db)
    reply_id = convs.messages(db, pancakes)[1]["id"]
    app = EmberApp(settings, engine=engine, conversation_id=pancakes)
    async with app.run_test(size=SIZE) as pilot:
        view = app.screen.query(MessageView)[-1]
        await pilot.press("f5")
        assert feedback.state(db, pancakes) == {reply_id: {"rating": "up", "edit": None}}
        assert "👍" in header(view)
        await pilot.press("f5")                 # up again: the rating is withdrawn
        assert feedback.state(db, pancakes)[reply_id]["rating"] is None
        assert "👍" not in header(view)
        await pilot.press("f6")
        assert feedback.state(db, pancakes)[reply_id]["rating"] == "down" and "👎" in header(view)
        assert [r["kind"] for r in db["feedback"].rows_where(order_by="id")] == ["up", "clear", "down"]


async def test_feedback_with_no_finished_reply_is_a_clear_notification(settings, engine, db):
    app = EmberApp(settings, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f5", "f7", "f4")
        await pilot.pause()
        assert notified(app, "no finished reply", "warning") and notified(app, "Send a message first")
        assert isinstance(app.screen, ChatScreen) and db["feedback"].count == 0


async def test_editing_the_last_reply_stores_the_edit_and_shows_it(settings, engine, db):
    _picnic, pancakes = seed_conversations(db)
    reply_id = convs.messages(db, pancakes)[1]["id"]
    app = EmberApp(settings, engine=engine, conversation_id=pancakes)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f7")
        assert isinstance(app.screen, EditReplyScreen)
        area = app.screen.query_one(TextArea)
        assert area.text.startswith("Mix flour, eggs and milk") and area.has_focus
        await pilot.press("escape")             # cancelled: nothing stored
        assert isinstance(app.screen, ChatScreen) and db["feedback"].count == 0

        await pilot.press("f7", "f7")           # F7 in the editor selects all; typing replaces it
        await type_text(pilot, "Whisk flour, eggs and milk; fry in butter.")
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, ChatScreen)
        assert feedback.state(db, pancakes)[reply_id]["edit"] == "Whisk flour, eggs and milk; fry in butter."
        assert convs.messages(db, pancakes)[1]["content"].startswith("Mix flour")   # the original stays
        view = app.screen.query(MessageView)[-1]
        assert "✎ edited" in header(view) and view.has_class("edited")
        assert view.query_one(Markdown).source == "Whisk flour, eggs and milk; fry in butter."
        await pilot.press("ctrl+y")
        assert app.clipboard == "Whisk flour, eggs and milk; fry in butter."
        await pilot.press("f7")                 # the editor opens on the edit, not the original
        assert app.screen.query_one(TextArea).text == "Whisk flour, eggs and milk; fry in butter."


async def test_a_reopened_conversation_shows_its_ratings_and_edits(settings, engine, db):
    picnic, pancakes = seed_conversations(db)
    question, reply = (m["id"] for m in convs.messages(db, picnic))
    feedback.rate(db, reply, "down")
    feedback.edit(db, reply, "Bring sandwiches and a **kite**.")
    app = EmberApp(settings, engine=engine, conversation_id=pancakes)
    async with app.run_test(size=SIZE) as pilot:
        assert "👎" not in header(app.screen.query(MessageView)[-1])
        app.screen.query_one("#sidebar").focus()
        await pilot.press("down", "enter")      # picnic is below pancakes
        await pilot.pause()
        assert chat(app).conversation_id == picnic
        view = app.screen.query(MessageView)[-1]
        assert view.message_id == reply and view.rating == "down" and view.content.startswith("Bring **sand")
        assert "👎" in header(view) and "✎ edited" in header(view)
        assert view.query_one(Markdown).source == "Bring sandwiches and a **kite**."


async def test_excluding_a_conversation_from_learning_toggles_and_is_marked(settings, engine, db):
    picnic, _pancakes = seed_conversations(db)
    app = EmberApp(settings, engine=engine, conversation_id=picnic)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f4")
        assert feedback.is_excluded(db, picnic)
        assert "not used for learning" in str(app.screen.query_one("#conversation-title").render())
        item = next(i for i in app.screen.query(ConversationItem) if i.conversation_id == picnic)
        assert item.excluded and str(item.query_one("Label").render()).startswith("⊘")
        await pilot.press("f4")
        assert not feedback.is_excluded(db, picnic)
        assert "learning" not in str(app.screen.query_one("#conversation-title").render())


async def test_a_reply_is_rated_once_written_even_when_cut_short(settings, engine, db):
    app = EmberApp(dataclasses.replace(settings, max_tokens=600), engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "Write a very long story about a lighthouse keeper.")
        await wait_until(pilot, lambda: len(app.screen.query(MessageView)[-1].content) > 10)
        await pilot.press("f6")                 # still being written: not the reply before it, nor this one
        assert notified(app, "still replying", "warning") and db["feedback"].count == 0
        await pilot.press("escape")
        await wait_until(pilot, lambda: not chat(app).generating)
        await pilot.press("f6")
        reply = convs.messages(db, chat(app).conversation_id)[-1]
        assert reply["status"] == "cancelled" and feedback.state(db)[reply["id"]]["rating"] == "down"
        assert "👎" in header(app.screen.query(MessageView)[-1])


async def test_a_new_adapter_is_swapped_in_while_the_chat_runs(settings, swappable, db, tmp_path):
    picnic, _ = seed_conversations(db)
    app = EmberApp(settings, engine=swappable, conversation_id=picnic)
    async with app.run_test(size=SIZE) as pilot:
        assert "adapter: none" in status(app) and "route: auto" in status(app)
        await pilot.press("f3", "f3")           # memory off: the adapter, whenever one is loaded
        assert "memory: off" in status(app) and "route: base" in status(app)
        path = random_adapter(tmp_path / "tui-swap.gguf", settings.model_path, settings.cache_dir)
        register_adapter(db, "lora-20260601-120000-ab12", path, [m["id"] for m in convs.messages(db, picnic)])
        await wait_until(pilot, lambda: swappable.loaded_adapter == "lora-20260601-120000-ab12", timeout=10)
        await pilot.pause()
        assert "adapter: lora…ab12" in status(app) and "route: adapter" in status(app)
        assert notified(app, "New adapter lora-20260601-120000-ab12 in use")

        await send(pilot, "Hello again")
        await wait_until(pilot, lambda: not chat(app).generating)
        row = convs.messages(db, picnic)[-1]
        assert row["route"] == "adapter" and row["adapter_id"] == "lora-20260601-120000-ab12"
        assert "route: adapter (lora…ab12)" in header(app.screen.query(MessageView)[-1])

        registry.rollback(db)                   # back to the base model, still without a restart
        await wait_until(pilot, lambda: swappable.loaded_adapter is None, timeout=10)
        await pilot.pause()
        assert "adapter: none" in status(app) and notified(app, "replies come from the base model")


async def test_memory_with_an_adapter_uses_both(settings, swappable, db, tmp_path):
    picnic, _ = seed_conversations(db)
    path = random_adapter(tmp_path / "tui-both.gguf", settings.model_path, settings.cache_dir)
    register_adapter(db, "lora-both", path, [])
    app = EmberApp(settings, engine=swappable, conversation_id=picnic)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: "adapter: lora-both" in status(app), timeout=10)
        assert not notified(app, "New adapter")   # the adapter in use at start is no news
        await pilot.press("f3")
        assert chat(app).route == "both" and "route: both" in status(app)


async def test_the_router_reads_a_message_while_it_is_typed(settings, swappable, db, tmp_path):
    from assistant import router
    from assistant.probe import prober_for
    path = random_adapter(tmp_path / "tui-ahead.gguf", settings.model_path, settings.cache_dir)
    register_adapter(db, "lora-ahead", path, [])
    app = EmberApp(dataclasses.replace(settings, max_tokens=4), engine=swappable)
    question = "How should I paint the old garden fence?"
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: "adapter: lora-ahead" in status(app), timeout=10)
        await type_text(pilot, question)
        # Before Enter, the route is decided for the draft: both probe lanes hold the whole question.
        full = router._probe_prompt(swappable, settings.system_prompt, question)
        prober = prober_for(swappable)
        await wait_until(pilot, lambda: prober.held(None) == full, timeout=30)
        assert prober.held(swappable._loaded) == full
        assert convs.list_conversations(db) == []    # a draft is read, never stored
        await pilot.press("enter")
        await wait_until(pilot, lambda: not app.screen.query_one(PromptInput).submit_pending, timeout=10)
        await wait_until(pilot, lambda: not chat(app).generating)
        view = app.screen.query(MessageView)[-1]
        assert view.status in ("complete", "length") and view.content
        reply = convs.messages(db, convs.list_conversations(db)[0]["id"])[-1]
        assert routing.decision_for(db, reply["id"])["features"]["decided_ahead"] is True   # not measured again


async def test_the_chat_reads_the_next_message_into_the_kv_cache_while_it_is_typed(settings, engine, db):
    # No adapter: the probe never runs, but the reply itself starts from what was read while typing.
    app = EmberApp(dataclasses.replace(settings, max_tokens=6), engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: "ready" in status(app), timeout=60)
        await send(pilot, "Tell me about lighthouses.")
        await wait_until(pilot, lambda: not chat(app).generating)
        question = "Why were they built on rocks?"
        await type_text(pilot, question)
        history = [{"role": m["role"], "content": m["content"]} for m in convs.messages(db, chat(app).conversation_id)]
        system = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []
        words = engine.tokenize_chat([*system, *history, {"role": "user", "content": "Why were they built on"}])[0]
        expected = words[:len(words) - engine.template_tail()]
        await wait_until(pilot, lambda: [int(t) for t in engine.llm.input_ids[:engine.llm.n_tokens]] == expected,
                         timeout=30)
        assert len(convs.messages(db, chat(app).conversation_id)) == len(history)   # the draft is not stored
        await pilot.press("enter")
        await wait_until(pilot, lambda: not app.screen.query_one(PromptInput).submit_pending, timeout=10)
        await wait_until(pilot, lambda: not chat(app).generating)
        view = app.screen.query(MessageView)[-1]
        assert view.status in ("complete", "length") and view.content


async def test_a_corrupt_adapter_is_a_warning_and_the_chat_keeps_working(settings, swappable, db, tmp_path):
    path = tmp_path / "broken.gguf"
    good = random_adapter(tmp_path / "good.gguf", settings.model_path, settings.cache_dir).read_bytes()
    path.write_bytes(good[: len(good) // 3])   # cut short, as by a full disk
    app = EmberApp(dataclasses.replace(settings, max_tokens=8), engine=swappable)
    said = record_notifications(app)   # shown ones expire; this keeps them all
    async with app.run_test(size=SIZE) as pilot:
        register_adapter(db, "lora-broken", path, [])
        await wait_until(pilot, lambda: notified(app, "adapter lora-broken not used", "warning"), timeout=10)
        assert swappable.loaded_adapter is None and "adapter: none" in status(app)
        await send(pilot, "Say hello.")
        await wait_until(pilot, lambda: not chat(app).generating)
        view = app.screen.query(MessageView)[-1]
        assert view.status in ("complete", "length") and view.content and view.route == "base"   # 8 tokens
        assert sum("lora-broken" in message for message in said) == 1   # said once, not at every check


async def test_an_adaptation_in_progress_shows_in_the_status_line(settings, engine, db):
    app = EmberApp(settings, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        runs.start(db, "lora-run", method="lora", steps=80, fingerprint="f")   # this process: alive
        runs.update(db, "lora-run", step=12, loss=2.3141, epsilon_spent=3.07, eta_seconds=130)
        await wait_until(pilot, lambda: "adapting" in status(app), timeout=10)
        assert "adapting (lora) 12/80 · loss 2.31 · ε 3.1 · 2m left" in status(app)
        runs.update(db, "lora-run", status="done", message="kept the previous model: no better on held-out")
        await wait_until(pilot, lambda: "adapting" not in status(app), timeout=10)
        assert notified(app, "Adaptation finished: kept the previous model")


async def test_a_run_the_daemon_paused_for_the_user_is_announced_calmly(settings, engine, db):
    app = EmberApp(settings, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        runs.start(db, "lora-idle", method="lora", steps=80, fingerprint="f")
        await wait_until(pilot, lambda: "adapting" in status(app), timeout=10)
        runs.update(db, "lora-idle", status="interrupted", message="paused; resumes on the next run")
        await wait_until(pilot, lambda: "adapting" not in status(app), timeout=10)
        assert notified(app, "Learning paused while you are here")


async def test_no_adapter_is_swapped_in_while_a_reply_is_being_written(settings, swappable, db, tmp_path):
    path = random_adapter(tmp_path / "tui-wait.gguf", settings.model_path, settings.cache_dir)
    app = EmberApp(dataclasses.replace(settings, max_tokens=1000), engine=swappable)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "Write a very long story about a lighthouse keeper.")
        await wait_until(pilot, lambda: len(app.screen.query(MessageView)[-1].content) > 10)
        register_adapter(db, "lora-wait", path, [])
        await pilot.pause(2.5)                  # a check of the registry passes meanwhile
        assert chat(app).generating and swappable.loaded_adapter is None
        await pilot.press("escape")
        await wait_until(pilot, lambda: swappable.loaded_adapter == "lora-wait", timeout=10)
        row = convs.messages(db, chat(app).conversation_id)[-1]
        assert row["status"] == "cancelled" and row["adapter_id"] is None
