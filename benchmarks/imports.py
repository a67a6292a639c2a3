"""`ember bench import`: a synthetic ChatGPT export (2,000 conversations, 40,000 messages) imported by the
real `ember import` in a process of its own: wall time, peak RSS, the longest time one transaction of
its merge held the write lock (what another process's write may wait), indexing throughput, memory
search latency after the import, and a re-import that must add nothing.

The export is generated here (fixed seed; sentences from a fixed vocabulary, a regenerated reply on every
fifth conversation as a second branch). The baseline, measured in the same run, is the embedder alone on
a sample of the same messages: what indexing would cost with no parsing, no log and no SQLite.
"""
from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from assistant.config import Settings
from benchmarks.everyday import _timed_process
from benchmarks.memory import TOPICS, WORDS, _latency

FULL = (2_000, 20)      # conversations, messages each: 40,000 messages
QUICK = (200, 20)       # 4,000 messages
# The large file: ~500 MB of the same export (1.36 million messages), read with --dry-run, which parses
# the whole file as an import does and writes nothing: its peak memory is the streaming parser's.
LARGE = (68_000, 20)
QUERIES = 100


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(TOPICS)} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24))) + "."


def write_export(path: Path, conversations: int, per: int, seed: int = 11) -> dict[str, int]:
    """A ChatGPT-format `conversations.json`, written as a stream; returns what it holds."""
    rng = random.Random(seed)
    start = 1_700_000_000.0
    branches = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        for c in range(conversations):
            t = start + c * 3600
            mapping = {"root": {"id": "root", "message": None, "parent": None, "children": []}}
            parent = "root"
            for m in range(per):
                key = f"c{c}-m{m}"
                role = "user" if m % 2 == 0 else "assistant"
                mapping[key] = {"id": key, "parent": parent, "children": [], "message": {
                    "id": key, "author": {"role": role}, "create_time": t + m * 30,
                    "content": {"content_type": "text", "parts": [_sentence(rng)]},
                    "metadata": {"model_slug": "gpt-4o"} if role == "assistant" else {}}}
                mapping[parent]["children"].append(key)
                parent = key
            if c % 5 == 0 and per >= 2:   # a regenerated reply nobody kept: another branch
                alt = f"c{c}-alt"
                mapping[alt] = {"id": alt, "parent": f"c{c}-m0", "children": [], "message": {
                    "id": alt, "author": {"role": "assistant"}, "create_time": t + 31,
                    "content": {"content_type": "text", "parts": [_sentence(rng)]}, "metadata": {}}}
                mapping[f"c{c}-m0"]["children"].append(alt)
                branches += 1
            conv = {"id": f"conv-{c}", "title": f"Synthetic {c}", "create_time": t, "update_time": t + per * 30,
                    "current_node": parent, "mapping": mapping}
            f.write(("," if c else "") + json.dumps(conv))
        f.write("]")
    return {"conversations": conversations, "messages": conversations * per, "other_branches": branches,
            "bytes": path.stat().st_size}


def _baseline(settings: Settings, texts: list[str]) -> dict[str, Any]:
    from assistant.embedder import Embedder

    embedder = Embedder(settings.cache_dir, threads=settings.threads)
    embedder.encode(texts[:8])     # load
    started = time.perf_counter()
    for i in range(0, len(texts), 256):
        embedder.encode(texts[i:i + 256])
    seconds = time.perf_counter() - started
    return {"texts": len(texts), "seconds": round(seconds, 2), "per_second": round(len(texts) / seconds, 1)}


def _search_latency(home: Path, settings: Settings) -> dict[str, Any]:
    from assistant.embedder import Embedder
    from assistant.retrieval import Retriever
    from storage.db import open_db

    db = open_db(home)
    retriever = Retriever(db, Embedder(settings.cache_dir, threads=settings.threads))
    retriever.search("warm up the model", 5)
    found = _latency(retriever, random.Random(5), k=5, queries=QUERIES)
    db.close()
    return found


def run(settings: Settings, rounds: int = 1, quick: bool = False) -> dict[str, Any]:
    """Import the synthetic export into an empty data directory, search it, import it again."""
    conversations, per = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="ember-bench-import-") as tmp:
        tmp_path = Path(tmp)
        export = tmp_path / "conversations.json"
        holds = write_export(export, conversations, per)
        home = tmp_path / "home"
        env = dict(os.environ, EMBER_HOME=str(home), EMBER_THREADS=str(settings.threads))
        env.pop("EMBER_DEBUG", None)
        command = [sys.executable, "-m", "assistant", "import", str(export), "--json"]
        first = _timed_process(command, env)
        imported = json.loads(first.pop("output"))
        again = _timed_process(command, env)
        repeated = json.loads(again.pop("output"))
        search = _search_latency(home, settings)
        rng = random.Random(3)
        baseline = _baseline(settings, [_sentence(rng) for _ in range(min(2_000, holds["messages"]))])
        large = None if quick else _large_file(tmp_path, env)
    return {
        "quick": quick, "export": holds,
        "import": {"seconds": round(first["seconds"], 1), "peak_rss_mb": round(first["peak_rss_mb"], 1),
                   "conversations": imported["conversations"], "messages": imported["messages"],
                   "skipped": imported["skipped"], "indexed": imported["indexed"],
                   "write_lock": imported["write_lock"],
                   "messages_per_second": round(holds["messages"] / first["seconds"], 1)},
        "reimport": {"seconds": round(again["seconds"], 1), "peak_rss_mb": round(again["peak_rss_mb"], 1),
                     "conversations": repeated["conversations"], "messages": repeated["messages"],
                     "write_lock": repeated["write_lock"],
                     "added_nothing": repeated["conversations"]["added"] == 0 and repeated["messages"]["added"] == 0
                     and repeated["messages"]["updated"] == 0 and repeated["indexed"]["chunks"] == 0},
        "search_after_import": search,
        "baseline_embedder_alone": baseline,
        "large_file_dry_run": large,
    }


def _large_file(tmp_path: Path, env: dict[str, str]) -> dict[str, Any]:
    """`ember import --dry-run` of a ~500 MB export into a fresh data directory: time and peak RSS."""
    export = tmp_path / "large" / "conversations.json"
    export.parent.mkdir()
    holds = write_export(export, *LARGE)
    run = _timed_process([sys.executable, "-m", "assistant", "import", str(export), "--dry-run", "--json"],
                         dict(env, EMBER_HOME=str(tmp_path / "large" / "home")))
    counted = json.loads(run.pop("output"))
    export.unlink()
    return {"bytes": holds["bytes"], "messages": holds["messages"], "seconds": round(run["seconds"], 1),
            "peak_rss_mb": round(run["peak_rss_mb"], 1), "messages_counted": counted["messages"]["added"]}


def report(result: dict[str, Any]) -> str:
    """The result in a few lines."""
    e, i, r, s, b = (result[k] for k in ("export", "import", "reimport", "search_after_import",
                                         "baseline_embedder_alone"))
    return (f"export: {e['conversations']:,} conversations, {e['messages']:,} messages, {e['bytes'] / 1e6:.1f} MB\n"
            f"import: {i['seconds']} s ({i['messages_per_second']} messages/s), peak RSS {i['peak_rss_mb']} MB; "
            f"indexed {i['indexed']['chunks']:,} chunks at {i['indexed']['per_second']}/s "
            f"(embedder alone: {b['per_second']}/s)\n"
            f"merge: the write lock held at most {i['write_lock']['longest_ms']} ms by one of its "
            f"{i['write_lock']['transactions']} transactions\n"
            f"search after import: p50 {s['p50_ms']} ms, p95 {s['p95_ms']} ms\n"
            f"re-import: {r['seconds']} s, peak RSS {r['peak_rss_mb']} MB, "
            + ("added nothing" if r["added_nothing"] else "CHANGED SOMETHING")
            + ("" if not result.get("large_file_dry_run") else
               "\nlarge file ({bytes_mb:.0f} MB, {m:,} messages) --dry-run: {s} s, peak RSS {rss} MB".format(
                   bytes_mb=result["large_file_dry_run"]["bytes"] / 1e6, m=result["large_file_dry_run"]["messages"],
                   s=result["large_file_dry_run"]["seconds"], rss=result["large_file_dry_run"]["peak_rss_mb"])))
