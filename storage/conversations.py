"""Conversations and their messages: the private chat log."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import sqlite_utils

from storage.db import db_path, transaction
from storage.errors import NotFound

NEW_TITLE = "New conversation"
TITLE_CHARS = 60
ROLES = ("system", "user", "assistant")
# A reply's life: written as `generating` while it streams, then one of the final states.
# complete: the model ended its turn; length: it hit the token limit (a reply that may loop, never learned
# from as approved text); empty: it ended without a word; cancelled, interrupted: cut short.
FINAL_STATUSES = ("complete", "length", "empty", "cancelled", "interrupted")
ORIGINS = (None, "api")   # where a message came from: Ember itself, or a client of `ember serve`
CLIENT_CHARS = 200        # a User-Agent is the client's say; keep what names it, not an essay


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


def get_message(db: sqlite_utils.Database, message_id: int) -> dict[str, Any]:
    """One message's row, or `NotFound`."""
    rows = list(db["messages"].rows_where("id = ?", [message_id]))
    if not rows:
        raise NotFound(f"no message with id {message_id}; `ember history --json` shows message ids")
    return rows[0]


def list_conversations(db: sqlite_utils.Database, limit: int | None = None) -> list[dict[str, Any]]:
    """Conversations, most recently active first, with message counts."""
    sql = """
        SELECT c.id, c.title, c.created, c.updated, c.current_id, COUNT(m.id) AS messages
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
    """A conversation's messages, every branch, oldest first (`branch` gives the one the user kept)."""
    return list(db["messages"].rows_where("conversation_id = ?", [conversation_id], order_by="id"))


def _path(db: sqlite_utils.Database, start: int) -> list[int]:
    """Ids from the root to `start`, then on down by the newest child to a leaf (recursive CTEs)."""
    return [r[0] for r in db.execute("""
        WITH RECURSIVE up(id, depth) AS (
            SELECT ?, 0
            UNION ALL SELECT m.parent_id, up.depth - 1 FROM messages m JOIN up ON m.id = up.id
            WHERE m.parent_id IS NOT NULL),
        down(id, depth) AS (
            SELECT ?, 0
            UNION ALL SELECT (SELECT MAX(c.id) FROM messages c WHERE c.parent_id = down.id), down.depth + 1
            FROM down WHERE EXISTS (SELECT 1 FROM messages c WHERE c.parent_id = down.id))
        SELECT id FROM (SELECT id, depth FROM up UNION SELECT id, depth FROM down) ORDER BY depth""",
        [start, start])]


def _kept_start(db: sqlite_utils.Database, conversation_id: int) -> int | None:
    row = db.execute("SELECT current_id FROM conversations WHERE id = ?", [conversation_id]).fetchone()
    return row[0] if row else None


def branch(db: sqlite_utils.Database, conversation_id: int, through: int | None = None) -> list[dict[str, Any]]:
    """The kept branch of a conversation, root first: the path to its `current_id`, continued down by
    the newest child to a leaf (`through`: the branch through that message instead).

    Each row carries `alternatives` (how many messages share its parent and role, itself included) and
    `alternative` (its 1-based place among them, oldest first).
    """
    start = through if through is not None else _kept_start(db, conversation_id)
    if start is None:
        return []
    ids = _path(db, start)
    rows = {row["id"]: row for row in db.query("""
        SELECT m.*,
            CASE WHEN m.parent_id IS NULL THEN (
                SELECT COUNT(*) FROM messages s WHERE s.conversation_id = m.conversation_id
                AND s.parent_id IS NULL AND s.role = m.role)
            ELSE (SELECT COUNT(*) FROM messages s WHERE s.parent_id = m.parent_id AND s.role = m.role) END
            AS alternatives,
            CASE WHEN m.parent_id IS NULL THEN (
                SELECT COUNT(*) FROM messages s WHERE s.conversation_id = m.conversation_id
                AND s.parent_id IS NULL AND s.role = m.role AND s.id <= m.id)
            ELSE (SELECT COUNT(*) FROM messages s WHERE s.parent_id = m.parent_id AND s.role = m.role
                  AND s.id <= m.id) END AS alternative
        FROM messages m WHERE m.id IN (SELECT value FROM json_each(?)) AND m.conversation_id = ?""",
        [json.dumps(ids), conversation_id])}
    return [rows[i] for i in ids if i in rows]


def branch_ids(db: sqlite_utils.Database, conversation_id: int) -> set[int]:
    """Ids of the messages on a conversation's kept branch."""
    start = _kept_start(db, conversation_id)
    return set() if start is None else set(_path(db, start))


def alternatives(db: sqlite_utils.Database, message_id: int) -> list[int]:
    """The ids of a message and its alternatives (same parent, same role), oldest first."""
    row = db.execute("SELECT conversation_id, parent_id, role FROM messages WHERE id = ?", [message_id]).fetchone()
    if row is None:
        raise NotFound(f"no message with id {message_id}; `ember history --json` shows message ids")
    return [r[0] for r in db.execute(
        "SELECT id FROM messages WHERE conversation_id = ? AND parent_id IS ? AND role = ? ORDER BY id", list(row))]


def choose(db: sqlite_utils.Database, message_id: int) -> int:
    """Keep the branch through `message_id` (continued down by the newest child); returns its leaf.

    Memories of the messages that leave the kept branch go with it (they come back when it is chosen
    again): history, memory and learning read the kept branch alone.
    """
    row = db.execute("SELECT conversation_id FROM messages WHERE id = ?", [message_id]).fetchone()
    if row is None:
        raise NotFound(f"no message with id {message_id}; `ember history --json` shows message ids")
    conversation_id = row[0]
    with transaction(db):
        leaf = _path(db, message_id)[-1]
        _keep(db, conversation_id, leaf)
    return leaf


def _keep(db: sqlite_utils.Database, conversation_id: int, leaf: int) -> None:
    """Make `leaf` the end of the kept branch, dropping the memories of messages that leave it."""
    before = branch_ids(db, conversation_id)
    db.execute("UPDATE conversations SET current_id = ? WHERE id = ?", [leaf, conversation_id])
    left = before - branch_ids(db, conversation_id)
    if left:
        db.execute("DELETE FROM memory_chunks WHERE message_id IN (SELECT value FROM json_each(?))", [_ids(left)])


def add_message(db: sqlite_utils.Database, conversation_id: int, role: str, content: str, *,
                status: str = "complete", model: str | None = None, route: str | None = None,
                adapter_id: str | None = None, tokens: int | None = None,
                seconds: float | None = None, origin: str | None = None, client: str | None = None,
                parent_id: int | None | str = "kept") -> int:
    """Append a message and commit it; the first user message also titles a new conversation.

    It follows `parent_id` (by default the end of the kept branch; None: a new root) and becomes the
    end of the kept branch: a message with another parent starts a branch beside the old one, which
    stays stored. `origin` says where it came from (None: Ember's own chat or CLI; `api`: `ember serve`) and
    `client` which program sent it (an HTTP User-Agent, cut to CLIENT_CHARS).
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    if origin not in ORIGINS:
        raise ValueError(f"origin must be one of {ORIGINS}, not {origin!r}")
    conversation = get_conversation(db, conversation_id)
    stamp = now()
    with transaction(db):
        start = _kept_start(db, conversation_id)
        leaf = _path(db, start)[-1] if start is not None else None
        if parent_id == "kept":
            parent_id = leaf
        elif parent_id is not None and not db.execute(
                "SELECT 1 FROM messages WHERE id = ? AND conversation_id = ?", [parent_id, conversation_id]).fetchone():
            raise NotFound(f"no message {parent_id} in conversation {conversation_id}")
        message_id = db["messages"].insert({
            "conversation_id": conversation_id, "role": role, "content": content, "created": stamp,
            "model": model, "route": route, "adapter_id": adapter_id, "status": status,
            "writer_pid": os.getpid() if status == "generating" else None,
            "tokens": tokens, "seconds": seconds, "origin": origin,
            "client": client[:CLIENT_CHARS] if client else None, "parent_id": parent_id,
        }).last_pk
        if parent_id == leaf:   # the kept branch grows by one: nothing leaves it
            db.execute("UPDATE conversations SET current_id = ? WHERE id = ?", [message_id, conversation_id])
        else:
            _keep(db, conversation_id, message_id)
        changes = {"updated": stamp}
        if role == "user" and conversation["title"] == NEW_TITLE:
            changes["title"] = title_from(content) or NEW_TITLE
        db["conversations"].update(conversation_id, changes)
    return message_id


def api_conversations(db: sqlite_utils.Database) -> set[int]:
    """Conversations holding any message that came through `ember serve` (origin `api`)."""
    return {row[0] for row in db.execute(
        "SELECT DISTINCT conversation_id FROM messages WHERE origin = 'api'")}


def start_reply(db: sqlite_utils.Database, conversation_id: int, **meta: Any) -> int:
    """Insert an empty assistant reply marked `generating`; stream into it with `update_reply`."""
    return add_message(db, conversation_id, "assistant", "", status="generating", **meta)


def update_reply(db: sqlite_utils.Database, message_id: int, content: str) -> None:
    """Save the reply so far, so that a killed process keeps it.

    `seconds` then says how long the reply has been generating: created + seconds is the last time its
    writer was heard from, which `recover_interrupted` uses to tell a stalled row from a live one.
    """
    with transaction(db):
        db.execute("UPDATE messages SET content = ?, "
                   "seconds = ROUND((julianday('now') - julianday(created)) * 86400, 3) WHERE id = ?",
                   [content, message_id])


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


def parse_time(stamp: Any) -> dt.datetime | None:
    """A stored ISO-8601 time as an aware datetime (naive counts as UTC), or None if it is not one."""
    if not isinstance(stamp, str):
        return None
    try:
        when = dt.datetime.fromisoformat(stamp.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


# A streaming writer saves its reply at least every 0.5 s (assistant/conversation.py). Its longest
# healthy silence is before the first token: a full context's prompt pass (seconds on 2 cores) plus
# busy waits on the database (seconds). A row silent for ten minutes, well over 10x that, belongs to
# a writer that is stuck or gone; a false alarm is harmless (the writer's finish_reply sets the final
# status anyway), while a missed one leaves the reply shown as "…" for good.
SILENT_AFTER = dt.timedelta(minutes=10)


def _ember_command(args: list[str]) -> bool:
    """`ember …` (the console script, run directly or by python) or `python -m assistant …`."""
    if any(Path(arg).name == "ember" for arg in args[:2]):
        return True
    after_m = args[args.index("-m") + 1:][:1] if "-m" in args else []
    return after_m in (["assistant"], ["assistant.cli"])


def is_ember_process(pid: int, database: str | Path | None = None) -> bool:
    """Whether `pid` is a live Ember process: an `ember`/`python -m assistant` command line, or a
    process (the chat under a test runner, say) holding `database` open. False for a reused pid."""
    import psutil

    try:
        process = psutil.Process(pid)
        if _ember_command(process.cmdline()):
            return True
        if database is None:
            return False
        target = os.path.realpath(database)
        return any(os.path.realpath(f.path) == target for f in process.open_files())
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        # Another user's process: it cannot be writing to this user's private (0600) database.
        return False


def writer_gone(row: dict[str, Any], *, database: str | None = None, now: dt.datetime | None = None) -> bool:
    """Whether a `generating` reply has no live writer: no pid, the pid is this process (which is not
    writing it), dead, reused by a non-Ember process, or the row has been silent past `SILENT_AFTER`."""
    pid = row.get("writer_pid")
    if not pid or pid == os.getpid() or not process_alive(pid) or not is_ember_process(pid, database):
        return True
    created = parse_time(row.get("created"))
    if created is None:
        return False   # an odd date tells nothing about silence; the pid checks above decide
    so_far = row.get("seconds")
    heard = created + dt.timedelta(seconds=so_far if isinstance(so_far, (int, float)) else 0)
    return (now or dt.datetime.now(dt.timezone.utc)) - heard > SILENT_AFTER


def recover_interrupted(db: sqlite_utils.Database) -> int:
    """Mark replies whose writing process died, was replaced, or went silent mid-stream as `interrupted`;
    return how many."""
    rows = list(db["messages"].rows_where("status = 'generating'"))
    if not rows:
        return 0
    database = db_path(db)
    stale = [row["id"] for row in rows if writer_gone(row, database=database)]
    if stale:
        with transaction(db):
            for message_id in stale:
                db.execute("UPDATE messages SET status = 'interrupted', writer_pid = NULL "
                           "WHERE id = ? AND status = 'generating'", [message_id])
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


@dataclasses.dataclass(frozen=True)
class Deletion:
    """What a forget removes: these messages, and these conversations whole (with any messages they
    gain before the delete runs). A conversation left with no messages goes too. `import_ids`: imports
    (`ember forget --source`) whose notes go as well, and whose records of having been imported."""

    message_ids: tuple[int, ...]
    conversation_ids: tuple[int, ...] = ()
    import_ids: tuple[int, ...] = ()


def _ids(ids: Iterable[int]) -> str:
    return json.dumps(sorted(set(ids)))


def select_message(db: sqlite_utils.Database, message_id: int) -> Deletion:
    """One message, or `NotFound`."""
    if not db.execute("SELECT 1 FROM messages WHERE id = ?", [message_id]).fetchone():
        raise NotFound(f"no message with id {message_id}; `ember history --json` shows message ids")
    return Deletion((message_id,))


def select_conversation(db: sqlite_utils.Database, conversation_id: int) -> Deletion:
    """A conversation and all its messages, or `NotFound`."""
    get_conversation(db, conversation_id)
    ids = [r[0] for r in db.execute("SELECT id FROM messages WHERE conversation_id = ? ORDER BY id",
                                    [conversation_id])]
    return Deletion(tuple(ids), (conversation_id,))


def select_matching(db: sqlite_utils.Database, text: str, *, whole_exchanges: bool = True) -> Deletion:
    """Messages containing `text` (case-insensitive, literal). With `whole_exchanges`, each match takes
    its whole exchange along (a question and the replies to it), so no conversation keeps half of one."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    hits = {r[0] for r in db.execute("SELECT id FROM messages WHERE content LIKE ? ESCAPE '\\'",
                                      [f"%{escaped}%"])}
    if not whole_exchanges or not hits:
        return Deletion(tuple(sorted(hits)))
    chosen: set[int] = set()
    for group in _exchanges(db, hits):
        if hits.intersection(group):
            chosen.update(group)
    return Deletion(tuple(sorted(chosen)))


def _exchanges(db: sqlite_utils.Database, message_ids: set[int]) -> list[list[int]]:
    """The exchanges of the conversations holding these messages: each user message with what follows
    it up to the next user message (anything before a conversation's first user message stands alone)."""
    groups: list[list[int]] = []
    rows = db.execute("""
        SELECT id, conversation_id, role FROM messages WHERE conversation_id IN (
            SELECT conversation_id FROM messages WHERE id IN (SELECT value FROM json_each(?)))
        ORDER BY conversation_id, id""", [_ids(message_ids)])
    current: list[int] = []
    current_conversation = None
    for message_id, conversation_id, role in rows:
        if current and (conversation_id != current_conversation or role == "user"):
            groups.append(current)
            current = []
        current_conversation = conversation_id
        current.append(message_id)
    if current:
        groups.append(current)
    return groups


def select_all(db: sqlite_utils.Database) -> Deletion:
    """Every conversation and message."""
    return Deletion(tuple(r[0] for r in db.execute("SELECT id FROM messages ORDER BY id")),
                    tuple(r[0] for r in db.execute("SELECT id FROM conversations ORDER BY id")))


def _resolved(db: sqlite_utils.Database, deletion: Deletion) -> tuple[str, list[int]]:
    """(message ids as JSON, conversation ids) as they stand now: messages still stored, plus any a
    conversation deleted whole has gained since it was selected; conversations emptied by it."""
    forced = _ids(deletion.conversation_ids)
    ids = _ids([r[0] for r in db.execute(
        """SELECT id FROM messages WHERE id IN (SELECT value FROM json_each(?))
           OR conversation_id IN (SELECT value FROM json_each(?))""", [_ids(deletion.message_ids), forced])])
    conversations = [r[0] for r in db.execute("""
        SELECT id FROM conversations WHERE id IN (SELECT value FROM json_each(?)) OR (
            id IN (SELECT conversation_id FROM messages WHERE id IN (SELECT value FROM json_each(?)))
            AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = conversations.id
                            AND m.id NOT IN (SELECT value FROM json_each(?))))""", [forced, ids, ids])]
    return ids, conversations


def preview(db: sqlite_utils.Database, deletion: Deletion) -> dict[str, int]:
    """What `delete` would remove, counted: messages, conversations, memories (chunks of those
    messages) and adapters trained on them, which forgetting taints (withdraws)."""
    ids, conversations = _resolved(db, deletion)
    return {
        "messages": len(json.loads(ids)),
        "conversations": len(conversations),
        "memories": db.execute("SELECT COUNT(*) FROM memory_chunks WHERE message_id IN "
                               "(SELECT value FROM json_each(?)) OR (source = 'import' AND import_id IN "
                               "(SELECT value FROM json_each(?)))", [ids, _ids(deletion.import_ids)]).fetchone()[0],
        "adapters_tainted": db.execute(
            """SELECT COUNT(*) FROM adapters WHERE status != 'tainted' AND id IN (
               SELECT adapter_id FROM adapter_sources WHERE message_id IN (SELECT value FROM json_each(?)))""",
            [ids]).fetchone()[0],
    }


def preview_delete(db: sqlite_utils.Database, conversation_id: int) -> dict[str, int]:
    """What deleting this conversation would remove (counts as `preview` gives them), or `NotFound`."""
    return preview(db, select_conversation(db, conversation_id))


def selected_messages(db: sqlite_utils.Database, deletion: Deletion) -> list[dict[str, Any]]:
    """The messages a deletion would remove, oldest first, with their conversation's title."""
    ids, _ = _resolved(db, deletion)
    return [dict(row) for row in db.query("""
        SELECT m.id, m.conversation_id, c.title, m.role, m.created, m.status, m.content
        FROM messages m JOIN conversations c ON c.id = m.conversation_id
        WHERE m.id IN (SELECT value FROM json_each(?)) ORDER BY m.conversation_id, m.id""", [ids])]


def delete(db: sqlite_utils.Database, deletion: Deletion) -> dict[str, int]:
    """Delete what was selected, in one transaction; returns the counts `preview` gives.

    Deleting a message deletes its memories, and taints the adapters trained on it, by triggers.
    """
    with transaction(db):
        counts = preview(db, deletion)
        ids, conversations = _resolved(db, deletion)
        db.execute("DELETE FROM messages WHERE id IN (SELECT value FROM json_each(?))", [ids])
        db.execute("DELETE FROM conversations WHERE id IN (SELECT value FROM json_each(?))",
                   [_ids(conversations)])
        if deletion.import_ids:
            db.execute("DELETE FROM memory_chunks WHERE source = 'import' AND import_id IN "
                       "(SELECT value FROM json_each(?))", [_ids(deletion.import_ids)])
            db.execute("DELETE FROM imports WHERE id IN (SELECT value FROM json_each(?))", [_ids(deletion.import_ids)])
    return counts


def forget_message(db: sqlite_utils.Database, message_id: int) -> dict[str, int]:
    """Delete one message."""
    return delete(db, select_message(db, message_id))


def delete_conversation(db: sqlite_utils.Database, conversation_id: int) -> dict[str, int]:
    """Delete a conversation and all its messages."""
    return delete(db, select_conversation(db, conversation_id))


def forget_matching(db: sqlite_utils.Database, text: str, *, whole_exchanges: bool = True) -> dict[str, int]:
    """Delete every message containing `text` (case-insensitive substring), with its exchange unless
    `whole_exchanges` is False."""
    return delete(db, select_matching(db, text, whole_exchanges=whole_exchanges))


def forget_all(db: sqlite_utils.Database) -> dict[str, int]:
    """Delete every conversation and message."""
    return delete(db, select_all(db))


def export_all(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """Every conversation with its messages, oldest conversation first, for export.

    With what `ember import` needs to read it back losslessly: whether the conversation is excluded from
    learning, each reply's rating and edit (`rating`, `edit`, only when the user gave them), and for
    imported ones the source's ids and the import they came from. Every branch is there: each message
    names the one it follows (`parent_id`), and `current_id` the end of the branch the user kept; `persona`
    names the persona a conversation is held with (the personas themselves: `personas.export_personas`)."""
    excluded = {r[0] for r in db.execute("""
        SELECT conversation_id FROM feedback f WHERE kind = 'exclude' AND id = (
            SELECT MAX(id) FROM feedback g WHERE g.conversation_id = f.conversation_id
            AND g.kind IN ('exclude', 'include'))""")}
    imports = {r[0]: {"app": r[1], "sha256": r[2]} for r in db.execute("SELECT id, app, sha256 FROM imports")}
    from storage.feedback import state     # feedback imports this module

    # Each reply's current rating and latest edit, where the user gave them.
    said = {message_id: {k: v for k, v in entry.items() if v is not None}
            for message_id, entry in state(db).items()}
    persona_names = {r[0]: r[1] for r in db.execute("SELECT id, name FROM personas")}
    out = []
    for conv in reversed(list_conversations(db)):
        conv = dict(conv)
        conv.pop("messages")
        stored = get_conversation(db, conv["id"])
        conv["excluded"] = conv["id"] in excluded
        if stored.get("persona_id") in persona_names:   # the persona it is held with, by name
            conv["persona"] = persona_names[stored["persona_id"]]
        if stored.get("external_id"):
            conv["external_id"] = stored["external_id"]
            conv["source"] = imports.get(stored.get("import_id"))
        rows = messages(db, conv["id"])
        conv["messages"] = [
            {k: row[k] for k in ("id", "parent_id", "role", "content", "created", "status", "model", "route",
                                 "adapter_id", "tokens", "seconds")}
            | ({"external_id": row["external_id"]} if row.get("external_id") else {})
            | said.get(row["id"], {})
            for row in rows]
        out.append(conv)
    return out


def user_texts(db: sqlite_utils.Database, *, max_chars: int, exclude: Iterable[int] = ()) -> list[str]:
    """What the user wrote, newest first, up to `max_chars` characters in all; conversations in `exclude`
    (those excluded from learning) are left out. Calibration text for `ember compress`."""
    skip = json.dumps(sorted(set(exclude)))
    texts, total = [], 0
    for row in db.query("SELECT content FROM messages WHERE role = 'user' AND conversation_id NOT IN "
                        "(SELECT value FROM json_each(?)) ORDER BY id DESC", [skip]):
        if total >= max_chars:
            break
        texts.append(row["content"])
        total += len(row["content"])
    return texts
