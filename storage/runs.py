"""Adaptation runs in progress, shared through the database so the chat and `ember status` can show them."""
from __future__ import annotations

import json
import os
import statistics
from typing import Any

import sqlite_utils

from storage.conversations import process_alive, now
from storage.db import transaction

FIELDS = ("step", "steps", "loss", "epsilon_spent", "eta_seconds", "message", "adapter_id", "status",
          "peak_rss_mb", "base_params", "dtype", "base_bytes")


def start(db: sqlite_utils.Database, run_id: str, *, method: str, steps: int, fingerprint: str) -> None:
    """Record a run as running in this process (a resumed run takes its row over)."""
    stamp = now()
    with transaction(db):
        db["adapt_runs"].upsert({"id": run_id, "method": method, "status": "running", "pid": os.getpid(),
                                 "started": stamp, "updated": stamp, "steps": steps,
                                 "fingerprint": fingerprint}, pk="id")


def update(db: sqlite_utils.Database, run_id: str, **fields: Any) -> None:
    """Report progress (step, loss, ε spent, ETA, message) or the final status."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown run fields {sorted(unknown)}")
    with transaction(db):
        db["adapt_runs"].update(run_id, {**fields, "updated": now()})


def get(db: sqlite_utils.Database, run_id: str) -> dict[str, Any] | None:
    """One run's row, or None."""
    rows = list(db["adapt_runs"].rows_where("id = ?", [run_id]))
    return rows[0] if rows else None


def current(db: sqlite_utils.Database) -> dict[str, Any] | None:
    """The run in progress (its process alive), or None."""
    for row in db["adapt_runs"].rows_where("status = 'running'", order_by="started DESC"):
        if row["pid"] and process_alive(row["pid"]):
            return row
    return None


def resumable(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """Runs that stopped before finishing (paused, killed, crashed), newest first.

    A run still marked running whose process is gone is marked interrupted first.
    """
    stale = [row for row in db["adapt_runs"].rows_where("status = 'running'")
             if not row["pid"] or row["pid"] == os.getpid() or not process_alive(row["pid"])]
    if stale:
        with transaction(db):
            for row in stale:
                db["adapt_runs"].update(row["id"], {"status": "interrupted", "pid": None})
    return list(db["adapt_runs"].rows_where("status = 'interrupted'", order_by="started DESC"))


def latest(db: sqlite_utils.Database) -> dict[str, Any] | None:
    """The most recent run of any status."""
    rows = list(db["adapt_runs"].rows_where(order_by="started DESC", limit=1))
    return rows[0] if rows else None


def peak_rss_mb(db: sqlite_utils.Database, method: str, *, unsized: bool = False,
                by: str = "base_params") -> float | None:
    """The highest peak memory a finished run of this method needed on this machine, if any ran
    (`unsized`: only runs from before the model's size `by`, parameters or `base_bytes`, was recorded)."""
    if by not in ("base_params", "base_bytes"):
        raise ValueError(f"no run size {by!r}")
    where = f" AND {by} IS NULL" if unsized else ""
    return db.execute(f"SELECT MAX(peak_rss_mb) FROM adapt_runs WHERE method = ? AND status = 'done'{where}",
                      [method]).fetchone()[0]


def peaks_by_size(db: sqlite_utils.Database, method: str, dtype: str, *,
                  by: str = "base_params") -> list[tuple[int, float]]:
    """(model size, highest peak memory in MB) of this method's finished runs in this dtype on this
    machine, one pair per size; the size is `by`: the base model's parameters, or `base_bytes`, its GGUF
    file's size (runs from before that size was recorded are left out)."""
    if by not in ("base_params", "base_bytes"):
        raise ValueError(f"no run size {by!r}")
    return [(int(p), float(m)) for p, m in db.execute(
        f"SELECT {by}, MAX(peak_rss_mb) FROM adapt_runs WHERE method = ? AND status = 'done' "
        f"AND {by} IS NOT NULL AND peak_rss_mb IS NOT NULL AND COALESCE(dtype, 'float32') = ? "
        f"GROUP BY {by}", [method, dtype])]


def gain_per_minute(db: sqlite_utils.Database, method: str, last: int = 3) -> float | None:
    """Held-out loss this method's runs gained per minute of training on this machine (nats/min): the
    gate's base loss minus the adapter's, over its training time, the median of the `last` finished
    runs; None when none finished here."""
    rates = []
    for (evaluation,) in db.execute(
            "SELECT a.eval FROM adapt_runs r JOIN adapters a ON a.id = r.adapter_id "
            "WHERE r.method = ? AND r.status = 'done' ORDER BY r.updated DESC LIMIT ?", [method, last]):
        ev = json.loads(evaluation or "{}")
        if ev.get("base_loss") is not None and ev.get("heldout_loss") is not None and ev.get("train_seconds"):
            rates.append((ev["base_loss"] - ev["heldout_loss"]) / (ev["train_seconds"] / 60))
    return statistics.median(rates) if rates else None
