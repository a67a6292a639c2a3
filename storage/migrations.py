"""Numbered schema migrations, applied once each and recorded in `schema_version`.

Each migration is a small function registered with `@migration`; its position in `MIGRATIONS` is its
version number. Never edit or reorder a released migration: add a new one.
"""
from __future__ import annotations

import datetime as dt
from typing import Callable

import sqlite_utils

from storage.atomic import immediate
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
    # IF NOT EXISTS: another process may create it between a check and a create.
    db["schema_version"].create({"version": int, "name": str, "applied": str}, pk="version", if_not_exists=True)
    version = current_version(db)
    if version > len(MIGRATIONS):
        raise EmberError(f"this database is at schema version {version}, newer than this Ember "
                         f"({len(MIGRATIONS)}); upgrade Ember")
    while version < target:
        # Each step re-reads the version under the write lock: another process opening the same
        # database at the same moment may have applied this migration already.
        with immediate(db):
            version = current_version(db)
            if version >= target:
                break
            fn = MIGRATIONS[version]
            fn(db)
            db["schema_version"].insert({
                "version": version + 1, "name": fn.__name__,
                "applied": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            })
        version += 1
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


@migration
def m004_memory(db: sqlite_utils.Database) -> None:
    """Memory: chunks of messages and imported notes, with a BM25 index and a vector index.

    `embedding` holds the float32 vector (for exact re-scoring); `memory_vec` holds its sign bits,
    which sqlite-vec scans by Hamming distance to find candidates fast. Deleting a message deletes
    its chunks, and deleting a chunk deletes its index rows, inside the same statement.
    """
    db.executescript("""
        CREATE TABLE memory_chunks (
            id INTEGER PRIMARY KEY,
            source TEXT NOT NULL CHECK (source IN ('message', 'import')),
            source_id TEXT NOT NULL,
            part INTEGER NOT NULL DEFAULT 0,
            message_id INTEGER,
            text TEXT NOT NULL,
            time TEXT,
            speaker TEXT,
            session TEXT,
            created TEXT NOT NULL,
            embedding BLOB,
            UNIQUE (source, source_id, part)
        );
        CREATE INDEX idx_memory_chunks_message_id ON memory_chunks (message_id);
        CREATE INDEX idx_memory_chunks_time ON memory_chunks (time);
        CREATE INDEX idx_memory_chunks_unembedded ON memory_chunks (id) WHERE embedding IS NULL;
        CREATE VIRTUAL TABLE memory_fts USING fts5(
            text, content='memory_chunks', content_rowid='id', tokenize='porter unicode61');
        CREATE VIRTUAL TABLE memory_vec USING vec0(embedding bit[384]);
        CREATE TRIGGER memory_chunks_ai AFTER INSERT ON memory_chunks BEGIN
            INSERT INTO memory_fts(rowid, text) VALUES (new.id, new.text);
        END;
        CREATE TRIGGER memory_chunks_ad AFTER DELETE ON memory_chunks BEGIN
            INSERT INTO memory_fts(memory_fts, rowid, text) VALUES ('delete', old.id, old.text);
            DELETE FROM memory_vec WHERE rowid = old.id;
        END;
        CREATE TRIGGER messages_memory_ad AFTER DELETE ON messages BEGIN
            DELETE FROM memory_chunks WHERE message_id = old.id;
        END;
        CREATE TRIGGER messages_memory_au AFTER UPDATE OF content ON messages BEGIN
            DELETE FROM memory_chunks WHERE message_id = old.id;
        END;
    """)


@migration
def m005_reply_memories(db: sqlite_utils.Database) -> None:
    """Which memories a reply was given, so the chat can show them later and forget cleans up."""
    db.executescript("""
        CREATE TABLE reply_memories (
            message_id INTEGER NOT NULL,
            chunk_id INTEGER NOT NULL,
            rank INTEGER NOT NULL,
            score REAL,
            PRIMARY KEY (message_id, chunk_id)
        );
        CREATE INDEX idx_reply_memories_chunk ON reply_memories (chunk_id);
        CREATE TRIGGER reply_memories_message_ad AFTER DELETE ON messages BEGIN
            DELETE FROM reply_memories WHERE message_id = old.id;
        END;
        CREATE TRIGGER reply_memories_chunk_ad AFTER DELETE ON memory_chunks BEGIN
            DELETE FROM reply_memories WHERE chunk_id = old.id;
        END;
    """)


@migration
def m006_feedback(db: sqlite_utils.Database) -> None:
    """What the user told us about replies and conversations: the signal adaptation learns from.

    Rows are events (latest wins), so a change of mind is kept in order and nothing is overwritten.
    """
    db.executescript("""
        CREATE TABLE feedback (
            id INTEGER PRIMARY KEY,
            conversation_id INTEGER NOT NULL,
            message_id INTEGER,
            kind TEXT NOT NULL CHECK (kind IN ('up', 'down', 'clear', 'edit', 'exclude', 'include')),
            content TEXT,
            created TEXT NOT NULL
        );
        CREATE INDEX idx_feedback_message ON feedback (message_id);
        CREATE INDEX idx_feedback_conversation ON feedback (conversation_id);
        CREATE TRIGGER feedback_message_ad AFTER DELETE ON messages BEGIN
            DELETE FROM feedback WHERE message_id = old.id;
        END;
        CREATE TRIGGER feedback_conversation_ad AFTER DELETE ON conversations BEGIN
            DELETE FROM feedback WHERE conversation_id = old.id;
        END;
    """)


@migration
def m007_adapters(db: sqlite_utils.Database) -> None:
    """The adapter registry, its lineage, the privacy ledger and adaptation runs.

    Forgetting a message taints (withdraws) every adapter trained on it, in the same statement, so no
    code path that deletes messages can forget to.
    """
    db.executescript("""
        CREATE TABLE adapters (
            id TEXT PRIMARY KEY,
            path TEXT NOT NULL,
            kind TEXT NOT NULL,
            method TEXT NOT NULL,
            base_sha256 TEXT NOT NULL,
            base_name TEXT,
            params TEXT NOT NULL DEFAULT '{}',
            eval TEXT NOT NULL DEFAULT '{}',
            status TEXT NOT NULL CHECK (status IN ('active', 'inactive', 'rejected', 'tainted')),
            reason TEXT,
            epsilon REAL,
            delta REAL,
            examples INTEGER NOT NULL DEFAULT 0,
            created TEXT NOT NULL,
            activated INTEGER  -- order in which adapters were put in use (rollback walks it back)
        );
        CREATE TABLE adapter_sources (
            adapter_id TEXT NOT NULL,
            message_id INTEGER NOT NULL,
            split TEXT NOT NULL CHECK (split IN ('train', 'heldout')),
            PRIMARY KEY (adapter_id, message_id)
        );
        CREATE INDEX idx_adapter_sources_message ON adapter_sources (message_id);
        CREATE TRIGGER adapters_taint_bd BEFORE DELETE ON messages BEGIN
            UPDATE adapters SET status = 'tainted', activated = NULL,
                   reason = 'trained on message ' || old.id || ', since forgotten'
            WHERE status != 'tainted'
              AND id IN (SELECT adapter_id FROM adapter_sources WHERE message_id = old.id);
        END;
        CREATE TABLE privacy_ledger (
            id INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL UNIQUE,
            method TEXT NOT NULL,
            dp INTEGER NOT NULL,
            epsilon REAL,
            delta REAL,
            sigma REAL,
            clip REAL,
            sample_rate REAL,
            steps INTEGER,
            examples INTEGER,
            created TEXT NOT NULL
        );
        CREATE TABLE adapt_runs (
            id TEXT PRIMARY KEY,
            method TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed', 'interrupted')),
            pid INTEGER,
            started TEXT NOT NULL,
            updated TEXT NOT NULL,
            step INTEGER NOT NULL DEFAULT 0,
            steps INTEGER NOT NULL DEFAULT 0,
            loss REAL,
            epsilon_spent REAL,
            eta_seconds REAL,
            message TEXT,
            fingerprint TEXT,
            adapter_id TEXT
        );
    """)


@migration
def m008_activity_and_daemon(db: sqlite_utils.Database) -> None:
    """When the user was last here (chat opened) and what the idle-time daemon is doing.

    Messages carry their own time; opening the chat leaves a row here, so the daemon yields to a user
    who has only just come back.
    """
    db.executescript("""
        CREATE TABLE activity (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,
            created TEXT NOT NULL
        );
        CREATE TABLE daemon_state (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            pid INTEGER,
            state TEXT NOT NULL,
            reason TEXT,
            updated TEXT NOT NULL,
            last_run TEXT,
            last_result TEXT,
            next_check TEXT,
            eligible_at TEXT
        );
        -- what each run really needed, so the daemon can choose a method that fits in memory
        ALTER TABLE adapt_runs ADD COLUMN peak_rss_mb REAL;
    """)


@migration
def m009_routing(db: sqlite_utils.Database) -> None:
    """The router's decisions (route, why, and the features it saw) and its fitted policies.

    A decision belongs to the reply it routed and goes when that reply is forgotten. Policies are kept
    as a history: the newest row is the one in use, the older ones say what changed and when.
    """
    db.executescript("""
        CREATE TABLE route_decisions (
            id INTEGER PRIMARY KEY,
            message_id INTEGER,
            created TEXT NOT NULL,
            route TEXT NOT NULL,
            reason TEXT NOT NULL,
            features TEXT NOT NULL,
            policy_id INTEGER,
            seconds REAL
        );
        CREATE INDEX idx_route_decisions_message ON route_decisions (message_id);
        CREATE TRIGGER route_decisions_forget AFTER DELETE ON messages BEGIN
            DELETE FROM route_decisions WHERE message_id = old.id;
        END;
        CREATE TABLE router_policies (
            id INTEGER PRIMARY KEY,
            created TEXT NOT NULL,
            thresholds TEXT NOT NULL,
            items INTEGER NOT NULL,
            adapter_id TEXT,
            report TEXT
        );
    """)


@migration
def m010_vectors_in_context(db: sqlite_utils.Database) -> None:
    """A chunk's vector is made from its words and its neighbours in the same session (the turns just
    before and after it), so a reply like "Yes, twice last summer" is found by what it answers.

    Vectors made before this read the chunk alone: they stay in use, marked `vector_stale`, and are
    re-made a batch at a time (`assistant.retrieval.embed_pending`). A new chunk makes its previous
    neighbour's vector stale. Forgetting a chunk drops its neighbours' vectors at once (they were made
    partly from the forgotten words); they are re-made from what is left at the next search.
    """
    db.executescript("""
        ALTER TABLE memory_chunks ADD COLUMN vector_stale INTEGER NOT NULL DEFAULT 0;
        UPDATE memory_chunks SET vector_stale = 1 WHERE embedding IS NOT NULL;
        CREATE INDEX idx_memory_chunks_session ON memory_chunks (source, session, id);
        CREATE INDEX idx_memory_chunks_stale ON memory_chunks (id) WHERE vector_stale = 1;
        CREATE TRIGGER memory_chunks_neighbour_ai AFTER INSERT ON memory_chunks
        WHEN new.session IS NOT NULL BEGIN
            UPDATE memory_chunks SET vector_stale = 1
            WHERE embedding IS NOT NULL AND id = (
                SELECT MAX(id) FROM memory_chunks
                WHERE source = new.source AND session = new.session AND id < new.id);
        END;
        CREATE TRIGGER memory_chunks_neighbour_ad AFTER DELETE ON memory_chunks
        WHEN old.session IS NOT NULL BEGIN
            DELETE FROM memory_vec WHERE rowid IN (
                (SELECT MAX(id) FROM memory_chunks
                 WHERE source = old.source AND session = old.session AND id < old.id),
                (SELECT MIN(id) FROM memory_chunks
                 WHERE source = old.source AND session = old.session AND id > old.id));
            UPDATE memory_chunks SET embedding = NULL, vector_stale = 0 WHERE id IN (
                (SELECT MAX(id) FROM memory_chunks
                 WHERE source = old.source AND session = old.session AND id < old.id),
                (SELECT MIN(id) FROM memory_chunks
                 WHERE source = old.source AND session = old.session AND id > old.id));
        END;
    """)


@migration
def m011_imports(db: sqlite_utils.Database) -> None:
    """Chat history and notes brought in from other apps (`ember import`), and where each came from.

    An import is one export file (app + the file's SHA-256). Conversations, messages and notes point at
    the latest import that held them, so `ember forget --source` can remove an import whole.
    `external_id` is the source's own id (prefixed with its app), which makes re-imports idempotent;
    `content_hash` tells an edited message from an unchanged one.
    """
    db.executescript("""
        CREATE TABLE imports (
            id INTEGER PRIMARY KEY,
            app TEXT NOT NULL,
            file TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            created TEXT NOT NULL,
            updated TEXT NOT NULL,
            counts TEXT NOT NULL DEFAULT '{}',
            UNIQUE (app, sha256)
        );
        ALTER TABLE conversations ADD COLUMN import_id INTEGER;
        ALTER TABLE conversations ADD COLUMN external_id TEXT;
        ALTER TABLE messages ADD COLUMN import_id INTEGER;
        ALTER TABLE messages ADD COLUMN external_id TEXT;
        ALTER TABLE messages ADD COLUMN content_hash TEXT;
        ALTER TABLE memory_chunks ADD COLUMN import_id INTEGER;
        CREATE UNIQUE INDEX idx_conversations_external ON conversations (external_id)
            WHERE external_id IS NOT NULL;
        CREATE INDEX idx_conversations_import ON conversations (import_id) WHERE import_id IS NOT NULL;
        CREATE INDEX idx_memory_chunks_import ON memory_chunks (import_id) WHERE import_id IS NOT NULL;
    """)


@migration
def m012_message_origin(db: sqlite_utils.Database) -> None:
    """Where a message came from: `origin` is NULL for what was typed into Ember itself (the chat,
    `ember ask`) and `api` for a request to `ember serve`; `client` is that request's User-Agent.

    The user can then see which app said what, and keep API traffic out of learning
    (`learn_from_api = false`, which the adaptation dataset reads).
    """
    db.executescript("""
        ALTER TABLE messages ADD COLUMN origin TEXT;
        ALTER TABLE messages ADD COLUMN client TEXT;
        CREATE INDEX idx_messages_origin ON messages (origin, conversation_id) WHERE origin IS NOT NULL;
    """)


@migration
def m013_personas(db: sqlite_utils.Database) -> None:
    """Personas: a named system prompt, with an optional default route and temperature.

    At most one is the default (a partial unique index); a new conversation of Ember's own takes it.
    A conversation remembers its persona (`persona_id`, NULL: none); removing a persona leaves its
    conversations, and their messages, without one (ON DELETE SET NULL).
    """
    db.executescript("""
        CREATE TABLE personas (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE COLLATE NOCASE,
            system_prompt TEXT NOT NULL,
            route TEXT CHECK (route IS NULL OR route IN ('auto', 'base', 'rag', 'adapter', 'both')),
            temperature REAL CHECK (temperature IS NULL OR temperature >= 0),
            is_default INTEGER NOT NULL DEFAULT 0,
            created TEXT NOT NULL
        );
        CREATE UNIQUE INDEX idx_personas_default ON personas (is_default) WHERE is_default = 1;
        ALTER TABLE conversations ADD COLUMN persona_id INTEGER REFERENCES personas(id) ON DELETE SET NULL;
    """)


@migration
def m014_message_tree(db: sqlite_utils.Database) -> None:
    """Regenerate and edit make a conversation a tree: `parent_id` is the message a message follows
    (NULL: the conversation's first), and `conversations.current_id` is the leaf of the branch the user
    kept, whose path to the root is what history, memory, learning and the model read.

    Earlier conversations were one line: each message follows the one before it, and the kept branch
    ends at the newest. Forgetting a message re-links its children to its parent (and moves the kept
    leaf up), so no delete path can leave a branch cut in two.
    """
    db.executescript("""
        ALTER TABLE messages ADD COLUMN parent_id INTEGER;
        ALTER TABLE conversations ADD COLUMN current_id INTEGER;
        UPDATE messages SET parent_id = (
            SELECT MAX(p.id) FROM messages p WHERE p.conversation_id = messages.conversation_id AND p.id < messages.id);
        UPDATE conversations SET current_id = (SELECT MAX(m.id) FROM messages m WHERE m.conversation_id = conversations.id);
        CREATE INDEX idx_messages_parent ON messages (parent_id) WHERE parent_id IS NOT NULL;
        CREATE TRIGGER messages_tree_ad AFTER DELETE ON messages BEGIN
            UPDATE messages SET parent_id = old.parent_id WHERE parent_id = old.id;
            UPDATE conversations SET current_id = COALESCE(old.parent_id, (
                SELECT MAX(m.id) FROM messages m WHERE m.conversation_id = old.conversation_id AND m.parent_id IS NULL))
            WHERE current_id = old.id;
        END;
    """)


@migration
def m015_federation_rounds(db: sqlite_utils.Database) -> None:
    """Household learning: what this device did in each federated round (`ember federate`).

    One row per round and phase: in `train` the device contributed an update (its local run is in the
    privacy ledger and `adapt_runs` under `run_id`), skipped the round (it would exceed the privacy
    budget) or refused it (another base model, a malformed global update); in `evaluate` its gate
    promoted the household's global adapter or kept its own. `bytes_sent` is every byte of the reply,
    so the user can see that nothing but the update left the device. `sigma` and `clip` are the
    user-level DP the server applied to the sum (Flower's client-side fixed clipping).
    """
    db.executescript("""
        CREATE TABLE federation_rounds (
            id INTEGER PRIMARY KEY,
            server TEXT NOT NULL,
            round INTEGER NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('fedavg', 'fedkseed')),
            phase TEXT NOT NULL CHECK (phase IN ('train', 'evaluate')),
            status TEXT NOT NULL CHECK (status IN ('contributed', 'skipped', 'refused', 'promoted', 'kept')),
            run_id TEXT,
            adapter_id TEXT,
            examples INTEGER,
            epsilon REAL,
            sigma REAL,
            clip REAL,
            bytes_sent INTEGER,
            bytes_received INTEGER,
            message TEXT,
            created TEXT NOT NULL
        );
        CREATE INDEX idx_federation_rounds_round ON federation_rounds (server, round);
    """)


@migration
def m016_preferences(db: sqlite_utils.Database) -> None:
    """What the chat remembers between runs that is no one's data: the Textual theme chosen in the palette,
    and the models recently switched to (`key` → a JSON value).

    In the database rather than `config.toml`: the user writes that file by hand, with comments, and
    rewriting it from the app would lose them.
    """
    db.executescript("""
        CREATE TABLE preferences (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL,
            updated TEXT NOT NULL
        );
    """)


@migration
def m017_federation_round_of(db: sqlite_utils.Database) -> None:
    """How many rounds the household's run has (`rounds`, NULL before this), so a device that joined over
    the network (`ember federate join`) knows when its last round is done, and `status` shows "round 2 of 3"."""
    db.executescript("ALTER TABLE federation_rounds ADD COLUMN rounds INTEGER;")


@migration
def m018_run_model_size(db: sqlite_utils.Database) -> None:
    """What each adaptation run trained: the base model's parameter count and the dtype it was loaded in.

    The daemon decides whether a method fits in free memory from the peaks of finished runs; a peak
    measured on a 135M model says nothing about a 7B one. With the size recorded it scales the nearest
    run's peak by the measured MB per parameter (`ember bench train_memory`).
    """
    db.executescript("""
        ALTER TABLE adapt_runs ADD COLUMN base_params INTEGER;
        ALTER TABLE adapt_runs ADD COLUMN dtype TEXT;
    """)


@migration
def m019_run_model_bytes(db: sqlite_utils.Database) -> None:
    """The size in bytes of the GGUF file each adaptation run trained on (`base_bytes`, NULL before this).

    Zeroth-order training in llama.cpp runs the quantized file itself, mapped: its memory follows the
    file's size, not the parameter count (a Q4 and an F16 file of one model differ 4x). The daemon scales
    the nearest such run's peak by the file size (assistant/daemon.py)."""
    db.executescript("ALTER TABLE adapt_runs ADD COLUMN base_bytes INTEGER;")
