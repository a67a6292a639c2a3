"""Numbered schema migrations, applied once each and recorded in `schema_version`.

Each migration is a small function registered with `@migration`; its position in `MIGRATIONS` is its
version number. Never edit or reorder a released migration: add a new one.
"""
from __future__ import annotations

import datetime as dt
from typing import Callable

import sqlite_utils

from storage.errors import EmberError

Migration = Callable[[sqlite_utils.Database], None]
MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    """Register `fn` as the next migration."""
    MIGRATIONS.append(fn)
    return fn


def current_version(db: sqlite_utils.Database) -> int:
    """The highest migration applied to `db` (0 for a new database)."""
    if not db["schema_version"].exists():
        return 0
    return db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]


def migrate(db: sqlite_utils.Database, *, target: int | None = None) -> int:
    """Apply pending migrations in order, each in its own transaction; return the new version."""
    target = len(MIGRATIONS) if target is None else target
    if not db["schema_version"].exists():
        db["schema_version"].create({"version": int, "name": str, "applied": str}, pk="version")
    version = current_version(db)
    if version > len(MIGRATIONS):
        raise EmberError(f"this database is at schema version {version}, newer than this Ember "
                         f"({len(MIGRATIONS)}); upgrade Ember")
    for number, fn in enumerate(MIGRATIONS[version:target], start=version + 1):
        with db.atomic():
            fn(db)
            db["schema_version"].insert({
                "version": number, "name": fn.__name__,
                "applied": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            })
    return current_version(db)


@migration
def m001_conversations_and_messages(db: sqlite_utils.Database) -> None:
    """The chat log: conversations and their messages."""
    db["conversations"].create({
        "id": int, "title": str, "created": str, "updated": str,
    }, pk="id", not_null={"title", "created", "updated"})
    db["messages"].create({
        "id": int, "conversation_id": int, "role": str, "content": str, "created": str,
        "model": str, "adapter_id": str, "route": str,
    }, pk="id", not_null={"conversation_id", "role", "content", "created"},
        foreign_keys=[("conversation_id", "conversations", "id")])
    # sqlite-utils cannot declare ON DELETE CASCADE; deleting a conversation deletes its messages
    # explicitly in storage.conversations, inside one transaction.
    db["messages"].create_index(["conversation_id", "id"])


@migration
def m002_reply_status(db: sqlite_utils.Database) -> None:
    """Replies are written while they stream, so a kill mid-reply keeps what was said.

    `status` is complete | generating | cancelled | interrupted; `writer_pid` lets a later process
    tell a reply still streaming elsewhere from one whose writer died.
    """
    db["messages"].add_column("status", str, not_null_default="complete")
    db["messages"].add_column("writer_pid", int)
    db["messages"].add_column("tokens", int)
    db["messages"].add_column("seconds", float)


@migration
def m003_message_search(db: sqlite_utils.Database) -> None:
    """Full-text search across past conversations (FTS5, kept in sync by triggers)."""
    db.executescript("""
        CREATE VIRTUAL TABLE messages_fts USING fts5(
            content, content='messages', content_rowid='id', tokenize='porter unicode61');
        INSERT INTO messages_fts(rowid, content) SELECT id, content FROM messages;
        CREATE TRIGGER messages_ai AFTER INSERT ON messages BEGIN
            INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
        END;
        CREATE TRIGGER messages_ad AFTER DELETE ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
        END;
        CREATE TRIGGER messages_au AFTER UPDATE OF content ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
            INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
        END;
    """)
