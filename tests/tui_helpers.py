"""Helpers for driving the real chat app with Textual pilots."""
from __future__ import annotations

import asyncio
import time
from typing import Callable

from storage import conversations as convs


async def wait_until(pilot, condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Let the app run until `condition()` holds (the model works in a thread)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.05)
    await pilot.pause()


def seed_conversations(db) -> list[int]:
    """Two past conversations with fixed times, as a user would have them."""
    stamps = ["2026-05-01T09:00:00.000+00:00", "2026-05-02T18:30:00.000+00:00"]
    ids = []
    for stamp, (question, answer) in zip(stamps, [
        ("Ideas for a picnic in the park", "Bring **sandwiches**, fruit and a blanket."),
        ("How do I make pancakes?", "Mix flour, eggs and milk:\n\n1. Whisk\n2. Rest 10 minutes\n3. Fry"),
    ]):
        cid = convs.create_conversation(db)
        convs.add_message(db, cid, "user", question)
        convs.add_message(db, cid, "assistant", answer)
        db.execute("UPDATE conversations SET created = ?, updated = ? WHERE id = ?", [stamp, stamp, cid])
        db.execute("UPDATE messages SET created = ? WHERE conversation_id = ?", [stamp, cid])
        ids.append(cid)
    db.conn.commit()
    return ids


async def type_text(pilot, text: str) -> None:
    """Type into the focused widget, as a person would."""
    await pilot.press(*[{" ": "space"}.get(ch, ch) for ch in text])
    await asyncio.sleep(0)
