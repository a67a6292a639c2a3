"""The privacy ledger: every adaptation run's (ε, δ) and the mechanism's parameters.

A run is entered before training starts, so that a run killed half-way still counts against the
budget (its noisy updates may already sit in a checkpoint). A resumed run reuses its entry.
"""
from __future__ import annotations

from typing import Any

import sqlite_utils

from storage.conversations import now
from storage.db import transaction


def record(db: sqlite_utils.Database, run_id: str, *, method: str, dp: bool, epsilon: float | None,
           delta: float | None, sigma: float | None, clip: float | None, sample_rate: float | None,
           steps: int, examples: int) -> None:
    """Enter a run's privacy cost (once per run id)."""
    with transaction(db):
        db["privacy_ledger"].insert({
            "run_id": run_id, "method": method, "dp": int(dp), "epsilon": epsilon, "delta": delta,
            "sigma": sigma, "clip": clip, "sample_rate": sample_rate, "steps": steps,
            "examples": examples, "created": now()}, ignore=True)


def entries(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """Every ledger entry, oldest first."""
    return list(db["privacy_ledger"].rows_where(order_by="id"))


def spent(db: sqlite_utils.Database) -> dict[str, Any]:
    """Total ε spent by DP runs (basic composition: ε and δ add up) and the number of non-DP runs."""
    row = db.execute("""SELECT COALESCE(SUM(epsilon), 0), COALESCE(SUM(delta), 0),
                               COALESCE(SUM(dp), 0), COUNT(*) - COALESCE(SUM(dp), 0)
                        FROM privacy_ledger""").fetchone()
    return {"epsilon": row[0], "delta": row[1], "dp_runs": row[2], "non_dp_runs": row[3]}
