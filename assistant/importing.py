"""Bring an export into the log and memory: the one path `ember import` (and any front-end) takes.

All or nothing: the whole export is merged in one transaction, so bad input anywhere (without
--skip-bad) leaves the log as it was. Memory is indexed right after, in batches.
"""
from __future__ import annotations

import collections
import time
from typing import Any, Callable

import sqlite_utils

from assistant.errors import InvalidInput
from assistant.importers import Export, Note, Problem
from storage import imports, memory
from storage.db import transaction

SECTIONS = {"conversations": ("added", "updated", "unchanged"),
            "messages": ("added", "updated", "removed", "unchanged"),
            "notes": ("added", "updated", "unchanged")}


def merge(db: sqlite_utils.Database, export: Export, *, learn: bool = False, dry_run: bool = False,
          skip_bad: bool = False) -> dict[str, Any]:
    """Merge `export` into the log (or, with `dry_run`, only count what that would do; nothing is
    written). Raises `InvalidInput` naming the file and place of the first bad item, unless `skip_bad`."""
    counts: collections.Counter = collections.Counter()
    problems: list[str] = []

    def consume(import_id: int | None) -> None:
        for item in export.items():
            if isinstance(item, Problem):
                if not skip_bad:
                    raise InvalidInput(f"{item}; nothing was imported (fix it, or pass --skip-bad to import the rest)")
                problems.append(str(item))
            elif isinstance(item, Note):
                counts.update(imports.merge_notes(db, import_id, item.group, item.records, dry_run=dry_run))
            elif not item.messages:
                export.skip("conversations with no text")
            else:
                counts.update(imports.merge_conversation(db, import_id, item, learn=learn, dry_run=dry_run))
        if not any(counts.values()):
            reason = (f"nothing could be imported ({problems[0]}{f' and {len(problems) - 1} more' if len(problems) > 1 else ''})"
                      if problems else "holds nothing to import")
            raise InvalidInput(f"{export.path.name}: {reason}; nothing was imported")

    found = imports.find(db, export.app, export.sha256)
    import_id = found["id"] if found else None
    if dry_run:
        consume(import_id)
    else:
        with transaction(db):
            import_id = imports.start(db, export.app, str(export.path), export.sha256)
            consume(import_id)
            imports.finish(db, import_id, {k: v for k, v in counts.items() if v})
    result: dict[str, Any] = {
        "source": {"app": export.app, "file": str(export.path), "sha256": export.sha256, "import_id": import_id},
        "dry_run": dry_run, "learn": learn}
    for section, kinds in SECTIONS.items():
        result[section] = {kind: counts[f"{section}_{kind}"] for kind in kinds}
    result.update(skipped=dict(export.skipped), problems=problems, warnings=export.warnings)
    return result


def index(db: sqlite_utils.Database, embedder: Callable[[], Any] | None,
          progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Make what was imported searchable: chunk new messages (BM25 at once), then embed every chunk
    without a vector, each read among its neighbours as every search does
    (`assistant.retrieval.embed_pending`), calling `progress(done, total)` after each batch. `embedder`
    returns the embedder (loaded only when there is something to embed; None: BM25 only). Returns
    chunks, seconds and chunks per second."""
    from assistant.retrieval import embed_pending

    started = time.perf_counter()
    memory.sync_messages(db)
    done = 0
    if embedder is not None and (memory.unembedded_count(db) or memory.stale_count(db)):
        done = embed_pending(db, embedder(), progress=progress)
    seconds = time.perf_counter() - started
    return {"chunks": done, "seconds": round(seconds, 3), "per_second": round(done / seconds, 1) if done and seconds else None}
