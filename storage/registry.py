"""The adapter registry: adapters by id with their metadata and status, and their lineage.

At most one adapter is `active`: the one the chat applies. `activated` numbers the times adapters were
put in use, so `rollback` can return to the one before. A `tainted` adapter was trained on a message the user
has since forgotten (a trigger marks it); it is never used again.
"""
from __future__ import annotations

import json
from typing import Any, Iterable

import sqlite_utils

from storage.conversations import existing_ids, now
from storage.db import transaction
from storage.errors import InvalidInput, NotFound

STATUSES = ("active", "inactive", "rejected", "tainted")


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    row["params"] = json.loads(row["params"] or "{}")
    row["eval"] = json.loads(row["eval"] or "{}")
    return row


def register(db: sqlite_utils.Database, adapter: dict[str, Any], sources: Iterable[tuple[int, str]],
             *, activate: bool) -> None:
    """Record a complete adapter file and the (message id, split) pairs it was trained and checked on.

    With `activate`, it becomes the active adapter in the same transaction. An adapter whose source
    messages were forgotten while it trained is registered tainted, never active.
    """
    row = dict(adapter)
    row["params"] = json.dumps(row.get("params") or {})
    row["eval"] = json.dumps(row.get("eval") or {})
    row.setdefault("created", now())
    sources = list(sources)
    with transaction(db):
        ids = [m for m, _ in sources]
        present = existing_ids(db, ids)
        missing = [m for m in ids if m not in present]
        if missing:
            row["status"], row["reason"] = "tainted", f"trained on message {missing[0]}, since forgotten"
        elif activate:
            db.execute("UPDATE adapters SET status = 'inactive' WHERE status = 'active'")
            row["status"], row["activated"] = "active", _next_activation(db)
        db["adapters"].insert(row)
        db["adapter_sources"].insert_all(
            [{"adapter_id": row["id"], "message_id": m, "split": split} for m, split in sources])


def _next_activation(db: sqlite_utils.Database) -> int:
    return db.execute("SELECT COALESCE(MAX(activated), 0) + 1 FROM adapters").fetchone()[0]


def get(db: sqlite_utils.Database, adapter_id: str) -> dict[str, Any]:
    """One adapter, or `NotFound`."""
    rows = list(db["adapters"].rows_where("id = ?", [adapter_id]))
    if not rows:
        raise NotFound(f"no adapter with id {adapter_id}; `ember adapters list` shows them")
    return _decode(rows[0])


def list_adapters(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """Every adapter, newest first."""
    return [_decode(r) for r in db["adapters"].rows_where(order_by="created DESC, id DESC")]


def active(db: sqlite_utils.Database) -> dict[str, Any] | None:
    """The adapter in use, or None for the base model."""
    rows = list(db["adapters"].rows_where("status = 'active'", limit=1))
    return _decode(rows[0]) if rows else None


def use(db: sqlite_utils.Database, adapter_id: str) -> dict[str, Any]:
    """Make an adapter the active one; tainted adapters are refused."""
    adapter = get(db, adapter_id)
    if adapter["status"] == "tainted":
        raise InvalidInput(f"adapter {adapter_id} is tainted ({adapter['reason']}); it cannot be used. "
                           "Run `ember adapt` to train one without the forgotten messages")
    with transaction(db):
        db.execute("UPDATE adapters SET status = 'inactive' WHERE status = 'active'")
        db["adapters"].update(adapter_id, {"status": "active", "activated": _next_activation(db)})
    return get(db, adapter_id)


def rollback(db: sqlite_utils.Database) -> dict[str, Any] | None:
    """Retire the active adapter and return to the one used before it (None: the base model)."""
    current = active(db)
    if current is None:
        raise InvalidInput("no adapter is active; there is nothing to roll back")
    earlier = list(db.query(
        """SELECT id FROM adapters WHERE status = 'inactive' AND activated IS NOT NULL AND activated < ?
           ORDER BY activated DESC LIMIT 1""", [current["activated"] or 0]))
    with transaction(db):
        db["adapters"].update(current["id"], {"status": "inactive", "activated": None})
        if earlier:
            db["adapters"].update(earlier[0]["id"], {"status": "active", "activated": _next_activation(db)})
    return active(db)


def preview_remove(db: sqlite_utils.Database, adapter_id: str) -> dict[str, Any]:
    """What removing an adapter deletes: its record, its lineage rows (`sources`) and its file; `active`
    says whether the chat falls back to the base model. `NotFound` for an unknown id."""
    adapter = get(db, adapter_id)
    return {"adapters": 1, "id": adapter_id, "path": adapter["path"], "status": adapter["status"],
            "active": adapter["status"] == "active",
            "sources": db["adapter_sources"].count_where("adapter_id = ?", [adapter_id])}


def remove(db: sqlite_utils.Database, adapter_id: str) -> dict[str, Any]:
    """Delete an adapter's record and lineage; returns the row (the caller deletes the file)."""
    adapter = get(db, adapter_id)
    with transaction(db):
        db["adapter_sources"].delete_where("adapter_id = ?", [adapter_id])
        db["adapters"].delete(adapter_id)
    return adapter


def sources(db: sqlite_utils.Database, adapter_id: str) -> list[dict[str, Any]]:
    """The message ids an adapter was trained (`train`) and evaluated (`heldout`) on."""
    return list(db["adapter_sources"].rows_where("adapter_id = ?", [adapter_id], order_by="message_id"))


def tainted_count(db: sqlite_utils.Database) -> int:
    """How many adapters are withdrawn because their data was forgotten."""
    return db["adapters"].count_where("status = 'tainted'")


def learned_from(db: sqlite_utils.Database, adapter_id: str) -> list[dict[str, Any]]:
    """The conversations an adapter was trained (or evaluated) on, by lineage: id, title and how many
    of their messages it read, newest conversation first."""
    get(db, adapter_id)
    return [dict(r) for r in db.query("""
        SELECT c.id, c.title, COUNT(*) AS messages FROM adapter_sources s
        JOIN messages m ON m.id = s.message_id JOIN conversations c ON c.id = m.conversation_id
        WHERE s.adapter_id = ? GROUP BY c.id ORDER BY c.updated DESC, c.id DESC""", [adapter_id])]


def trained_on_conversation(db: sqlite_utils.Database, conversation_id: int) -> list[str]:
    """Adapters not yet tainted that read any message of this conversation (forgetting it taints them)."""
    return [r[0] for r in db.execute("""
        SELECT DISTINCT s.adapter_id FROM adapter_sources s JOIN messages m ON m.id = s.message_id
        JOIN adapters a ON a.id = s.adapter_id
        WHERE m.conversation_id = ? AND a.status != 'tainted' ORDER BY s.adapter_id""", [conversation_id])]
