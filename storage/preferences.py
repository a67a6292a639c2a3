"""Preferences the chat keeps between runs (the theme, recent models): one JSON value per key."""
from __future__ import annotations

import json
from typing import Any

import sqlite_utils

from storage.conversations import now
from storage.db import transaction

THEME = "theme"                  # the Textual theme's name
RECENT_MODELS = "recent_models"  # GGUF paths switched to in the chat, newest first
RECENT_KEPT = 8


def get(db: sqlite_utils.Database, key: str, default: Any = None) -> Any:
    """The value stored under `key`, or `default`."""
    row = db.execute("SELECT value FROM preferences WHERE key = ?", [key]).fetchone()
    if row is None:
        return default
    try:
        return json.loads(row[0])
    except ValueError:   # written by hand with a SQLite tool, say: treated as unset rather than fatal
        return default


def put(db: sqlite_utils.Database, key: str, value: Any) -> None:
    """Store `value` (JSON-serialisable) under `key`."""
    with transaction(db):
        db.execute("INSERT INTO preferences (key, value, updated) VALUES (?, ?, ?) "
                   "ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated = excluded.updated",
                   [key, json.dumps(value, ensure_ascii=False), now()])


def recent_models(db: sqlite_utils.Database) -> list[str]:
    """GGUF paths recently switched to, newest first."""
    value = get(db, RECENT_MODELS, [])
    return [p for p in value if isinstance(p, str)] if isinstance(value, list) else []


def add_recent_model(db: sqlite_utils.Database, path: str) -> list[str]:
    """Put `path` first among the recent models (at most `RECENT_KEPT` are kept); returns the list."""
    recent = [path, *[p for p in recent_models(db) if p != path]][:RECENT_KEPT]
    put(db, RECENT_MODELS, recent)
    return recent
