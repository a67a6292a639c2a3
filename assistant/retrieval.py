"""Hybrid retrieval over the user's memory, and prompt assembly that cites what it used.

BM25 (SQLite FTS5) finds exact words and names; dense similarity (all-MiniLM-L6-v2 over sqlite-vec)
finds paraphrases. Their rankings are fused by reciprocal rank fusion (Cormack et al., SIGIR 2009),
with a third ranking when the question names a time ("last week", "on May 4th"): the chunks of that
period, ordered by similarity.

The router asks for less when it can (`dense_if`): BM25 first, and the question embedded only when the
words leave its decision open. Notes of messages already in the prompt are left out (`exclude_message_ids`).
"""
from __future__ import annotations

import calendar
import dataclasses
import datetime as dt
import re
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Collection

import numpy as np

from assistant import evidence
from assistant.embedder import Embedder
from storage import feedback, memory
from storage.db import connections_of

if TYPE_CHECKING:
    import sqlite_utils

RRF_K = 60
POOL = 40            # candidates each ranking contributes before fusion
STALE_PER_SEARCH = 64  # out-of-date vectors re-made per search: a chat's previous message, or an old
                       # database's vectors a batch at a time (~0.1 s) rather than all on one question
MONTHS = {name.lower(): i for i, name in enumerate(calendar.month_name) if name}
MONTHS.update({name.lower(): i for i, name in enumerate(calendar.month_abbr) if name})
WORD_NUMBERS = {"a": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
                "a couple of": 2, "a few": 4, "several": 5}


@dataclasses.dataclass
class Hit:
    """One memory found for a question."""

    id: int
    text: str
    score: float
    time: str | None
    speaker: str | None
    source: str
    source_id: str
    message_id: int | None
    session: str | None = None
    similarity: float | None = None    # cosine to the question, when it was embedded
    origin: str = "user"               # whose words: user | edited | approved | assistant (assistant/evidence.py)
    replaced_by: int | None = None     # the chunk id of a later statement of the same fact

    @property
    def public_id(self) -> str:
        """The id a user knows: their imported record's id, or `message:<id>` for the chat log."""
        return self.source_id if self.source == "import" else f"message:{self.message_id}"

    @property
    def conversation_id(self) -> int | None:
        """The conversation a chat message belongs to (None for an imported note)."""
        return int(self.session) if self.source == "message" and (self.session or "").isdigit() else None

    def as_json(self) -> dict[str, Any]:
        return {"id": self.public_id, "chunk_id": self.id, "text": self.text, "score": round(self.score, 5),
                "time": self.time, "speaker": self.speaker, "source": self.source, "origin": self.origin,
                "conversation_id": self.conversation_id, "replaced_by": self.replaced_by,
                "similarity": None if self.similarity is None else round(self.similarity, 4)}


def time_window(question: str, now: dt.date, *, recently: bool = False) -> tuple[str, str] | None:
    """The period a question asks about, as [start, end) ISO dates, or None if it names none.

    "Recently" names no period: people say it of things weeks or months old, and reading it as the
    last week (`recently=True`, the rule of hybrid-v1) ranked that week's chunks above the ones asked
    about (on MemoryBank 5 of the 9 questions hybrid-v1 missed at 5 said "recently").
    """
    q = question.lower()
    day = dt.timedelta(days=1)

    def span(start: dt.date, end: dt.date) -> tuple[str, str]:
        return start.isoformat(), end.isoformat()

    if m := re.search(r"\b(\d{4})-(\d{2})-(\d{2})\b", q):
        d = dt.date(int(m[1]), int(m[2]), int(m[3]))
        return span(d, d + day)
    if "yesterday" in q:
        return span(now - day, now)
    if "today" in q or "this morning" in q or "tonight" in q:
        return span(now, now + day)
    number = "|".join(sorted((re.escape(w) for w in WORD_NUMBERS), key=len, reverse=True))
    if m := re.search(rf"\b(\d+|{number}) days? ago\b", q):
        n = int(m[1]) if m[1].isdigit() else WORD_NUMBERS[m[1]]
        return span(now - (n + 2) * day, now - max(n - 2, 0) * day + day)
    if m := re.search(rf"\b(\d+|{number}) weeks? ago\b", q):
        n = int(m[1]) if m[1].isdigit() else WORD_NUMBERS[m[1]]
        return span(now - (7 * n + 4) * day, now - (7 * n - 4) * day)
    if re.search(r"\b(last|past) week\b", q) or "this week" in q or (recently and "recently" in q):
        return span(now - 7 * day, now + day)
    if re.search(r"\b(last|past) month\b", q):
        return span(now - 31 * day, now + day)
    months = "|".join(sorted(MONTHS, key=len, reverse=True))
    date_forms = [rf"\b({months})\.? (\d{{1,2}})(?:st|nd|rd|th)?\b", rf"\b(\d{{1,2}})(?:st|nd|rd|th)? (?:of )?({months})\b"]
    for i, form in enumerate(date_forms):
        if m := re.search(form, q):
            month, dom = (m[1], m[2]) if i == 0 else (m[2], m[1])
            year = now.year if MONTHS[month] <= now.month else now.year - 1
            try:
                d = dt.date(year, MONTHS[month], int(dom))
            except ValueError:
                continue
            return span(d, d + day)
    if m := re.search(rf"\bin ({months})\b", q):
        month = MONTHS[m[1]]
        year = now.year if month <= now.month else now.year - 1
        last = calendar.monthrange(year, month)[1]
        return span(dt.date(year, month, 1), dt.date(year, month, last) + day)
    return None


def _spoken(row: dict[str, Any]) -> str:
    speaker = (row["speaker"] or "").strip()
    if not speaker or row["text"].startswith(f"{speaker}:"):
        return row["text"]
    return f"{speaker}: {row['text']}"


def vectors_in_context(db: sqlite_utils.Database, embedder: Embedder, ids: list[int]) -> np.ndarray:
    """The vectors of chunks `ids`: each the normalised sum of the vector of the chunk's own words and
    the vector of the chunk read between its neighbours in the session (`memory.in_context`), speakers
    named.

    A turn alone is often too short to say what it is about ("Yes, twice last summer"); its neighbours
    say it. The chunk's own vector keeps half the weight, so a turn is not taken for its neighbour.
    On MemoryBank (exact dense scores, 99 questions, "recently" not read as a period) hybrid recall@5
    went 0.927 -> 0.944 with one record an exchange and 0.907 -> 0.917 with one a turn, against vectors
    of the words alone. It costs two encodings of ~4 chunks' words per chunk: ingest in bulk is ~4x slower.
    """
    contexts = memory.in_context(db, ids)
    own, windows = [], []
    for chunk_id in ids:
        context = contexts[chunk_id]
        own.append(_spoken(next(row for row in context if row["id"] == chunk_id)))
        windows.append("\n".join(_spoken(row) for row in context))
    vectors = embedder.encode(own)
    read = [i for i, window in enumerate(windows) if window != own[i]]   # chunks with neighbours
    if read:
        vectors[read] += embedder.encode([windows[i] for i in read])
        vectors[read] /= np.linalg.norm(vectors[read], axis=1, keepdims=True)
    return vectors


def embed_pending(db: sqlite_utils.Database, embedder: Embedder, batch: int = 256, *,
                  stale: int | None = None, in_context: bool = True,
                  progress: Callable[[int, int], None] | None = None,
                  skip_messages: Collection[int] = ()) -> int:
    """Embed every chunk that has no vector yet, then re-make up to `stale` (None: all) out-of-date
    vectors (`memory.stale`); return how many. `progress(done, total)` is called after each batch.
    Chunks made from `skip_messages` wait (a request leaves those of the messages in its prompt, which
    it cannot recall anyway, for later).

    `in_context=False` makes the vectors of Ember before 0.2, of the chunk's words alone, for the
    benchmark's baseline; they are not marked stale, so searches keep them as they are.
    """
    done = 0
    total = 0
    if progress is not None:
        total = memory.unembedded_count(db) + (memory.stale_count(db) if in_context and stale is None else 0)
        if total:
            progress(0, total)

    def embed(ids: list[int], texts: list[str]) -> None:
        if in_context:
            memory.store_embeddings(db, ids, vectors_in_context(db, embedder, ids))
        else:
            memory.store_embeddings(db, ids, embedder.encode(texts))

    while pending := memory.unembedded(db, limit=batch, skip_messages=skip_messages):
        ids, texts = zip(*pending)
        embed(list(ids), list(texts))
        done += len(ids)
        if progress is not None:
            progress(done, max(total, done))
    left = stale
    while in_context and (left is None or left > 0) and (
            pending := memory.stale(db, limit=batch if left is None else min(batch, left),
                                    skip_messages=skip_messages)):
        ids, texts = zip(*pending)
        embed(list(ids), list(texts))
        done += len(ids)
        left = None if left is None else left - len(ids)
        if progress is not None:
            progress(done, max(total, done))
    return done


def _normalised(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def retriever_for(settings: Any, db: sqlite_utils.Database, embedder: Embedder | None = None) -> "Retriever":
    """A retriever on this user's memory; the embedding model loads on first use."""
    return Retriever(db, embedder or (lambda: Embedder(settings.cache_dir, threads=settings.threads)))


class Retriever:
    """Search one user's memory: BM25, dense, or both fused. Keeps the memory index up to date."""

    def __init__(self, db: sqlite_utils.Database, embedder: Embedder | Callable[[], Embedder]):
        self.db = db
        self._embedder = embedder
        # BM25 runs on its own connection in a thread while the question is embedded: SQLite and
        # onnxruntime both release the GIL, so the two overlap.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bm25")
        self._reader: sqlite_utils.Database | None = None
        self._synced: tuple[int, int] | None = None     # the database's state after the last sync
        self._embedded: tuple[int, int] | None = None   # ... after the last embedding of pending chunks

    def _bm25_reader(self, question: str, k: int) -> list[tuple[int, float]]:
        if self._reader is None:
            self._reader = connections_of(self.db).get("bm25")
        return memory.bm25_search(self._reader, question, k)

    @property
    def embedder(self) -> Embedder:
        if not isinstance(self._embedder, Embedder):
            self._embedder = self._embedder()     # loaded on first use, not before
        return self._embedder

    def _state(self) -> tuple[int, int]:
        # Nothing can have changed unless a connection committed.
        from storage.db import change_marker

        return change_marker(self.db)

    def sync(self) -> None:
        """Index the log's new messages (BM25 sees them at once); no work when nothing was written since."""
        if self._synced == self._state():
            return
        memory.sync_messages(self.db)
        self._synced = self._state()

    def embed_pending(self, stale: int | None = STALE_PER_SEARCH, *, skip_messages: Collection[int] = ()) -> int:
        """Embed the chunks without a vector and re-make up to `stale` (None: all) out-of-date ones,
        but those made from `skip_messages` (the messages in a request's prompt); no work when nothing
        was written since the last time, and the embedding model is loaded only when there is
        something to embed."""
        state = self._state()
        if self._embedded == state:
            return 0
        waiting = (memory.unembedded(self.db, limit=1, skip_messages=skip_messages)
                   or memory.stale(self.db, limit=1, skip_messages=skip_messages))
        done = embed_pending(self.db, self.embedder, stale=stale, skip_messages=skip_messages) if waiting else 0
        after = self._state()
        if self._synced == state:     # vectors are not messages: a sync that was current stays so
            self._synced = after
        # out-of-date vectors left for the next searches, or chunks skipped: they must not find this
        # one's state current
        left = memory.stale(self.db, limit=1) if done or skip_messages else []
        if skip_messages and not left:
            left = memory.unembedded(self.db, limit=1)
        self._embedded = None if left else after
        return done

    def refresh(self, *, skip_messages: Collection[int] = ()) -> None:
        """Index new messages, embed every chunk without a vector and re-make every out-of-date one,
        but those made from `skip_messages` (see `embed_pending`)."""
        self.sync()
        self.embed_pending(stale=None, skip_messages=skip_messages)

    def bm25(self, question: str, k: int) -> list[tuple[int, float]]:
        return memory.bm25_search(self.db, question, k)

    def dense(self, question: str, k: int, vector: np.ndarray | None = None, *,
              scan: int | None = None) -> list[tuple[int, float]]:
        vector = self.embedder.encode_query(question) if vector is None else vector
        return memory.vector_search(self.db, vector, k, scan=scan)

    def _in_window(self, window: tuple[str, str], vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        return memory.rescore(self.db, memory.in_time_range(self.db, *window), vector, k)

    def search(self, question: str, k: int = 5, *, mode: str = "hybrid", now: dt.date | None = None,
               exclude_message_ids: Collection[int] = ()) -> list[Hit]:
        """The `k` best memories for `question`, deduplicated, best first.

        mode: hybrid (BM25 + dense + time, fused), bm25, dense, or hybrid-v1 (the fusion of Ember
        0.1, which read "recently" as the last week; kept for the benchmark). Notes made from the messages
        `exclude_message_ids` (those already in the prompt) are left out.
        """
        return self.search_with_signals(question, k, mode=mode, now=now,
                                        exclude_message_ids=exclude_message_ids)[0]

    def search_with_signals(self, question: str, k: int = 5, *, mode: str = "hybrid",
                            now: dt.date | None = None, before_message: int | None = None,
                            exclude_message_ids: Collection[int] = (),
                            dense_if: Callable[[dict[str, Any]], bool] | None = None,
                            ) -> tuple[list[Hit], dict[str, Any]]:
        """`search`, plus how good the match is: the best note's cosine similarity (`similarity`), its
        margin over the second (`margin`) and the best BM25 score (`bm25`), None where there is none,
        and whether the question was embedded at all (`dense`).

        `before_message` leaves out notes made from that message or later ones (memory as it was then);
        `exclude_message_ids` leaves out notes made from those messages (already in the prompt).
        `dense_if` (hybrid only): BM25 runs first, and the question is embedded only when
        `dense_if(signals)` says so, given the BM25 signals; otherwise the hits are BM25's alone.
        """
        excluded = memory.chunks_from_message(self.db, before_message) if before_message is not None else set()
        in_prompt = set(exclude_message_ids)
        rows: dict[int, dict[str, Any]] = {}      # chunk rows fetched so far, by id
        reviews: dict[int, dict[str, Any]] = {}   # the user's feedback on the assistant replies among them
        about_assistant = evidence.asks_about_assistant(question)

        def fetch(ids: list[int]) -> None:
            missing = [chunk_id for chunk_id in ids if chunk_id not in rows]
            if missing:
                found = memory.chunks_by_id(self.db, missing)
                rows.update(found)
                replies = [r["message_id"] for r in found.values()
                           if r["message_id"] is not None and evidence.is_assistant(r["speaker"])]
                reviews.update(feedback.of_messages(self.db, replies))

        def kept(ranking: list[tuple[int, float]]) -> list[tuple[int, float]]:
            # Whose words may answer (assistant/evidence.py): an assistant's reply only when asked about
            # what it said, or when the user approved or edited it. Then what the prompt already holds.
            if excluded:
                ranking = [item for item in ranking if item[0] not in excluded]
            fetch([chunk_id for chunk_id, _ in ranking])
            return [item for item in ranking if item[0] in rows
                    and rows[item[0]]["message_id"] not in in_prompt
                    and evidence.admissible(rows[item[0]]["speaker"], reviews.get(rows[item[0]]["message_id"]),
                                            about_assistant)]

        asked = _normalised(question)

        def matching(ranking: list[tuple[int, float]]) -> list[tuple[int, float]]:
            # The question itself, asked before (or just logged) and stored, is not a match for it.
            fetch([chunk_id for chunk_id, _ in ranking])
            return [item for item in ranking if item[0] in rows and _normalised(rows[item[0]]["text"]) != asked]

        # Room for what is left out: a message is one chunk unless it is long. Each ranking is then cut
        # to `want` candidates, so that what is fused does not depend on how many were left out: the
        # chat recalls a draft's memories before the message is logged, and once it is (one more
        # message in the prompt) the same text must recall the same ones.
        want = POOL + min(len(excluded), 5000)
        pool = want + min(len(in_prompt), 1000)
        # The vector index's approximate scan finds other candidates when it scans more: its size moves
        # in steps of 64, and one more message in the prompt after an even number of them (the question,
        # once logged, after a history of exchanges) never crosses a step.
        scan = -(-max(64, pool * memory.RESCORE_FACTOR) // 64) * 64
        signals: dict[str, Any] = {"similarity": None, "margin": None, "bm25": None, "dense": False}
        cosine: dict[int, float] = {}
        if mode == "bm25":
            ranked = matching(kept(self.bm25(question, max(k * 3, pool))))
            signals["bm25"] = ranked[0][1] if ranked else None
        else:
            words: list[tuple[int, float]] | None = None
            lexical = early = None
            if mode == "hybrid" and dense_if is not None:
                # BM25 first, on this thread: its answer decides whether the question is embedded. A model
                # already loaded embeds it meanwhile on the other thread (not waited for when BM25 settles
                # it); one not loaded yet is loaded only if it is needed.
                if isinstance(self._embedder, Embedder):
                    early = self._pool.submit(self._embedder.encode_query, question)
                words = matching(kept(self.bm25(question, pool)))[:want]
                signals["bm25"] = words[0][1] if words else None
            elif mode in ("hybrid", "hybrid-v1"):
                lexical = self._pool.submit(self._bm25_reader, question, pool)
            if dense_if is not None and words is not None and not dense_if(signals):
                ranked = words
            else:
                signals["dense"] = True
                # chunks synced since the last search get their vectors now, but those of the messages
                # in the prompt: they cannot be recalled, and the chat embeds them while the user types
                self.embed_pending(skip_messages=in_prompt)
                vector = early.result() if early is not None else self.embedder.encode_query(question)
                dense = kept(self.dense(question, pool, vector, scan=scan))[:want]
                cosine = dict(dense)
                scores = [score for _, score in matching(dense[:6])]
                if scores:
                    signals["similarity"] = scores[0]
                    signals["margin"] = scores[0] - scores[1] if len(scores) > 1 else scores[0]
                if lexical is not None:
                    words = matching(kept(lexical.result()))[:want]
                    signals["bm25"] = words[0][1] if words else None
                if words is None:
                    ranked = dense
                else:
                    rankings = [words, dense]
                    window = time_window(question, now or dt.date.today(), recently=mode == "hybrid-v1")
                    if window:
                        rankings.append(kept(self._in_window(window, vector, pool))[:want])
                    fused: dict[int, float] = {}
                    for ranking in rankings:
                        for rank, (chunk_id, _score) in enumerate(ranking, start=1):
                            fused[chunk_id] = fused.get(chunk_id, 0.0) + 1.0 / (RRF_K + rank)
                    ranked = sorted(fused.items(), key=lambda item: -item[1])
        fetch([chunk_id for chunk_id, _ in ranked[: k * 4]])
        hits, seen = [], {asked}   # the question asked before is not an answer
        for chunk_id, score in ranked[: k * 4]:
            row = rows.get(chunk_id)
            if row is None:
                continue
            key = _normalised(row["text"])
            if key in seen:       # the same words stored twice (re-imported, repeated) count once
                continue
            seen.add(key)
            hits.append(Hit(id=chunk_id, text=row["text"], score=score, time=row["time"],
                            speaker=row["speaker"], source=row["source"], source_id=row["source_id"],
                            message_id=row["message_id"], session=row["session"], similarity=cosine.get(chunk_id)))
        # Whose words they are, and the newest statement of a fact first (assistant/evidence.py).
        hits = evidence.supersede(evidence.admit(hits, question, reviews), question)
        return hits[:k], signals


# How the memories are put in front of the model. `ember bench evidence` measures, on the bundled model
# and 99 MemoryBank questions, how often each style's framing shows up in replies: numbered 1.0 %,
# plain 3.0 %, dated 13.1 %, prose 22.2 % (the model opens with "On 1 May 2023, the user said: …"), and
# numbered also gave the best answer F1 (0.086 vs 0.077-0.085). It stays the default; what markup still
# leaks is stripped before a reply is shown or stored (assistant/evidence.py), and speakers are named
# ("the user", "Ember") so an assistant's reply is never read as the user's words.
# Short on purpose: SmolLM2-135M follows short wording; longer instructions made it refuse to answer.
MEMORY_STYLES = {
    "numbered": ("You are Ember, the user's private assistant. Below are numbered notes from the user's own "
                 "past conversations. Answer using them, cite like [1].\n\n{notes}",
                 "[{n}] ({date}{speaker}) {text}"),
    "prose": ("You are Ember, the user's private assistant. What you know from earlier conversations:\n\n{notes}",
              "On {day}, {who} said: {text}"),
    "plain": ("You are Ember, the user's private assistant. Facts from the user's past conversations, "
              "newest last:\n{notes}", "- {text}"),
    "dated": ("You are Ember, the user's private assistant. Notes from the user's past conversations, "
              "oldest first:\n{notes}", "{date}: {text}"),
}
# Echo markers per style: a reply matching one repeated the block's framing instead of answering.
MEMORY_ECHO = {
    "numbered": re.compile(r"\[\d+\]|[\[(]\d{4}-\d{2}-\d{2}|\b(user|assistant)[\])]", re.IGNORECASE),
    "prose": re.compile(r"\b(the user|ember|you) said:|\bon \d{1,2} \w+ \d{4},", re.IGNORECASE),
    "plain": re.compile(r"^\s*- |facts from the user", re.IGNORECASE | re.MULTILINE),
    "dated": re.compile(r"\b\d{4}-\d{2}-\d{2}:|notes from the user", re.IGNORECASE),
}
MEMORY_STYLE = "numbered"


def _who(hit: Hit) -> str:
    """Who said it, in the block's words: the user, Ember, another app's assistant, or an imported name."""
    if hit.origin in ("assistant", "approved"):
        return "Ember" if hit.source == "message" else "an assistant"
    speaker = (hit.speaker or "").strip()
    if hit.origin == "edited" or hit.source == "message" or speaker.lower() in ("", "user", "me", "human"):
        return "the user"
    return speaker


def memory_message(hits: list[Hit], style: str = MEMORY_STYLE) -> dict[str, str]:
    """The system message that puts `hits` in front of the model, in one of MEMORY_STYLES, oldest first
    (a later statement of a fact is read last). Replaced statements are never shown."""
    frame, line = MEMORY_STYLES[style]
    shown = sorted((h for h in hits if h.replaced_by is None), key=lambda h: (h.time or "", h.id))
    notes = "\n".join(line.format(
        n=i, date=(h.time or "")[:10] or "undated", speaker=", " + _who(h),
        day=_day(h.time), who=_who(h), text=" ".join(h.text.split())) for i, h in enumerate(shown, start=1))
    return {"role": "system", "content": frame.format(notes=notes)}


def _day(stamp: str | None) -> str:
    try:
        return dt.date.fromisoformat((stamp or "")[:10]).strftime("%-d %B %Y")
    except ValueError:
        return "an unknown day"


def fit_memories(hits: list[Hit], count_tokens: Callable[[str], int], budget: int) -> list[Hit]:
    """The best hits whose memory message fits in `budget` tokens (whole hits only, best first);
    statements a later one replaced are left out."""
    kept = [h for h in hits if h.replaced_by is None]
    while kept and count_tokens(memory_message(kept)["content"]) > budget:
        kept.pop()
    return kept
