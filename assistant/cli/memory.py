"""`ember memory …`: import notes, search and inspect what Ember remembers."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import click

from assistant.cli.common import (Preview, carry_out, destructive_options, json_option, model_option, open_store,
                                 plural, print_json, settings_from)
from assistant.display import one_line
from assistant.errors import InvalidInput
from assistant.memory_import import read_records
from assistant.retrieval import retriever_for
from storage import memory as mem

MODES = ("hybrid", "bm25", "dense")


@click.group()
def memory():
    """What Ember remembers: your messages and imported notes."""


@memory.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--skip-bad", is_flag=True, help="Import the good lines of a file with bad ones.")
@model_option
@json_option
def import_(file, skip_bad, model, as_json):
    """Import FILE: JSONL, one {"id", "text", "time"?, "speaker"?, "session"?} a line."""
    records, problems = read_records(file, skip_bad=skip_bad)
    settings = settings_from(model=model)
    db = open_store(settings)
    # Every line is read and checked before the first write (read_records); the writes go in batches
    # beside the other processes'.
    counts = mem.upsert_records(db, records, per_transaction=mem.RECORDS_PER_TRANSACTION)
    for problem in problems:
        click.echo(f"skipped {problem}", err=True)
    embedded = 0
    if counts["chunks"]:
        if not as_json:
            click.echo(f"Embedding {counts['chunks']} chunks…", err=True)
        retriever = retriever_for(settings, db)
        retriever.refresh()
        embedded = counts["chunks"]
    result = dict(counts, skipped=len(problems), embedded=embedded)
    if as_json:
        print_json(result)
    else:
        click.echo(f"Imported {counts['added']} new and {counts['updated']} updated records "
                   f"({counts['chunks']} chunks); skipped {len(problems)} bad lines.")


def _date(value: str | None) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value[:10])
    except ValueError as err:
        raise InvalidInput(f"--now must be a date like 2026-05-04, not {value!r}") from err


def _queries(path: Path) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidInput(f"cannot read {path}: {err}") from err
    queries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise InvalidInput(f"{path}: line {number} is not valid JSON") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("query"), str) or "id" not in obj:
            raise InvalidInput(f'{path}: line {number} needs {{"id", "query"}}')
        queries.append(obj)
    return queries


@memory.command()
@click.argument("query", required=False)
@click.option("--k", "k", type=click.IntRange(min=1, max=1000), default=5, show_default=True)
@click.option("--queries", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help='Batch: JSONL of {"id", "query"}; prints JSONL of {"id", "results"}.')
@click.option("--mode", type=click.Choice(MODES), default="hybrid", show_default=True)
@click.option("--now", "now", default=None, help="Date that 'last week' is relative to (default: today).")
@model_option
@json_option
def search(query, k, queries, mode, now, model, as_json):
    """Find memories for QUERY (or every query in --queries FILE)."""
    if (query is None) == (queries is None):
        raise InvalidInput("give a QUERY or --queries FILE (one of them)")
    if query is not None and not query.strip():
        raise InvalidInput("the query is empty")
    batch = _queries(queries) if queries is not None else None
    settings = settings_from(model=model)
    retriever = retriever_for(settings, open_store(settings))
    retriever.refresh()
    today = _date(now)
    if batch is not None:
        for item in batch:   # JSONL out, one line per query, the model loaded once
            hits = retriever.search(item["query"], k, mode=mode, now=today)
            click.echo(json.dumps({"id": item["id"], "results": [h.as_json() for h in hits]},
                                  ensure_ascii=False))
        return
    hits = retriever.search(query, k, mode=mode, now=today)
    if as_json:
        return print_json([h.as_json() for h in hits])
    if not hits:
        click.echo("Nothing found in memory.")
    ids = {hit.id: hit.public_id for hit in hits}
    for i, hit in enumerate(hits, start=1):
        when = (hit.time or "")[:10]
        marks = [ORIGINS[hit.origin]] if hit.origin in ORIGINS else []
        if hit.replaced_by is not None:
            marks.append(f"replaced by {ids.get(hit.replaced_by, f'memory {hit.replaced_by}')}")
        mark = f" ({'; '.join(marks)})" if marks else ""
        click.echo(f"{i}. [{hit.public_id}] {when}{mark} {' '.join(hit.text.split())[:160]}  ({hit.score:.4f})")
    return None


# How search results say whose words they are (the user's own need no mark).
ORIGINS = {"assistant": "Ember said", "approved": "Ember said, you approved", "edited": "your correction"}


@memory.command()
@click.argument("memory_id")
@model_option
@json_option
def show(memory_id, model, as_json):
    """Open one memory by the id search and answers cite (`message:12`, an imported record's id, or a
    chunk number): its whole text, when, who said it, and for a message its conversation."""
    db = open_store(settings_from(model=model))
    mem.sync_messages(db)
    found = mem.by_public_id(db, memory_id)
    if as_json:
        return print_json(found)
    click.echo(f"{memory_id} · {(found['time'] or 'undated')[:19]} · {found['speaker'] or found['source']}"
               + (f" · conversation {found['conversation_id']}" if found.get("conversation_id") else ""))
    click.echo(found["text"])
    for row in found.get("context", []):
        click.echo(f"  {'>' if row['id'] == found.get('message_id') else ' '} {row['role']}: {one_line(row['content'])[:120]}")
    return None


@memory.command("list")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@model_option
@json_option
def list_(limit, model, as_json):
    """Memories, newest first (ids for `ember memory remove`)."""
    db = open_store(settings_from(model=model))
    mem.sync_messages(db)
    rows = mem.list_chunks(db, limit=limit)
    if as_json:
        return print_json(rows)
    for row in rows:
        who = row["speaker"] or row["source"]
        click.echo(f"{row['id']:>6} {(row['time'] or '')[:10]:10} {who:9} {' '.join(row['text'].split())[:90]}")
    return None


@memory.command()
@model_option
@json_option
def stats(model, as_json):
    """How much Ember remembers."""
    db = open_store(settings_from(model=model))
    mem.sync_messages(db)
    result = mem.stats(db)
    if as_json:
        return print_json(result)
    click.echo(f"{result['chunks']} chunks ({result['from_messages']} from messages, "
               f"{result['from_imports']} from {result['imported_records']} imported records), "
               f"{result['embedded']} embedded; {result['oldest'] or '-'} to {result['newest'] or '-'}")
    return None


def _removal(chunk: dict, counts: dict) -> str:
    what = (f"memory {chunk['id']} (imported record {chunk['source_id']!r}, "
            f"{plural(counts['memories'], 'chunk')})" if chunk["source"] == "import"
            else f"memory {chunk['id']} and the message it comes from ({chunk['message_id']})")
    extra = []
    if counts["conversations"]:
        extra.append("its conversation, left empty")
    if counts["adapters_tainted"]:
        extra.append(f"withdrawing {plural(counts['adapters_tainted'], 'adapter')} trained on it")
    return what + (", " + " and ".join(extra) if extra else "")


@memory.command()
@click.argument("chunk_id", type=int)
@destructive_options
@model_option
@json_option
def remove(chunk_id, yes, dry_run, model, as_json):
    """Forget one memory (a chat message's memory forgets that message); asks first."""
    settings = settings_from(model=model)
    db = open_store(settings)
    counts = mem.preview_delete_chunk(db, chunk_id)
    chunk = counts.pop("chunk")
    summary = _removal(chunk, counts)
    line = f"{chunk['id']} {str(chunk['time'] or '')[:10]} {chunk['speaker'] or chunk['source']}: {one_line(chunk['text'])[:100]}"
    preview = Preview(counts, summary, [line], [chunk])

    def act() -> dict:
        removed = mem.delete_chunk(db, chunk_id)
        deleted = removed.pop("deleted")
        if removed["source"] == "message":
            # A paused adaptation run holding the forgotten message goes too, as with `ember forget`.
            from adapters.pipeline import drop_runs_on_forgotten

            deleted["runs_dropped"] = drop_runs_on_forgotten(db, settings.cache_dir)
        return {"removed": removed, "deleted": deleted}

    carry_out(preview, act, lambda done: f"Forgot {summary}.", yes=yes, dry_run=dry_run, as_json=as_json)


COMMANDS = [memory]
