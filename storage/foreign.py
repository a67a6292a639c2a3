"""Other apps' SQLite databases, read-only, for `ember import`: simonw/llm's `logs.db`, oterm's and elia's.

Rows come out as plain dicts, one conversation at a time (grouped from an ordered scan), so a large
database is read in bounded memory. Nothing here writes: each file is opened with `mode=ro`.
"""
from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

from storage.driver import sqlite3
from storage.errors import InvalidInput

# llm's migrations up to the version Ember was checked against (llm 0.36). A database with others is
# newer: imported only if the columns Ember reads are still there, and the user is told.
LLM_KNOWN_MIGRATIONS = frozenset("""
m001_initial m002_id_primary_key m003_chat_id_foreign_key m004_column_order m004_drop_provider m005_debug
m006_new_logs_table m007_finish_logs_table m008_reply_to_id_foreign_key m008_fix_column_order_in_logs
m009_delete_logs_table_if_empty m010_create_new_log_tables m011_fts_for_responses m012_attachments_tables
m013_usage m014_schemas m015_fragments_tables m016_fragments_table_pks m017_tools_tables m017_tools_plugin
m018_tool_instances m019_resolved_model m020_tool_results_attachments m021_tool_results_exception
m022_response_reasoning m023_message_store m024_tool_instance_references m025_turn_tools_instance_backfill
m026_message_tree_view m027_turns_response_json""".split())
LLM_NEEDS = {"conversations": {"id", "name", "model"},
             "responses": {"id", "model", "prompt", "system", "response", "conversation_id", "datetime_utc"}}
OTERM_NEEDS = {"chat": {"id", "name", "model"}, "message": {"id", "chat_id", "author", "text"}}
ELIA_NEEDS = {"chat": {"id", "model", "title", "started_at"},
              "message": {"id", "chat_id", "role", "content", "timestamp", "model"}}


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to another app's database; `InvalidInput` if it is not one."""
    try:
        conn = sqlite3.connect(f"file:{quote(str(Path(path).resolve()))}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as err:
        raise InvalidInput(f"{path}: not a readable SQLite database ({err}); nothing was imported") from err
    try:
        yield conn
    finally:
        conn.close()


def columns(conn: sqlite3.Connection) -> dict[str, set[str]]:
    """Every table of the database with its column names."""
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {name: {r[1] for r in conn.execute(f"PRAGMA table_info({quote_name(name)})")} for name in names}


def quote_name(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def kind(path: Path) -> str | None:
    """Which app wrote this database: `llm`, `oterm`, `elia`, or None."""
    with read_only(path) as conn:
        tables = columns(conn)
    if {"responses", "conversations"} <= set(tables):
        return "llm"
    if {"chat", "message"} <= set(tables):
        return "oterm" if "author" in tables["message"] else "elia" if "role" in tables["message"] else None
    return None


def _require(path: Path, tables: dict[str, set[str]], needs: dict[str, set[str]], what: str) -> None:
    for table, wanted in needs.items():
        missing = sorted(wanted - tables.get(table, set()))
        if table not in tables:
            raise InvalidInput(f"{path}: table {table!r} is missing, so this is not {what} Ember can read; "
                               "nothing was imported")
        if missing:
            raise InvalidInput(f"{path}: table {table!r} has no column {missing[0]!r} (a schema Ember does not "
                               f"know); nothing was imported")


def llm_newer_migrations(path: Path) -> list[str]:
    """llm migrations this database has that Ember does not know (a newer llm wrote it)."""
    with read_only(path) as conn:
        if "_llm_migrations" not in columns(conn):
            return []
        return sorted(r[0] for r in conn.execute("SELECT name FROM _llm_migrations")
                      if r[0] not in LLM_KNOWN_MIGRATIONS)


def llm_conversations(path: Path) -> Iterator[dict[str, Any]]:
    """llm's conversations, each `{id, name, model, responses: [{id, model, prompt, system, response,
    datetime_utc}]}`, responses oldest first; a response outside any conversation stands alone."""
    with read_only(path) as conn:
        tables = columns(conn)
        _require(path, tables, LLM_NEEDS, "an llm logs.db")
        resolved = "resolved_model" in tables["responses"]
        rows = conn.execute(f"""
            SELECT r.id, r.model, {'r.resolved_model' if resolved else 'NULL'} AS resolved_model, r.prompt,
                   r.system, r.response, r.datetime_utc, COALESCE(r.conversation_id, 'response:' || r.id) AS cid,
                   c.name, c.model AS conversation_model
            FROM responses r LEFT JOIN conversations c ON c.id = r.conversation_id
            ORDER BY cid, r.datetime_utc, r.rowid""")
        for cid, group in itertools.groupby((dict(r) for r in rows), key=lambda r: r["cid"]):
            responses = list(group)
            yield {"id": cid, "name": responses[0]["name"], "model": responses[0]["conversation_model"],
                   "responses": responses}


def oterm_chats(path: Path) -> Iterator[dict[str, Any]]:
    """oterm's chats, each `{id, name, model, system, messages: [{id, author, text}]}` in order."""
    with read_only(path) as conn:
        tables = columns(conn)
        _require(path, tables, OTERM_NEEDS, "an oterm database")
        system = "c.system" if "system" in tables["chat"] else "NULL"
        rows = conn.execute(f"""
            SELECT c.id AS cid, c.name, c.model, {system} AS system, m.id, m.author, m.text
            FROM chat c JOIN message m ON m.chat_id = c.id ORDER BY c.id, m.id""")
        for cid, group in itertools.groupby((dict(r) for r in rows), key=lambda r: r["cid"]):
            messages = list(group)
            first = messages[0]
            yield {"id": cid, "name": first["name"], "model": first["model"], "system": first["system"],
                   "messages": messages}


def elia_chats(path: Path) -> Iterator[dict[str, Any]]:
    """elia's chats, each `{id, title, model, started_at, messages: [{id, role, content, timestamp, model}]}`."""
    with read_only(path) as conn:
        tables = columns(conn)
        _require(path, tables, ELIA_NEEDS, "an elia database")
        rows = conn.execute("""
            SELECT c.id AS cid, c.title, c.model AS chat_model, c.started_at, m.id, m.role, m.content,
                   m.timestamp, m.model
            FROM chat c JOIN message m ON m.chat_id = c.id ORDER BY c.id, m.id""")
        for cid, group in itertools.groupby((dict(r) for r in rows), key=lambda r: r["cid"]):
            messages = list(group)
            first = messages[0]
            yield {"id": cid, "title": first["title"], "model": first["chat_model"],
                   "started_at": first["started_at"], "messages": messages}
