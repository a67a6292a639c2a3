"""Chat history and notes brought in from other apps (`ember import`), merged into the log idempotently.

An import is one export (app + the SHA-256 of its bytes). Each imported conversation is keyed by its
source's own id (`external_id`, prefixed with the app), each message by the source's message id, and
a message's `content_hash` tells an edit from an unchanged message: importing the same export twice
changes nothing, a newer export updates edited messages in place and appends new ones. Conversations,
messages and notes point at the latest import that held them (`import_id`), which is what
`ember forget --source` removes. Imported conversations are excluded from learning unless the user
says otherwise (a `feedback` exclude event, which F4 in the chat or `ember feedback exclude --undo`
reverses).

An import is written in batches, each its own short transaction, so other processes' writes (the chat
logging your message) wait at most one batch. Until the last batch commits, the import's `counts` say
`{"incomplete": true}` (`sources` gives `complete: false`): the conversations of the batches already
committed are in the log meanwhile, each whole (a batch never splits a conversation) and excluded from
learning from the moment it is, and running the same import again completes it, keeping them as they are.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import re
from typing import Any, Sequence

import sqlite_utils

from storage import memory
from storage.conversations import NEW_TITLE, Deletion, now, title_from
from storage.errors import NotFound

APPS = ("chatgpt", "claude", "llm", "openwebui", "oterm", "elia", "markdown", "jsonl", "ember")


@dataclasses.dataclass
class ImportedMessage:
    """One message as another app stored it: its own id, role (user | assistant | system), text,
    time (ISO-8601, or None) and the model that wrote it."""

    external_id: str
    role: str
    content: str
    created: str | None = None
    model: str | None = None
    # Ember's own export carries how each reply ended and what produced it; other apps leave these.
    status: str = "complete"
    route: str | None = None
    adapter_id: str | None = None
    tokens: int | None = None
    seconds: float | None = None
    rating: str | None = None       # the user's rating of a reply (up | down), Ember's export only
    edit: str | None = None         # the user's correction of a reply, Ember's export only
    parent_external_id: str | None = None   # the message it follows, in a source that keeps the tree


@dataclasses.dataclass
class ImportedConversation:
    """One conversation from another app: the branch it ended on, oldest message first."""

    external_id: str
    title: str | None
    messages: list[ImportedMessage]
    created: str | None = None
    updated: str | None = None
    excluded: bool | None = None    # the source's own say on learning (Ember's export); None: not said
    # A source that keeps every branch (Ember's export) says which message each follows and where the
    # kept branch ends; any other source is one line, each message following the one before it.
    tree: bool = False
    current_external_id: str | None = None


def content_hash(role: str, content: str) -> str:
    """What tells an edited message from an unchanged one."""
    return hashlib.sha256(f"{role}\0{content}".encode()).hexdigest()[:16]


def find(db: sqlite_utils.Database, app: str, sha256: str) -> dict[str, Any] | None:
    """The import of this export, if it was imported before."""
    rows = list(db.query("SELECT * FROM imports WHERE app = ? AND sha256 = ?", [app, sha256]))
    return rows[0] if rows else None


INCOMPLETE = json.dumps({"incomplete": True})


def start(db: sqlite_utils.Database, app: str, file: str, sha256: str) -> int:
    """The id of this export's import (the existing one for an export seen before, else a new one),
    marked incomplete until `finish`. Call in a transaction of its own before the first batch."""
    found = find(db, app, sha256)
    stamp = now()
    if found is not None:
        db.execute("UPDATE imports SET updated = ?, file = ?, counts = ? WHERE id = ?",
                   [stamp, file, INCOMPLETE, found["id"]])
        return found["id"]
    return db.execute("INSERT INTO imports (app, file, sha256, created, updated, counts) VALUES (?, ?, ?, ?, ?, ?)",
                      [app, file, sha256, stamp, stamp, INCOMPLETE]).lastrowid


def finish(db: sqlite_utils.Database, import_id: int, counts: dict[str, Any]) -> None:
    """Record what the import did (for `ember status`), which marks it complete. Call after its last batch."""
    db.execute("UPDATE imports SET counts = ?, updated = ? WHERE id = ?",
               [json.dumps(counts, sort_keys=True), now(), import_id])


def _exclude(db: sqlite_utils.Database, conversation_id: int, kind: str) -> None:
    db.execute("INSERT INTO feedback (conversation_id, message_id, kind, content, created) "
               "VALUES (?, NULL, ?, NULL, ?)", [conversation_id, kind, now()])


def _excluded(db: sqlite_utils.Database, conversation_id: int) -> bool:
    row = db.execute("SELECT kind FROM feedback WHERE conversation_id = ? AND kind IN ('exclude', 'include') "
                     "ORDER BY id DESC LIMIT 1", [conversation_id]).fetchone()
    return bool(row) and row[0] == "exclude"


def _insert_messages(db: sqlite_utils.Database, conversation_id: int, import_id: int | None,
                     messages: Sequence[ImportedMessage], fallback_time: str, *, tree: bool = False,
                     known: dict[str, int] | None = None, last: int | None = None) -> int | None:
    """Insert `messages`, each following its parent (`tree`: by the source's ids, mapped through
    `known`, external id → stored id) or the message before it (the first after `last`). Returns the
    id of the last one inserted (or `last`)."""
    known = {} if known is None else known
    for m in messages:
        parent = known.get(m.parent_external_id) if tree else last
        message_id = db.execute(
            "INSERT INTO messages (conversation_id, role, content, created, model, status, route, adapter_id, "
            "tokens, seconds, import_id, external_id, content_hash, parent_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [conversation_id, m.role, m.content, m.created or fallback_time, m.model, m.status, m.route,
             m.adapter_id, m.tokens, m.seconds, import_id, m.external_id, content_hash(m.role, m.content),
             parent]).lastrowid
        known[m.external_id] = last = message_id
        # The user's say on a reply comes back with it (what learning counts as approved).
        for kind, content in ((m.rating, None), ("edit" if m.edit is not None else None, m.edit)):
            if kind is not None:
                db.execute("INSERT INTO feedback (conversation_id, message_id, kind, content, created) "
                           "VALUES (?, ?, ?, ?, ?)", [conversation_id, message_id, kind, content, now()])
    return last


def _set_current(db: sqlite_utils.Database, conversation_id: int, conv: ImportedConversation,
                 known: dict[str, int], last: int | None) -> None:
    """The kept branch ends where the source says (a tree), else at the newest message."""
    current = known.get(conv.current_external_id) if conv.tree else None
    if current is None:
        current = last
    if current is not None:
        db.execute("UPDATE conversations SET current_id = ? WHERE id = ?", [current, conversation_id])


def merge_conversation(db: sqlite_utils.Database, import_id: int | None, conv: ImportedConversation, *,
                       learn: bool = False, dry_run: bool = False) -> collections.Counter:
    """Bring one conversation into the log, or say what that would do (`dry_run`: reads only).

    New: inserted whole, excluded from learning unless `learn` (or the source itself, Ember's own export,
    says the user let Ember learn from it). Known (same `external_id`): messages
    matched in order by their source id; a changed one is updated in place, and from the first message
    that differs in id (another branch was chosen) the stored rest is replaced by the source's rest.
    Returns counts (conversations_added/updated/unchanged, messages_added/updated/removed/unchanged).
    Call inside a transaction.
    """
    counts: collections.Counter = collections.Counter()
    times = [m.created for m in conv.messages if m.created]
    created = conv.created or (min(times) if times else None) or now()
    updated = conv.updated or (max(times) if times else None) or created
    title = (conv.title or "").strip() or next(
        (title_from(m.content) for m in conv.messages if m.role == "user"), NEW_TITLE) or NEW_TITLE
    row = db.execute("SELECT id, title, import_id FROM conversations WHERE external_id = ?",
                     [conv.external_id]).fetchone()
    if row is None:
        counts["conversations_added"] += 1
        counts["messages_added"] += len(conv.messages)
        if dry_run:
            return counts
        conversation_id = db.execute(
            "INSERT INTO conversations (title, created, updated, import_id, external_id) VALUES (?, ?, ?, ?, ?)",
            [title, created, updated, import_id, conv.external_id]).lastrowid
        known: dict[str, int] = {}
        last = _insert_messages(db, conversation_id, import_id, conv.messages, created, tree=conv.tree, known=known)
        _set_current(db, conversation_id, conv, known, last)
        if not learn and conv.excluded is not False:
            _exclude(db, conversation_id, "exclude")
        return counts
    conversation_id, stored_title, owner = row
    stored = db.execute("SELECT id, external_id, content_hash FROM messages WHERE conversation_id = ? ORDER BY id",
                        [conversation_id]).fetchall()
    same = 0
    while same < min(len(stored), len(conv.messages)) and stored[same][1] == conv.messages[same].external_id:
        same += 1
    changed = [(stored[i][0], conv.messages[i]) for i in range(same)
               if stored[i][2] != content_hash(conv.messages[i].role, conv.messages[i].content)]
    removed = [r[0] for r in stored[same:]]
    added = conv.messages[same:]
    counts["messages_updated"] += len(changed)
    counts["messages_removed"] += len(removed)
    counts["messages_added"] += len(added)
    counts["messages_unchanged"] += same - len(changed)
    if changed or removed or added or stored_title != title:
        counts["conversations_updated"] += 1
    else:
        counts["conversations_unchanged"] += 1
    if dry_run:
        return counts
    for message_id, m in changed:
        # Updating the content drops the message's memory (a trigger); indexing picks it up again.
        db.execute("UPDATE messages SET role = ?, content = ?, created = COALESCE(?, created), model = ?, "
                   "content_hash = ?, import_id = ? WHERE id = ?",
                   [m.role, m.content, m.created, m.model, content_hash(m.role, m.content), import_id, message_id])
    if removed:
        # Deleting drops the messages' memories and taints adapters trained on them (triggers).
        db.execute("DELETE FROM messages WHERE id IN (SELECT value FROM json_each(?))", [json.dumps(removed)])
    known = {ext: mid for mid, ext, _ in stored[:same] if ext is not None}
    last = _insert_messages(db, conversation_id, import_id, added, created, tree=conv.tree, known=known,
                            last=stored[same - 1][0] if same else None)
    if added or removed or conv.tree:
        _set_current(db, conversation_id, conv, known, last)
    if counts["conversations_updated"] or owner != import_id:
        db.execute("UPDATE conversations SET title = ?, updated = ?, import_id = ? WHERE id = ?",
                   [title, updated, import_id, conversation_id])
    if learn and _excluded(db, conversation_id):
        _exclude(db, conversation_id, "include")
    return counts


def _group(db: sqlite_utils.Database, group: str) -> list[tuple[str, int, str]]:
    """Stored (source_id, part, text) of the imported notes `group` names: the record `group` itself,
    or its sections `group#…`."""
    return db.execute(
        "SELECT source_id, part, text FROM memory_chunks WHERE source = 'import' AND (source_id = ? OR "
        "substr(source_id, 1, ?) = ?) ORDER BY source_id, part", [group, len(group) + 1, group + "#"]).fetchall()


def merge_notes(db: sqlite_utils.Database, import_id: int | None, group: str, records: Sequence[dict[str, Any]],
                *, dry_run: bool = False) -> collections.Counter:
    """Bring one note (a Markdown file's sections, or one JSONL record) into memory, replacing what
    the same `group` held before; unchanged text is left alone (and keeps its vectors).

    Records are `{id, text, time?, speaker?, session?}` whose ids are `group` or `group#…`.
    Returns counts (notes_added/updated/unchanged, chunks). Call inside a transaction.
    """
    counts: collections.Counter = collections.Counter()
    before = _group(db, group)
    after = sorted((r["id"], part, piece) for r in records
                   for part, piece in enumerate(memory.chunk_text(r["text"])))
    if [tuple(x) for x in before] == after:
        counts["notes_unchanged"] += 1
        if not dry_run:
            db.execute("UPDATE memory_chunks SET import_id = ? WHERE source = 'import' AND (source_id = ? OR "
                       "substr(source_id, 1, ?) = ?)", [import_id, group, len(group) + 1, group + "#"])
        return counts
    counts["notes_updated" if before else "notes_added"] += 1
    counts["chunks"] += len(after)
    if dry_run:
        return counts
    db.execute("DELETE FROM memory_chunks WHERE source = 'import' AND (source_id = ? OR substr(source_id, 1, ?) = ?)",
               [group, len(group) + 1, group + "#"])
    memory.upsert_records(db, records, import_id=import_id)
    return counts


def sources(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """Every import with what it holds now: conversations, messages and notes, and whether it is
    complete (an import cut short says false until it is run again), oldest first."""
    return [dict(row, complete=bool(row["complete"])) for row in db.query("""
        SELECT i.id, i.app, i.file, i.sha256, i.created, i.updated,
               json_extract(i.counts, '$.incomplete') IS NULL AS complete,
               (SELECT COUNT(*) FROM conversations c WHERE c.import_id = i.id) AS conversations,
               (SELECT COUNT(*) FROM messages m JOIN conversations c ON c.id = m.conversation_id
                 WHERE c.import_id = i.id) AS messages,
               (SELECT COUNT(DISTINCT CASE WHEN instr(source_id, '#') THEN substr(source_id, 1, instr(source_id, '#') - 1)
                                            ELSE source_id END)
                  FROM memory_chunks WHERE source = 'import' AND import_id = i.id) AS notes
        FROM imports i ORDER BY i.id""")]


def by_app(db: sqlite_utils.Database) -> dict[str, dict[str, int]]:
    """How much came from where: per app, imports, conversations, messages and notes."""
    out: dict[str, dict[str, int]] = {}
    for row in sources(db):
        entry = out.setdefault(row["app"], {"imports": 0, "conversations": 0, "messages": 0, "notes": 0})
        entry["imports"] += 1
        for key in ("conversations", "messages", "notes"):
            entry[key] += row[key]
    return out


def select_source(db: sqlite_utils.Database, spec: str) -> Deletion:
    """What `ember forget --source SPEC` removes: every import of an app (`chatgpt`), one import by its
    number (`3` or `#3`), or by a prefix of its export's SHA-256 (8 hex digits or more)."""
    spec = spec.strip()
    if spec.lower() in APPS:
        where, params = "app = ?", [spec.lower()]
    elif re.fullmatch(r"#?\d+", spec):
        where, params = "id = ?", [int(spec.lstrip("#"))]
    elif re.fullmatch(r"[0-9a-fA-F]{8,64}", spec):
        where, params = "substr(sha256, 1, ?) = ?", [len(spec), spec.lower()]
    else:
        raise NotFound(f"--source takes an app ({', '.join(APPS)}), an import number or an export's SHA-256 "
                       f"prefix, not {spec!r}; `ember status` lists the imports")
    ids = [r[0] for r in db.execute(f"SELECT id FROM imports WHERE {where}", params)]
    if not ids:
        raise NotFound(f"no import matches {spec!r}; `ember status` lists the imports")
    ids_json = json.dumps(ids)
    conversations = tuple(r[0] for r in db.execute(
        "SELECT id FROM conversations WHERE import_id IN (SELECT value FROM json_each(?)) ORDER BY id", [ids_json]))
    messages = tuple(r[0] for r in db.execute(
        "SELECT id FROM messages WHERE conversation_id IN (SELECT value FROM json_each(?)) ORDER BY id",
        [json.dumps(conversations)]))
    return Deletion(messages, conversations, tuple(ids))
