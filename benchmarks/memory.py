"""Memory at scale: ingest throughput and hybrid search latency at 10k and 100k chunks.

The text is synthetic (sentences drawn from a fixed vocabulary with a fixed seed); every chunk is
embedded for real by all-MiniLM-L6-v2, so the vector index holds real vectors. Latency is measured
end to end through `Retriever.search` (embedding the question, BM25, the sqlite-vec scan with exact
re-scoring, fusion), after the one-time model load.
"""
from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from assistant.config import Settings
from assistant.embedder import Embedder
from assistant.retrieval import Retriever, embed_pending
from storage import memory
from storage.db import open_db

SIZES = (10_000, 100_000)
QUERIES = 200
TOPICS = ("birthday", "restaurant", "train", "doctor", "garden", "guitar", "passport", "recipe",
          "marathon", "museum", "dentist", "laptop", "holiday", "library", "concert", "bicycle")
WORDS = ("the my a we our on at to with for after before during near about every new old favourite "
         "sister brother mother friend colleague neighbour cousin teacher booked visited ordered "
         "bought fixed planned remembered forgot liked hated tried cooked painted played read "
         "Monday Tuesday weekend morning evening spring summer autumn winter Lisbon Paris Kyoto Oslo "
         "Rome Berlin blue green small quiet busy early late cheap expensive delicious broken").split()


def sentences(n: int, seed: int = 7) -> list[str]:
    """`n` distinct, plausible-looking notes."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24)))
        out.append(f"Note {i}: {rng.choice(TOPICS)} {body} {rng.choice(TOPICS)}.")
    return out


def _records(texts: list[str], start: int) -> list[dict[str, str]]:
    base = time.mktime((2025, 1, 1, 0, 0, 0, 0, 0, -1))
    return [{"id": f"n{start + i}", "text": t,
             "time": time.strftime("%Y-%m-%d", time.gmtime(base + (start + i) * 300))}
            for i, t in enumerate(texts)]


def _latency(retriever: Retriever, rng: random.Random, k: int = 10, queries: int = QUERIES) -> dict[str, float]:
    """Search latency (ms) over `queries` questions about random topics, `k` hits each."""
    times = []
    for _ in range(queries):
        question = f"what did I say about the {rng.choice(TOPICS)} with my {rng.choice(WORDS)}?"
        started = time.perf_counter()
        retriever.search(question, k)
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {"p50_ms": round(statistics.median(times), 2), "p95_ms": round(times[int(0.95 * len(times)) - 1], 2),
            "max_ms": round(times[-1], 2), "queries": queries}


def run(settings: Settings, rounds: int = 1) -> dict[str, Any]:
    embedder = Embedder(settings.cache_dir, threads=settings.threads)
    texts = sentences(max(SIZES))
    rng = random.Random(11)
    result: dict[str, Any] = {"sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        db = open_db(Path(tmp))
        retriever = Retriever(db, embedder)
        stored = 0
        store_s = embed_s = 0.0
        for size in SIZES:
            batch = _records(texts[stored:size], stored)
            started = time.perf_counter()
            memory.upsert_records(db, batch)
            store_s += time.perf_counter() - started
            started = time.perf_counter()
            embed_pending(db, embedder)
            embed_s += time.perf_counter() - started
            stored = size
            result["sizes"][str(size)] = {
                "ingest_chunks_per_s": round(size / (store_s + embed_s), 1),
                "store_only_chunks_per_s": round(size / store_s, 1),
                "search": _latency(retriever, rng),
            }
        db.close()
    worst = result["sizes"][str(max(SIZES))]["search"]["p95_ms"]
    result["target"] = {"p95_ms_at_100k_below": 50, "met": worst < 50}
    return result


def report(result: dict[str, Any]) -> str:
    lines = []
    for size, row in result["sizes"].items():
        s = row["search"]
        lines.append(f"{int(size):>7} chunks: ingest {row['ingest_chunks_per_s']:.0f} chunks/s "
                     f"(store alone {row['store_only_chunks_per_s']:.0f}/s); search p50 {s['p50_ms']:.1f} ms, "
                     f"p95 {s['p95_ms']:.1f} ms")
    lines.append(f"target p95 < 50 ms at 100k: {'met' if result['target']['met'] else 'NOT met'}")
    return "\n".join(lines)
