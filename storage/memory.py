"""Memory: what the user said and imported, as chunks with a BM25 index and a vector index.

Chunks come from two sources: the chat log (every finished message, indexed incrementally by
`sync_messages`) and imported records (`upsert_records`). Embeddings are computed by the caller
(storage never loads a model; `in_context` gives it each chunk's neighbours in its session, which
its vector reads too) and stored twice: float32 in `memory_chunks.embedding` for exact
re-scoring, and as sign bits in the sqlite-vec table `memory_vec` for a fast candidate scan.
"""
from __future__ import annotations

import re
from typing import Any, Collection, Iterable, Sequence

import numpy as np
import sqlite_utils

from storage import conversations as convs
from storage.atomic import make_way
from storage.conversations import now
from storage.db import transaction
from storage.errors import NotFound

DIM = 384                 # all-MiniLM-L6-v2; the vec0 table is declared with this width
CHUNK_WORDS = 160         # MiniLM reads 256 word pieces; ~160 words stays within them
CHUNK_OVERLAP = 30
RESCORE_FACTOR = 2        # binary scan returns k × this candidates (at least 64) for exact re-scoring;
                          # sqlite-vec's scan slows sharply with k: 7 ms at 50, 22 at 200, 160 at 1000

STOPWORDS = frozenset("""
a about above after again all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having
he her here hers herself him himself his how i if in into is it its itself just me more most my
myself no nor not now of off on once only or other our ours ourselves out over own same she should
so some such than that the their theirs them themselves then there these they this those through
to too under until up very was we were what when where which while who whom why will with would
you your yours yourself yourselves tell remember said say told mentioned recall did
""".split())


def chunk_text(text: str, words: int = CHUNK_WORDS, overlap: int = CHUNK_OVERLAP) -> list[str]:
    """Split long text into overlapping windows of words; short text is one chunk."""
    tokens = text.split()
    if len(tokens) <= words:
        return [" ".join(tokens)] if tokens else []
    step = words - overlap
    return [" ".join(tokens[i:i + words]) for i in range(0, max(1, len(tokens) - overlap), step)]


def _insert_chunks(db: sqlite_utils.Database, source: str, source_id: str, text: str, *,
                   message_id: int | None = None, time: str | None = None, speaker: str | None = None,
                   session: str | None = None, import_id: int | None = None) -> int:
    stamp = now()
    rows = [{"source": source, "source_id": source_id, "part": part, "message_id": message_id,
             "text": piece, "time": time, "speaker": speaker, "session": session, "created": stamp,
             **({"import_id": import_id} if import_id is not None else {})}
            for part, piece in enumerate(chunk_text(text))]
    if rows:
        db["memory_chunks"].insert_all(rows)
    return len(rows)


def sync_messages(db: sqlite_utils.Database, batch: int = 2000) -> int:
    """Chunk every finished message on a kept branch not yet in memory (new ones, edited ones, and
    ones whose branch was chosen again); return how many looked at.

    Works in batches of `batch` messages, each its own transaction, so an import of thousands of
    conversations is indexed in bounded memory. A reply's sentences copied from the memories it was
    given are not indexed again: they are already memory, and a copy would come back as a second,
    newer witness of the same words."""
    done, after = 0, 0
    while True:
        pending = list(db.query("""
            SELECT m.id, m.role, m.content, m.created, m.conversation_id FROM messages m
            WHERE m.id > ? AND m.status != 'generating' AND m.content != ''
              AND NOT EXISTS (SELECT 1 FROM memory_chunks c WHERE c.message_id = m.id)
            ORDER BY m.id LIMIT ?""", [after, batch]))
        if not pending:
            return done
        kept: dict[int, set[int]] = {}   # only the branch the user kept becomes memory
        for m in pending:
            if m["conversation_id"] not in kept:
                kept[m["conversation_id"]] = convs.branch_ids(db, m["conversation_id"])
        with transaction(db):
            # Another process may have indexed some of them since they were read (the chat and `ember
            # status` both sync): under the write lock, what has chunks now is left alone.
            ids = [m["id"] for m in pending]
            indexed = {row[0] for row in db.execute(
                f"SELECT DISTINCT message_id FROM memory_chunks WHERE message_id IN ({','.join('?' * len(ids))})",
                ids)}
            for m in pending:
                if m["id"] not in kept[m["conversation_id"]] or m["id"] in indexed:
                    continue
                text = m["content"]
                if m["role"] == "assistant":
                    text = without_copies(text, [row["text"] for row in reply_memories(db, m["id"])])
                _insert_chunks(db, "message", str(m["id"]), text, message_id=m["id"],
                               time=m["created"], speaker=m["role"], session=str(m["conversation_id"]))
        done += len(pending)
        after = pending[-1]["id"]
        if len(pending) == batch:
            make_way()          # more may follow: let a waiting writer (the chat) in first


COPY_MIN_WORDS = 5   # a shorter sentence ("Yes.", "Your sister.") is not a copy of a note, whatever it matches


def _words(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def without_copies(text: str, sources: Sequence[str]) -> str:
    """`text` without its sentences (of COPY_MIN_WORDS words or more) that appear word for word in one
    of `sources`."""
    if not sources:
        return text
    given = [_words(source) for source in sources]
    kept = [sentence for sentence in re.split(r"(?<=[.!?])\s+|\n+", text) if sentence.strip()
            and not (len(_words(sentence).split()) >= COPY_MIN_WORDS and any(_words(sentence) in g for g in given))]
    return " ".join(kept)


# Imported notes written per transaction by `ember memory import`: as `ember import`'s batches, about
# a tenth of a second of the write lock on a 2-core machine.
RECORDS_PER_TRANSACTION = 500


def upsert_records(db: sqlite_utils.Database, records: Sequence[dict[str, Any]], *,
                   import_id: int | None = None, per_transaction: int | None = None) -> dict[str, int]:
    """Import records ({id, text, time?, speaker?, session?}); an existing id is replaced in place.

    All records go in one transaction (either every record is stored or none), or, with
    `per_transaction`, that many records to a transaction, so that other processes' writes (the chat
    logging a message) wait for one batch, not the whole file: a run cut short has stored whole
    batches, and running it again completes it (ids are replaced in place).
    """
    if per_transaction is not None and len(records) > per_transaction:
        totals: dict[str, int] = {"added": 0, "updated": 0, "chunks": 0}
        for start in range(0, len(records), per_transaction):
            if start:
                make_way()
            part = upsert_records(db, records[start:start + per_transaction], import_id=import_id)
            totals = {key: totals[key] + part[key] for key in totals}
        return totals
    added = updated = chunks = 0
    with transaction(db):
        for record in records:
            existing = db.execute("SELECT COUNT(*) FROM memory_chunks WHERE source = 'import' AND "
                                  "source_id = ?", [record["id"]]).fetchone()[0]
            if existing:
                db.execute("DELETE FROM memory_chunks WHERE source = 'import' AND source_id = ?",
                           [record["id"]])
                updated += 1
            else:
                added += 1
            chunks += _insert_chunks(db, "import", record["id"], record["text"], time=record.get("time"),
                                     speaker=record.get("speaker"), session=record.get("session"),
                                     import_id=import_id)
    return {"added": added, "updated": updated, "chunks": chunks}


def _not_from(skip_messages: Collection[int]) -> tuple[str, list[int]]:
    """SQL that leaves out chunks made from `skip_messages`, and its parameters."""
    if not skip_messages:
        return "", []
    skip = sorted(set(skip_messages))
    return (f" AND (message_id IS NULL OR message_id NOT IN ({','.join('?' * len(skip))}))", skip)


def unembedded(db: sqlite_utils.Database, limit: int = 10_000, *,
               skip_messages: Collection[int] = ()) -> list[tuple[int, str]]:
    """Chunks still waiting for an embedding, oldest first; none made from `skip_messages`."""
    where, skip = _not_from(skip_messages)
    return [(row[0], row[1]) for row in db.execute(
        f"SELECT id, text FROM memory_chunks WHERE embedding IS NULL{where} ORDER BY id LIMIT ?", [*skip, limit])]


def stale(db: sqlite_utils.Database, limit: int = 10_000, *,
          skip_messages: Collection[int] = ()) -> list[tuple[int, str]]:
    """Chunks whose vector is still in use but out of date (a neighbour came after it was made, or it
    was made before vectors read neighbours), oldest first; none made from `skip_messages`."""
    where, skip = _not_from(skip_messages)
    return [(row[0], row[1]) for row in db.execute(
        f"SELECT id, text FROM memory_chunks WHERE vector_stale = 1{where} ORDER BY id LIMIT ?", [*skip, limit])]


def in_context(db: sqlite_utils.Database, ids: Sequence[int]) -> dict[int, list[dict[str, Any]]]:
    """For each chunk, its row between its neighbours' in the same session (the chunk before and the one
    after it, by id, from the same source), in order: [previous?, chunk, next?]."""
    ids = list(ids)
    if not ids:
        return {}
    links = db.execute(f"""
        SELECT c.id,
               (SELECT MAX(p.id) FROM memory_chunks p
                WHERE p.source = c.source AND p.session = c.session AND p.id < c.id),
               (SELECT MIN(n.id) FROM memory_chunks n
                WHERE n.source = c.source AND n.session = c.session AND n.id > c.id)
        FROM memory_chunks c WHERE c.id IN ({','.join('?' * len(ids))})""", ids).fetchall()
    rows = chunks_by_id(db, {i for link in links for i in link if i is not None})
    return {link[0]: [rows[i] for i in (link[1], link[0], link[2]) if i is not None and i in rows]
            for link in links}


def search_state(db: sqlite_utils.Database, skip_messages: Collection[int] = ()) -> tuple[Any, ...]:
    """What a memory search's answer depends on, as a value that changes whenever any of it does: the
    chunks (but those made from `skip_messages`), how many of them wait for a vector or hold an
    out-of-date one, and the user's feedback (which decides whose replies may be recalled). A few index
    walks (~1 ms at 10,000 chunks)."""
    where, skip = _not_from(skip_messages)
    chunks = db.execute(f"SELECT COUNT(*), MAX(id) FROM memory_chunks WHERE 1{where}", skip).fetchone()
    unembedded = db.execute(f"SELECT COUNT(*) FROM memory_chunks WHERE embedding IS NULL{where}", skip).fetchone()
    out_of_date = db.execute(f"SELECT COUNT(*) FROM memory_chunks WHERE vector_stale = 1{where}", skip).fetchone()
    reviews = db.execute("SELECT COUNT(*), MAX(id) FROM feedback").fetchone()
    return (*chunks, unembedded[0], out_of_date[0], *reviews)


def stale_count(db: sqlite_utils.Database) -> int:
    """How many chunks have an out-of-date vector."""
    return db.execute("SELECT COUNT(*) FROM memory_chunks WHERE vector_stale = 1").fetchone()[0]


def unembedded_count(db: sqlite_utils.Database) -> int:
    """How many chunks wait for an embedding."""
    return db.execute("SELECT COUNT(*) FROM memory_chunks WHERE embedding IS NULL").fetchone()[0]


def store_embeddings(db: sqlite_utils.Database, ids: Sequence[int], vectors: np.ndarray) -> None:
    """Store unit-length float32 vectors for chunks, and their sign bits in the vector index."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.shape != (len(ids), DIM):
        raise ValueError(f"expected {len(ids)} vectors of {DIM} floats, got {vectors.shape}")
    with transaction(db):
        for chunk_id, vector in zip(ids, vectors):
            blob = vector.tobytes()
            db.execute("UPDATE memory_chunks SET embedding = ?, vector_stale = 0 WHERE id = ?",
                       [blob, chunk_id])
            db.execute("DELETE FROM memory_vec WHERE rowid = ?", [chunk_id])
            db.execute("INSERT INTO memory_vec(rowid, embedding) VALUES (?, vec_quantize_binary(?))",
                       [chunk_id, blob])


def keywords(text: str) -> list[str]:
    """The content words of a question, for BM25."""
    return [w for w in re.findall(r"\w+", text.lower()) if w not in STOPWORDS and len(w) > 1]


def bm25_search(db: sqlite_utils.Database, text: str, k: int) -> list[tuple[int, float]]:
    """(chunk id, score) for the best `k` BM25 matches of any content word; higher is better."""
    words = keywords(text)
    if not words:
        return []
    query = " OR ".join(f'"{w}"' for w in dict.fromkeys(words))
    return [(row[0], -row[1]) for row in db.execute(
        "SELECT rowid, bm25(memory_fts) FROM memory_fts WHERE memory_fts MATCH ? "
        "ORDER BY bm25(memory_fts) LIMIT ?", [query, k])]


def vector_search(db: sqlite_utils.Database, vector: np.ndarray, k: int, *,
                  scan: int | None = None) -> list[tuple[int, float]]:
    """(chunk id, cosine similarity) of the `k` nearest chunks.

    sqlite-vec scans the sign bits by Hamming distance for `scan` (default k × RESCORE_FACTOR, at least
    64) candidates, which are then ranked by exact cosine on their float vectors (binary quantisation
    with re-scoring). Which chunks come back depends on `scan`, not only on `k`.
    """
    vector = np.ascontiguousarray(vector, dtype=np.float32)
    candidates = [row[0] for row in db.execute(
        "SELECT rowid FROM memory_vec WHERE embedding MATCH vec_quantize_binary(?) AND k = ?",
        [vector.tobytes(), max(k, scan) if scan is not None else max(64, k * RESCORE_FACTOR)])]
    return rescore(db, candidates, vector, k)


def rescore(db: sqlite_utils.Database, ids: Sequence[int], vector: np.ndarray,
            k: int) -> list[tuple[int, float]]:
    """(chunk id, cosine similarity) of the `k` chunks among `ids` nearest to `vector`, exactly."""
    if not ids:
        return []
    rows = db.execute(f"SELECT id, embedding FROM memory_chunks WHERE embedding IS NOT NULL AND id IN "
                      f"({','.join('?' * len(ids))})", list(ids)).fetchall()
    if not rows:
        return []
    matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), DIM)
    scores = matrix @ np.asarray(vector, dtype=np.float32)
    order = np.argsort(-scores)[:k]
    return [(int(rows[i][0]), float(scores[i])) for i in order]


def chunks_from_message(db: sqlite_utils.Database, message_id: int) -> set[int]:
    """Ids of the chunks made from message `message_id` or any later message."""
    return {row[0] for row in db.execute("SELECT id FROM memory_chunks WHERE message_id >= ?", [message_id])}


def chunks_by_id(db: sqlite_utils.Database, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """Chunk rows (without embeddings) by id."""
    ids = list(ids)
    if not ids:
        return {}
    rows = db.query(f"SELECT id, source, source_id, part, message_id, text, time, speaker, session "
                    f"FROM memory_chunks WHERE id IN ({','.join('?' * len(ids))})", ids)
    return {row["id"]: row for row in rows}


def by_public_id(db: sqlite_utils.Database, public_id: str, context: int = 2) -> dict[str, Any]:
    """One memory by the id users see: `message:<id>`, an imported record's id, or a chunk number. Its
    whole text (all chunks), time and speaker; for a message, its conversation and the `context`
    messages either side. `NotFound` when there is none."""
    public_id = public_id.strip()
    if public_id.startswith("message:") and public_id[8:].isdigit():
        where, params = "source = 'message' AND message_id = ?", [int(public_id[8:])]
    else:
        where, params = "source = 'import' AND source_id = ?", [public_id]
        if public_id.isdigit() and not db.execute(f"SELECT 1 FROM memory_chunks WHERE {where}", params).fetchone():
            where, params = "id = ?", [int(public_id)]
    rows = list(db.query(f"SELECT id, source, source_id, message_id, text, time, speaker, session FROM memory_chunks "
                         f"WHERE {where} ORDER BY part", params))
    if not rows:
        raise NotFound(f"no memory {public_id!r}; `ember memory search` and `ember memory list` show ids")
    first = rows[0]
    out = {k: first[k] for k in ("source", "source_id", "message_id", "time", "speaker")}
    out.update(id=public_id, chunk_ids=[r["id"] for r in rows], text=" ".join(r["text"] for r in rows),
               conversation_id=None)
    if first["source"] == "message" and first["message_id"] is not None:
        found = list(db["messages"].rows_where("id = ?", [first["message_id"]]))
        if found:
            conversation_id = found[0]["conversation_id"]
            out["conversation_id"] = conversation_id
            out["text"] = found[0]["content"]
            around = list(db.query(
                "SELECT id, role, content, created FROM messages WHERE conversation_id = ? AND id BETWEEN ? AND ? "
                "ORDER BY id", [conversation_id, first["message_id"] - 2 * context, first["message_id"] + 2 * context]))
            i = next(n for n, r in enumerate(around) if r["id"] == first["message_id"])
            out["context"] = around[max(0, i - context): i + context + 1]
    return out


def in_time_range(db: sqlite_utils.Database, start: str, end: str, limit: int = 1000) -> list[int]:
    """Chunks whose time falls in [start, end), newest first."""
    return [row[0] for row in db.execute(
        "SELECT id FROM memory_chunks WHERE time >= ? AND time < ? ORDER BY time DESC LIMIT ?",
        [start, end, limit])]


def list_chunks(db: sqlite_utils.Database, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
    """Chunks, newest first."""
    return list(db.query(
        "SELECT id, source, source_id, part, message_id, text, time, speaker, session, created, "
        "embedding IS NOT NULL AS embedded FROM memory_chunks ORDER BY COALESCE(time, created) DESC, id DESC "
        "LIMIT ? OFFSET ?", [limit, offset]))


def stats(db: sqlite_utils.Database) -> dict[str, Any]:
    """How much memory there is, by source, and how much of it is embedded."""
    row = db.execute("""
        SELECT COUNT(*), SUM(source = 'message'), SUM(source = 'import'), SUM(embedding IS NOT NULL),
               COUNT(DISTINCT CASE WHEN source = 'import' THEN source_id END), MIN(time), MAX(time)
        FROM memory_chunks""").fetchone()
    return {"chunks": row[0], "from_messages": row[1] or 0, "from_imports": row[2] or 0,
            "embedded": row[3] or 0, "imported_records": row[4], "oldest": row[5], "newest": row[6]}


def _chunk(db: sqlite_utils.Database, chunk_id: int) -> dict[str, Any]:
    found = chunks_by_id(db, [chunk_id]).get(chunk_id)
    if found is None:
        raise NotFound(f"no memory with id {chunk_id}; `ember memory list` shows them")
    return found


def preview_delete_chunk(db: sqlite_utils.Database, chunk_id: int) -> dict[str, Any]:
    """What forgetting this memory would remove, counted as `conversations.preview` counts (an imported
    record goes whole; a message's memory takes the message), with the chunk's row under `chunk`."""
    found = _chunk(db, chunk_id)
    if found["source"] == "message":
        counts = convs.preview(db, convs.select_message(db, found["message_id"]))
    else:
        counts = {"messages": 0, "conversations": 0, "adapters_tainted": 0,
                  "memories": db.execute("SELECT COUNT(*) FROM memory_chunks WHERE source = 'import' "
                                         "AND source_id = ?", [found["source_id"]]).fetchone()[0]}
    return {"chunk": found, **counts}


def chunk_ids_from(db: sqlite_utils.Database, source: str) -> list[int]:
    """The ids of the chunks that came from `source` (e.g. 'import', 'note')."""
    return [row["id"] for row in db["memory_chunks"].rows_where("source = ?", [source], select="id")]


def delete_chunk(db: sqlite_utils.Database, chunk_id: int) -> dict[str, Any]:
    """Forget a memory. An imported record goes whole; a chunk of a message forgets the message.

    Returns the chunk's row, with what was deleted counted under `deleted`.
    """
    found = _chunk(db, chunk_id)
    with transaction(db):
        if found["source"] == "message":
            counts = convs.forget_message(db, found["message_id"])
        else:
            memories = db.execute("DELETE FROM memory_chunks WHERE source = 'import' AND source_id = ?",
                                  [found["source_id"]]).rowcount
            counts = {"messages": 0, "conversations": 0, "memories": memories, "adapters_tainted": 0}
    return {**found, "deleted": counts}


def record_reply_memories(db: sqlite_utils.Database, message_id: int,
                          used: Sequence[tuple[int, float]]) -> None:
    """Remember which chunks (with their scores, best first) a reply was given."""
    with transaction(db):
        db["reply_memories"].insert_all(
            [{"message_id": message_id, "chunk_id": chunk_id, "rank": rank, "score": score}
             for rank, (chunk_id, score) in enumerate(used, start=1)], replace=True)


def reply_memories(db: sqlite_utils.Database, message_id: int) -> list[dict[str, Any]]:
    """The memories a reply was given, in the order it saw them (deleted ones are gone)."""
    return list(db.query("""
        SELECT c.id, c.source, c.source_id, c.message_id, c.text, c.time, c.speaker, r.score
        FROM reply_memories r JOIN memory_chunks c ON c.id = r.chunk_id
        WHERE r.message_id = ? ORDER BY r.rank""", [message_id]))
