"""What the user said about replies (up, down, edited) and which conversations not to learn from."""
from __future__ import annotations

from typing import Any, Iterable

import sqlite_utils

from storage.conversations import get_conversation, now
from storage.db import transaction
from storage.errors import InvalidInput, NotFound

RATINGS = ("up", "down", "clear")


def _message(db: sqlite_utils.Database, message_id: int) -> dict[str, Any]:
    rows = list(db["messages"].rows_where("id = ?", [message_id]))
    if not rows:
        raise NotFound(f"no message with id {message_id}; `ember history --json` shows message ids")
    return rows[0]


def _record(db: sqlite_utils.Database, conversation_id: int, message_id: int | None, kind: str,
            content: str | None = None) -> None:
    with transaction(db):
        db["feedback"].insert({"conversation_id": conversation_id, "message_id": message_id,
                               "kind": kind, "content": content, "created": now()})


def rate(db: sqlite_utils.Database, message_id: int, rating: str) -> None:
    """Rate an assistant reply up or down (`clear` withdraws the rating)."""
    if rating not in RATINGS:
        raise InvalidInput(f"a rating is one of {', '.join(RATINGS)}, not {rating!r}")
    message = _message(db, message_id)
    if message["role"] != "assistant":
        raise InvalidInput(f"message {message_id} is the user's own; only replies can be rated")
    _record(db, message["conversation_id"], message_id, rating)


def edit(db: sqlite_utils.Database, message_id: int, text: str) -> None:
    """Keep the user's correction of a reply: what they wanted it to say (the original stays logged)."""
    message = _message(db, message_id)
    if message["role"] != "assistant":
        raise InvalidInput(f"message {message_id} is the user's own; only replies can be edited")
    if not text.strip():
        raise InvalidInput("an edited reply cannot be empty; rate it down instead")
    _record(db, message["conversation_id"], message_id, "edit", text)


def set_excluded(db: sqlite_utils.Database, conversation_id: int, excluded: bool = True) -> None:
    """Exclude a conversation from learning (or include it again)."""
    get_conversation(db, conversation_id)
    _record(db, conversation_id, None, "exclude" if excluded else "include")


def excluded_conversations(db: sqlite_utils.Database) -> set[int]:
    """Conversations whose latest exclude/include event is `exclude`."""
    sql = """
        SELECT conversation_id, kind FROM feedback f
        WHERE kind IN ('exclude', 'include') AND id = (
            SELECT MAX(id) FROM feedback g
            WHERE g.conversation_id = f.conversation_id AND g.kind IN ('exclude', 'include'))"""
    return {row["conversation_id"] for row in db.query(sql) if row["kind"] == "exclude"}


def is_excluded(db: sqlite_utils.Database, conversation_id: int) -> bool:
    """Whether a conversation is kept out of learning."""
    return conversation_id in excluded_conversations(db)


def state(db: sqlite_utils.Database, conversation_id: int | None = None) -> dict[int, dict[str, Any]]:
    """Per message: its current rating (`up`, `down` or None) and its latest edit (or None)."""
    sql = "SELECT message_id, kind, content FROM feedback WHERE message_id IS NOT NULL"
    params: list[Any] = []
    if conversation_id is not None:
        sql += " AND conversation_id = ?"
        params.append(conversation_id)
    out: dict[int, dict[str, Any]] = {}
    for row in db.query(sql + " ORDER BY id", params):
        entry = out.setdefault(row["message_id"], {"rating": None, "edit": None})
        if row["kind"] == "edit":
            entry["edit"] = row["content"]
        else:
            entry["rating"] = None if row["kind"] == "clear" else row["kind"]
    return out


def of_messages(db: sqlite_utils.Database, message_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """`state` for the given messages only (those with no feedback are left out)."""
    ids = sorted(set(message_ids))
    if not ids:
        return {}
    out: dict[int, dict[str, Any]] = {}
    sql = (f"SELECT message_id, kind, content FROM feedback WHERE message_id IN ({','.join('?' * len(ids))}) "
           "ORDER BY id")
    for row in db.query(sql, ids):
        entry = out.setdefault(row["message_id"], {"rating": None, "edit": None})
        if row["kind"] == "edit":
            entry["edit"] = row["content"]
        elif row["kind"] in ("up", "down", "clear"):
            entry["rating"] = None if row["kind"] == "clear" else row["kind"]
    return out
