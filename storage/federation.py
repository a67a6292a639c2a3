"""What this device did in household learning, one row per federated round and phase (`ember federate`)."""
from __future__ import annotations

from typing import Any

import sqlite_utils

from storage.conversations import now
from storage.db import transaction

STATUSES = ("contributed", "skipped", "refused", "promoted", "kept")


def record(db: sqlite_utils.Database, *, server: str, round: int, kind: str, phase: str, status: str,
           **fields: Any) -> int:
    """Enter one round's outcome (rounds, run_id, adapter_id, examples, epsilon, sigma, clip, bytes_sent,
    bytes_received, message); returns its row id."""
    allowed = {"rounds", "run_id", "adapter_id", "examples", "epsilon", "sigma", "clip", "bytes_sent",
               "bytes_received", "message"}
    unknown = set(fields) - allowed
    if unknown:
        raise ValueError(f"unknown federation fields {sorted(unknown)}")
    with transaction(db):
        return db["federation_rounds"].insert({"server": server, "round": round, "kind": kind, "phase": phase,
                                               "status": status, **fields, "created": now()}).last_pk


def rounds(db: sqlite_utils.Database, *, limit: int | None = None) -> list[dict[str, Any]]:
    """This device's federated rounds, oldest first (the newest `limit` when given)."""
    rows = list(db["federation_rounds"].rows_where(order_by="id DESC", limit=limit))
    return rows[::-1]


def latest_id(db: sqlite_utils.Database) -> int:
    """The id of this device's newest round row (0: none), to tell the rows a later run adds."""
    row = db.execute("SELECT COALESCE(MAX(id), 0) FROM federation_rounds").fetchone()
    return int(row[0])


def since(db: sqlite_utils.Database, after_id: int) -> list[dict[str, Any]]:
    """The round rows entered after row `after_id`, oldest first."""
    return list(db["federation_rounds"].rows_where("id > ?", [after_id], order_by="id"))
