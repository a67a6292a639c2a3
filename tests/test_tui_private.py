"""Personas and incognito conversations in the chat app: Textual pilots and a real terminal, the real model."""
from __future__ import annotations

import dataclasses
import os
import re
import time
import uuid
from pathlib import Path

from textual.widgets import Label, OptionList

from assistant.tui.app import EmberApp
from assistant.tui.screens.persona import PersonaScreen
from assistant.tui.widgets.message import MessageView
from storage import conversations as convs
from storage import memory, personas
from storage.db import open_db
from tests.conftest import assert_clean_error
from tests.test_tui import SIZE, chat, send, status
from tests.tui_helpers import TerminalRun, wait_until


def files_holding(home: Path, marker: str) -> list[str]:
    """Every file under the data dir whose bytes hold `marker` (the database, its -wal and -shm, caches)."""
    needle = marker.encode()
    return [str(p.relative_to(home)) for p in sorted(home.rglob("*")) if p.is_file() and needle in p.read_bytes()]


def plain(term: TerminalRun) -> bytes:
    """What the terminal shows, without its escape sequences."""
    return re.sub(rb"\x1b\[[0-9;?<>=$]*[a-zA-Z~]", b"", bytes(term.screen))


async def test_an_incognito_exchange_leaves_no_byte_on_disk(settings, engine, embedder, db, home):
    normal, secret = f"ZEBRA{uuid.uuid4().hex[:10]}", f"QUOKKA{uuid.uuid4().hex[:10]}"
    app = EmberApp(dataclasses.replace(settings, max_tokens=24), engine=engine, embedder=embedder)
    async with app.run_test(size=SIZE) as pilot:
        # A normal exchange first: its words do reach the files, so the search below can see words.
        await send(pilot, f"My bike lock code is {normal}.")
        await wait_until(pilot, lambda: not chat(app).generating)
        decisions = db.execute("SELECT COUNT(*) FROM route_decisions").fetchone()[0]
        chunks = db.execute("SELECT COUNT(*) FROM memory_chunks").fetchone()[0]

        await pilot.press("f9")
        screen = chat(app)
        assert screen.incognito and screen.query_one("#incognito-banner", Label).display
        assert "INCOGNITO" in status(app)
        assert "nothing of this conversation is saved" in str(screen.query_one("#incognito-banner", Label).render())
        await send(pilot, f"My locker code is {secret}.")
        await wait_until(pilot, lambda: not screen.generating)
        await send(pilot, "What did I just tell you?")
        await wait_until(pilot, lambda: not screen.generating)
        replies = [v for v in screen.query(MessageView) if v.role == "assistant"]
        assert replies[-1].status in ("complete", "length") and replies[-1].content
        # The model read the incognito history, held on the screen only.
        assert [m["role"] for m in screen.private_history] == ["user", "assistant", "user", "assistant"]
        assert secret in screen.private_history[0]["content"]
        assert screen.conversation_id is None
        await pilot.press("f5")   # rating needs a stored reply: said plainly, nothing stored
        assert any("Incognito" in n.message for n in app._notifications)

        assert files_holding(home, secret) == []
        assert db.execute("SELECT COUNT(*) FROM route_decisions").fetchone()[0] == decisions
        assert db.execute("SELECT COUNT(*) FROM memory_chunks").fetchone()[0] == chunks
        assert len(convs.list_conversations(db)) == 1
        assert memory.bm25_search(db, secret, 5) == []

        await pilot.press("f9")   # back to a normal conversation: the incognito one is gone
        assert not screen.incognito and screen.private_history == []
        assert not screen.query_one("#incognito-banner", Label).display
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert files_holding(home, normal) and files_holding(home, secret) == []


async def test_ember_chat_incognito_starts_incognito_and_other_conversations_end_it(settings, engine, db):
    convs.add_message(db, convs.create_conversation(db), "user", "An old question")
    app = EmberApp(settings, engine=engine, incognito=True)
    async with app.run_test(size=SIZE) as pilot:
        screen = chat(app)
        assert screen.incognito and "INCOGNITO" in status(app)
        assert "Incognito conversation" in str(screen.query_one("#conversation-title", Label).render())
        await pilot.press("ctrl+n")   # a new conversation is a normal one
        assert not screen.incognito and "INCOGNITO" not in status(app)


def test_incognito_with_a_conversation_is_refused_in_one_line(ember):
    assert_clean_error(ember("chat", "--incognito", "--conversation", "1"), contains="--incognito")


def test_an_incognito_chat_in_a_real_terminal_writes_nothing(home, ember):
    secret = f"WOMBAT{uuid.uuid4().hex[:10]}"
    # Warm the shared cache (the engine's self-check, the embedding model) as a first run would.
    assert ember("ask", "hi", "--no-log", "--max-tokens", "1", timeout=600).returncode == 0
    term = TerminalRun(["chat", "--incognito"], dict(os.environ, EMBER_HOME=str(home), EMBER_N_CTX="2048"))
    try:
        term.wait_for(b"Message Ember", timeout=60)
        term.wait_for(b"INCOGNITO")
        term.type(f"Remember {secret} for me.")
        time.sleep(0.3)
        term.type("\r")
        deadline = time.monotonic() + 300
        while not re.search(rb"\d+\.\d tok/s", plain(term)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert re.search(rb"\d+\.\d tok/s", plain(term)), "no reply came"
        term.type("\x11")   # Ctrl+Q
        assert term.wait(timeout=60) == 0
    finally:
        if term.pid:
            try:
                os.kill(term.pid, 9)
            except ProcessLookupError:
                pass
    assert files_holding(home, secret) == []
    db = open_db(home)
    assert convs.list_conversations(db) == []
    db.close()


async def test_a_persona_is_chosen_from_the_palette_shown_and_remembered(settings, engine, db):
    personas.add_persona(db, "pirate", "You are a pirate.", default=True)
    personas.add_persona(db, "terse", "Answer in one line.", route="base")
    app = EmberApp(settings, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        screen = chat(app)
        assert "persona: pirate" in status(app)   # a new conversation starts with the default
        await pilot.press("ctrl+t")
        await wait_until(pilot, lambda: isinstance(app.screen, PersonaScreen))
        options = app.screen.query_one(OptionList)
        ids = [options.get_option_at_index(i).id for i in range(options.option_count)]
        assert ids == [personas.NONE, "pirate", "terse"] and options.highlighted == 1
        options.highlighted = 2
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.screen is screen)
        assert "persona: terse" in status(app) and "route: base" in status(app)
        await send(pilot, "Say hello.")
        await wait_until(pilot, lambda: not screen.generating)
        cid = screen.conversation_id
        assert personas.of_conversation(db, cid)["name"] == "terse"
        assert convs.messages(db, cid)[-1]["route"] == "base"   # the persona's route, through respond

        # Choosing again changes the stored conversation; `d` makes one the default.
        await pilot.press("ctrl+t")
        await wait_until(pilot, lambda: isinstance(app.screen, PersonaScreen))
        app.screen.query_one(OptionList).highlighted = 0
        await pilot.press("d")
        assert personas.default_persona(db) is None
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.screen is screen)
        assert personas.of_conversation(db, cid) is None and "persona:" not in status(app)
        await pilot.press("ctrl+n")
        assert "persona:" not in status(app)   # no default any more

    personas.set_for_conversation(db, cid, "pirate")
    app = EmberApp(settings, engine=engine, conversation_id=cid)
    async with app.run_test(size=SIZE):
        assert "persona: pirate" in status(app)   # the conversation remembers its persona
