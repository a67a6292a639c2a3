"""Bring an export into the log and memory: the one path `ember import` (and any front-end) takes.

All or nothing for bad input, without holding the write lock while reading: a first pass reads the
whole export (streamed, nothing written, no transaction open) and stops at the first bad item (unless
--skip-bad) before anything is written. Then the export is read again and written in batches of about
BATCH_MESSAGES messages, each its own short transaction, so the chat, `ember ask` and the daemon log
their messages between two batches instead of waiting out the busy timeout behind the whole import.

Meanwhile (and after a kill between batches) the conversations already committed are in the log, each
whole, excluded from learning, and the import is listed as incomplete (`storage.imports`); running the
same import again completes it (what is there is unchanged, the rest is added). Memory is indexed
right after, in batches.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from typing import Any, Callable, Iterable, Iterator

import sqlite_utils

from assistant.errors import InvalidInput
from assistant.importers import Export, Note, Problem
from assistant.importers.common import Item
from storage import imports, memory
from storage.atomic import make_way
from storage.db import transaction

SECTIONS = {"conversations": ("added", "updated", "unchanged"),
            "messages": ("added", "updated", "removed", "unchanged"),
            "notes": ("added", "updated", "unchanged")}
# Messages (or note records) written per transaction: ~0.1 s of holding the write lock on a 2-core
# machine (`ember bench import` reports the longest), far below the 10 s other writers wait.
BATCH_MESSAGES = 500


def merge(db: sqlite_utils.Database, export: Export, *, learn: bool = False, dry_run: bool = False,
          skip_bad: bool = False) -> dict[str, Any]:
    """Merge `export` into the log (or, with `dry_run`, only count what that would do; nothing is
    written). Raises `InvalidInput` naming the file and place of the first bad item, unless `skip_bad`;
    then nothing is written."""
    found = imports.find(db, export.app, export.sha256)
    import_id = found["id"] if found else None
    if dry_run:
        counts, problems = _count(db, export, import_id, skip_bad=skip_bad)
        lock = None
    else:
        validate(export, skip_bad=skip_bad)
        import_id, counts, problems, lock = _write(db, export, learn=learn, skip_bad=skip_bad)
    result: dict[str, Any] = {
        "source": {"app": export.app, "file": str(export.path), "sha256": export.sha256, "import_id": import_id},
        "dry_run": dry_run, "learn": learn}
    for section, kinds in SECTIONS.items():
        result[section] = {kind: counts[f"{section}_{kind}"] for kind in kinds}
    result.update(skipped=dict(export.skipped), problems=problems, warnings=export.warnings)
    if lock is not None:
        result["write_lock"] = lock
    return result


def validate(export: Export, *, skip_bad: bool = False) -> None:
    """The validation pass: read the whole export, write nothing, and raise `InvalidInput` at its first
    bad item (unless `skip_bad`) or when it holds nothing to import."""
    scratch = dataclasses.replace(export, skipped=collections.Counter(), warnings=[])  # counted by the real pass
    problems: list[str] = []
    importable = False
    for item in scratch.items():
        if isinstance(item, Problem):
            problems.append(_bad(item, skip_bad))
        elif isinstance(item, Note) or item.messages:
            importable = True
    if not importable:
        raise _nothing(export, problems)


def _bad(problem: Problem, skip_bad: bool, after: str = "") -> str:
    """A bad item: its line, kept with --skip-bad; otherwise the import stops here."""
    if not skip_bad:
        raise InvalidInput(f"{problem}; {after or 'nothing was imported'} "
                           "(fix it, or pass --skip-bad to import the rest)")
    return str(problem)


def _nothing(export: Export, problems: list[str]) -> InvalidInput:
    reason = (f"nothing could be imported ({problems[0]}{f' and {len(problems) - 1} more' if len(problems) > 1 else ''})"
              if problems else "holds nothing to import")
    return InvalidInput(f"{export.path.name}: {reason}; nothing was imported")


def _merge_item(db: sqlite_utils.Database, export: Export, import_id: int | None, item: Item, *, learn: bool,
                dry_run: bool) -> collections.Counter:
    """One conversation or note into the log (or counted, with `dry_run`)."""
    if isinstance(item, Note):
        return imports.merge_notes(db, import_id, item.group, item.records, dry_run=dry_run)
    if not item.messages:
        export.skip("conversations with no text")
        return collections.Counter()
    return imports.merge_conversation(db, import_id, item, learn=learn, dry_run=dry_run)


def _count(db: sqlite_utils.Database, export: Export, import_id: int | None, *,
           skip_bad: bool) -> tuple[collections.Counter, list[str]]:
    """`--dry-run`: what merging would do, read in one pass with no transaction open."""
    counts: collections.Counter = collections.Counter()
    problems: list[str] = []
    for item in export.items():
        if isinstance(item, Problem):
            problems.append(_bad(item, skip_bad))
        else:
            counts.update(_merge_item(db, export, import_id, item, learn=False, dry_run=True))
    if not any(counts.values()):
        raise _nothing(export, problems)
    return counts, problems


def _write(db: sqlite_utils.Database, export: Export, *, learn: bool,
           skip_bad: bool) -> tuple[int, collections.Counter, list[str], dict[str, Any]]:
    """The writing pass, after `validate`: the import marked incomplete, its items in batches (each
    parsed before its transaction begins), then marked complete. Returns the import's id, counts,
    problems, and its transactions with the longest time one of them held the write lock."""
    counts: collections.Counter = collections.Counter()
    problems: list[str] = []
    spans: list[float] = []
    with _holding(db, spans):
        import_id = imports.start(db, export.app, str(export.path), export.sha256)
    for number, batch in enumerate(batches(export.items(), BATCH_MESSAGES)):
        if number:
            make_way()
        with _holding(db, spans):
            for item in batch:
                if isinstance(item, Problem):
                    problems.append(_bad(item, skip_bad, "the file changed while it was imported, "
                                                         f"and import #{import_id} is incomplete"))
                else:
                    counts.update(_merge_item(db, export, import_id, item, learn=learn, dry_run=False))
    with _holding(db, spans):
        imports.finish(db, import_id, {k: v for k, v in counts.items() if v})
    return import_id, counts, problems, {"transactions": len(spans), "longest_ms": round(max(spans) * 1000, 1)}


@contextlib.contextmanager
def _holding(db: sqlite_utils.Database, spans: list[float]) -> Iterator[None]:
    """A write transaction; the time it held the write lock (BEGIN IMMEDIATE to COMMIT) is appended to
    `spans` when it commits."""
    with transaction(db):
        started = time.perf_counter()
        yield
    spans.append(time.perf_counter() - started)


def batches(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    """`items` in lists of about `size` messages (or note records); an item is never split."""
    batch: list[Item] = []
    held = 0
    for item in items:
        batch.append(item)
        held += _size(item)
        if held >= size:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


def _size(item: Item) -> int:
    if isinstance(item, Note):
        return len(item.records)
    return 0 if isinstance(item, Problem) else len(item.messages)


def index(db: sqlite_utils.Database, embedder: Callable[[], Any] | None,
          progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Make what was imported searchable: chunk new messages (BM25 at once), then embed every chunk
    without a vector, each read among its neighbours as every search does
    (`assistant.retrieval.embed_pending`), calling `progress(done, total)` after each batch. `embedder`
    returns the embedder (loaded only when there is something to embed; None: BM25 only). Returns
    chunks, seconds and chunks per second."""
    from assistant.retrieval import embed_pending

    started = time.perf_counter()
    memory.sync_messages(db, batch=BATCH_MESSAGES)
    done = 0
    if embedder is not None and (memory.unembedded_count(db) or memory.stale_count(db)):
        done = embed_pending(db, embedder(), progress=progress)
    seconds = time.perf_counter() - started
    return {"chunks": done, "seconds": round(seconds, 3), "per_second": round(done / seconds, 1) if done and seconds else None}
