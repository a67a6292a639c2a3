"""Conversations and their messages: the private chat log."""
from __future__ import annotations

import datetime as dt
import json
import os
import re
from typing import Any, Iterable

import sqlite_utils

from storage.db import transaction
from storage.errors import NotFound

NEW_TITLE = "New conversation"
TITLE_CHARS = 60
ROLES = ("system", "user", "assistant")
# A reply's life: written as `generating` while it streams, then one of the final states.
FINAL_STATUSES = ("complete", "cancelled", "interrupted")


def now() -> str:
    """Current UTC time as ISO-8601 (sortable as text)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def title_from(text: str) -> str:
    """A short one-line title from the first thing the user said."""
    line = " ".join(text.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


def create_conversation(db: sqlite_utils.Database, title: str = NEW_TITLE) -> int:
    """Start a conversation and return its id."""
    stamp = now()
    with transaction(db):
        return db["conversations"].insert({"title": title, "created": stamp, "updated": stamp}).last_pk


def get_conversation(db: sqlite_utils.Database, conversation_id: int) -> dict[str, Any]:
    """One conversation's row, or `NotFound`."""
    rows = list(db["conversations"].rows_where("id = ?", [conversation_id]))
    if not rows:
        raise NotFound(f"no conversation with id {conversation_id}; `ember history` lists them")
    return rows[0]


def list_conversations(db: sqlite_utils.Database, limit: int | None = None) -> list[dict[str, Any]]:
    """Conversations, most recently active first, with message counts."""
    sql = """
        SELECT c.id, c.title, c.created, c.updated, COUNT(m.id) AS messages
        FROM conversations c LEFT JOIN messages m ON m.conversation_id = c.id
        GROUP BY c.id ORDER BY c.updated DESC, c.id DESC"""
    params: list[Any] = []
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return [dict(row) for row in db.query(sql, params)]


def rename_conversation(db: sqlite_utils.Database, conversation_id: int, title: str) -> None:
    """Give a conversation a new title."""
    get_conversation(db, conversation_id)
    with transaction(db):
        db["conversations"].update(conversation_id, {"title": title_from(title) or NEW_TITLE})


def messages(db: sqlite_utils.Database, conversation_id: int) -> list[dict[str, Any]]:
    """A conversation's messages, oldest first."""
    return list(db["messages"].rows_where("conversation_id = ?", [conversation_id], order_by="id"))


def add_message(db: sqlite_utils.Database, conversation_id: int, role: str, content: str, *,
                status: str = "complete", model: str | None = None, route: str | None = None,
                adapter_id: str | None = None, tokens: int | None = None,
                seconds: float | None = None) -> int:
    """Append a message and commit it; the first user message also titles a new conversation."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    conversation = get_conversation(db, conversation_id)
    stamp = now()
    with transaction(db):
        message_id = db["messages"].insert({
            "conversation_id": conversation_id, "role": role, "content": content, "created": stamp,
            "model": model, "route": route, "adapter_id": adapter_id, "status": status,
            "writer_pid": os.getpid() if status == "generating" else None,
            "tokens": tokens, "seconds": seconds,
        }).last_pk
        changes = {"updated": stamp}
        if role == "user" and conversation["title"] == NEW_TITLE:
            changes["title"] = title_from(content) or NEW_TITLE
        db["conversations"].update(conversation_id, changes)
    return message_id


def start_reply(db: sqlite_utils.Database, conversation_id: int, **meta: Any) -> int:
    """Insert an empty assistant reply marked `generating`; stream into it with `update_reply`."""
    return add_message(db, conversation_id, "assistant", "", status="generating", **meta)


def update_reply(db: sqlite_utils.Database, message_id: int, content: str) -> None:
    """Save the reply so far, so that a killed process keeps it."""
    with transaction(db):
        db["messages"].update(message_id, {"content": content})


def finish_reply(db: sqlite_utils.Database, message_id: int, content: str, status: str, *,
                 tokens: int | None = None, seconds: float | None = None) -> None:
    """Store the final text of a reply and how it ended."""
    if status not in FINAL_STATUSES:
        raise ValueError(f"status must be one of {FINAL_STATUSES}, not {status!r}")
    with transaction(db):
        db["messages"].update(message_id, {"content": content, "status": status, "writer_pid": None,
                                           "tokens": tokens, "seconds": seconds})


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def existing_ids(db: sqlite_utils.Database, message_ids: Iterable[int]) -> set[int]:
    """Which of these message ids are still stored (the others were forgotten)."""
    ids = json.dumps(sorted(set(message_ids)))
    return {r[0] for r in db.execute("SELECT id FROM messages WHERE id IN (SELECT value FROM json_each(?))", [ids])}


def recover_interrupted(db: sqlite_utils.Database) -> int:
    """Mark replies whose writing process died mid-stream as `interrupted`; return how many."""
    stale = [row["id"] for row in db["messages"].rows_where("status = 'generating'")
             if not row["writer_pid"] or row["writer_pid"] == os.getpid() or not process_alive(row["writer_pid"])]
    if stale:
        with transaction(db):
            for message_id in stale:
                db["messages"].update(message_id, {"status": "interrupted", "writer_pid": None})
    return len(stale)


def fts_query(text: str) -> str:
    """User text as a safe FTS5 query: every word must match, the last as a prefix."""
    words = re.findall(r"\w+", text)
    if not words:
        return ""
    quoted = [f'"{w}"' for w in words]
    quoted[-1] += "*"
    return " ".join(quoted)


def search_messages(db: sqlite_utils.Database, text: str, limit: int = 50) -> list[dict[str, Any]]:
    """Messages matching `text` across all conversations, best match first."""
    query = fts_query(text)
    if not query:
        return []
    sql = """
        SELECT m.id AS message_id, m.conversation_id, c.title, m.role, m.created,
               snippet(messages_fts, 0, '«', '»', '…', 12) AS snippet
        FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid
        JOIN conversations c ON c.id = m.conversation_id
        WHERE messages_fts MATCH ? ORDER BY bm25(messages_fts) LIMIT ?"""
    return [dict(row) for row in db.query(sql, [query, limit])]


def _delete(db: sqlite_utils.Database, message_ids: Iterable[int]) -> dict[str, int]:
    """Delete messages, then any conversation left empty; one transaction.

    Adapters trained on a deleted message are tainted by a trigger; the count says how many.
    """
    ids = list(message_ids)
    with transaction(db):
        tainted = _tainted(db)
        touched = {row["conversation_id"] for row in db.query(
            f"SELECT DISTINCT conversation_id FROM messages WHERE id IN ({','.join('?' * len(ids))})", ids)}
        for message_id in ids:
            db["messages"].delete(message_id)
        emptied = [cid for cid in touched
                   if not db.execute("SELECT 1 FROM messages WHERE conversation_id = ?", [cid]).fetchone()]
        for cid in emptied:
            db["conversations"].delete(cid)
        tainted = _tainted(db) - tainted
    return {"messages": len(ids), "conversations": len(emptied), "adapters_tainted": tainted}


def _tainted(db: sqlite_utils.Database) -> int:
    return db.execute("SELECT COUNT(*) FROM adapters WHERE status = 'tainted'").fetchone()[0]


def forget_message(db: sqlite_utils.Database, message_id: int) -> dict[str, int]:
    """Delete one message."""
    if not db.execute("SELECT 1 FROM messages WHERE id = ?", [message_id]).fetchone():
        raise NotFound(f"no message with id {message_id}; `ember history --json` shows message ids")
    return _delete(db, [message_id])


def delete_conversation(db: sqlite_utils.Database, conversation_id: int) -> dict[str, int]:
    """Delete a conversation and all its messages."""
    get_conversation(db, conversation_id)
    ids = [row["id"] for row in db.query("SELECT id FROM messages WHERE conversation_id = ?",
                                         [conversation_id])]
    with transaction(db):
        result = _delete(db, ids) if ids else {"messages": 0, "conversations": 0, "adapters_tainted": 0}
        if db["conversations"].count_where("id = ?", [conversation_id]):
            db["conversations"].delete(conversation_id)
            result["conversations"] += 1
    return result


def forget_matching(db: sqlite_utils.Database, text: str) -> dict[str, int]:
    """Delete every message containing `text` (case-insensitive substring)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    ids = [row["id"] for row in db.query(
        "SELECT id FROM messages WHERE content LIKE ? ESCAPE '\\'", [f"%{escaped}%"])]
    return _delete(db, ids) if ids else {"messages": 0, "conversations": 0, "adapters_tainted": 0}


def forget_all(db: sqlite_utils.Database) -> dict[str, int]:
    """Delete every conversation and message."""
    with transaction(db):
        tainted = _tainted(db)
        counts = {"messages": db["messages"].count, "conversations": db["conversations"].count}
        db.execute("DELETE FROM messages")
        db.execute("DELETE FROM conversations")
        counts["adapters_tainted"] = _tainted(db) - tainted
    return counts


def export_all(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """Every conversation with its messages, oldest conversation first, for export."""
    out = []
    for conv in reversed(list_conversations(db)):
        conv = dict(conv)
        conv.pop("messages")
        conv["messages"] = [
            {k: row[k] for k in ("id", "role", "content", "created", "status", "model", "route",
                                 "adapter_id", "tokens", "seconds")}
            for row in messages(db, conv["id"])]
        out.append(conv)
    return out
