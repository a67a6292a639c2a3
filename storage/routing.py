"""The router's decision log and its fitted policies (see assistant/router.py)."""
from __future__ import annotations

import json
from typing import Any

import sqlite_utils

from storage.conversations import now
from storage.db import transaction


def record_decision(db: sqlite_utils.Database, message_id: int | None, route: str, reason: str,
                    features: dict[str, Any], policy_id: int | None, seconds: float) -> int:
    """Log one routing decision with the features it was made on; returns its id."""
    with transaction(db):
        return db["route_decisions"].insert({
            "message_id": message_id, "created": now(), "route": route, "reason": reason,
            "features": json.dumps(features, sort_keys=True), "policy_id": policy_id,
            "seconds": round(seconds, 4)}).last_pk


def decision_for(db: sqlite_utils.Database, message_id: int) -> dict[str, Any] | None:
    """The decision that routed the reply `message_id`, or None (routed by hand, or not logged)."""
    row = db.execute("SELECT route, reason, features, policy_id, seconds, created FROM route_decisions "
                     "WHERE message_id = ? ORDER BY id DESC LIMIT 1", [message_id]).fetchone()
    if row is None:
        return None
    return {"route": row[0], "reason": row[1], "features": json.loads(row[2]), "policy_id": row[3],
            "seconds": row[4], "created": row[5]}


def decision_counts(db: sqlite_utils.Database) -> dict[str, int]:
    """How many logged decisions took each route."""
    return {route: n for route, n in db.execute(
        "SELECT route, COUNT(*) FROM route_decisions GROUP BY route ORDER BY route")}


def save_policy(db: sqlite_utils.Database, thresholds: dict[str, Any], items: int, adapter_id: str | None,
                report: dict[str, Any]) -> int:
    """Store a fitted policy; it is the one in use from now on."""
    with transaction(db):
        return db["router_policies"].insert({
            "created": now(), "thresholds": json.dumps(thresholds, sort_keys=True), "items": items,
            "adapter_id": adapter_id, "report": json.dumps(report, sort_keys=True)}).last_pk


def current_policy(db: sqlite_utils.Database) -> dict[str, Any] | None:
    """The newest fitted policy (id, created, thresholds, items, adapter_id, report), or None."""
    row = db.execute("SELECT id, created, thresholds, items, adapter_id, report FROM router_policies "
                     "ORDER BY id DESC LIMIT 1").fetchone()
    if row is None:
        return None
    return {"id": row[0], "created": row[1], "thresholds": json.loads(row[2]), "items": row[3],
            "adapter_id": row[4], "report": json.loads(row[5]) if row[5] else None}


def labelled_since(db: sqlite_utils.Database, created: str | None) -> int:
    """Replies the user approved or edited after `created` (None: ever): new data to fit the router on."""
    sql = "SELECT COUNT(DISTINCT message_id) FROM feedback WHERE kind IN ('up', 'edit')"
    return db.execute(sql + (" AND created > ?" if created else ""), [created] if created else []).fetchone()[0]
