"""The user's presence (chat opened, messages sent) and the idle-time daemon's state, shared through the
database so the chat, the daemon and `ember status` see the same thing."""
from __future__ import annotations

from typing import Any

import sqlite_utils

from storage.conversations import now, process_alive
from storage.db import transaction


def record(db: sqlite_utils.Database, kind: str) -> None:
    """Note that the user is here (e.g. `chat_open`); old rows are pruned, only the latest matters."""
    with transaction(db):
        db["activity"].insert({"kind": kind, "created": now()})
        db.execute("DELETE FROM activity WHERE id < (SELECT MAX(id) FROM activity) - 100")


def last_seen(db: sqlite_utils.Database) -> str | None:
    """ISO time of the user's latest sign of life: a message written or the chat opened."""
    row = db.execute("""SELECT MAX(t) FROM (SELECT MAX(created) AS t FROM messages
                                          UNION ALL SELECT MAX(created) FROM activity)""").fetchone()
    return row[0]


def set_daemon(db: sqlite_utils.Database, **fields: Any) -> None:
    """Update the daemon's row (state, reason, last_run, last_result, next_check, pid)."""
    with transaction(db):
        db["daemon_state"].upsert({"id": 1, "updated": now(), "state": fields.pop("state", "idle"), **fields},
                                  pk="id")


def daemon(db: sqlite_utils.Database) -> dict[str, Any]:
    """The daemon's last reported state; `stopped` when its process is gone."""
    rows = list(db["daemon_state"].rows_where("id = 1"))
    if not rows:
        return {"state": "never run"}
    row = dict(rows[0])
    row.pop("id")
    if row["state"] != "stopped" and not (row["pid"] and process_alive(row["pid"])):
        row["state"] = "stopped"
        row["reason"] = "its process is not running"
    return row


def new_messages(db: sqlite_utils.Database) -> int:
    """Messages written since the newest untainted adapter was created (all of them when there is none).

    A tainted adapter does not count: the user forgot something it learned from, so it is withdrawn
    and its material is due to be learned again without the forgotten messages.
    """
    newest = db.execute("SELECT MAX(created) FROM adapters WHERE status != 'tainted'").fetchone()[0]
    if newest is None:
        return db["messages"].count
    return db["messages"].count_where("created > ?", [newest])
