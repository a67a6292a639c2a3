"""The embedder: onnxruntime (what Ember runs) against sentence-transformers on torch (what it ran before).

Each measurement is a fresh process, the two backends interleaved round by round: import time, model
load, one question's latency (p50/p95 over 100 questions, the request path), bulk throughput on 1,000
short notes and on 200 long texts cut at 256 tokens (`ember memory import`, the daemon), the process's
peak RSS, and the largest cosine distance between the two backends' vectors.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from assistant.config import Settings
from benchmarks.memory import sentences

BACKENDS = ("onnxruntime", "sentence-transformers")
QUESTIONS = 100


def _texts() -> tuple[list[str], list[str], list[str]]:
    notes = sentences(1000, seed=11)
    long = [" ".join(sentences(14, seed=1000 + i)) for i in range(200)]    # ~300+ tokens each
    questions = [f"what did I say about the {n.split()[2]} last week?" for n in sentences(QUESTIONS, seed=5)]
    return questions, notes, long


def _child(backend: str, cache: str, threads: int, vectors_out: str) -> dict[str, Any]:
    """One process's measurements (runs in the child)."""
    import resource

    import numpy as np

    questions, notes, long = _texts()
    started = time.perf_counter()
    if backend == "onnxruntime":
        import onnxruntime  # noqa: F401
        import tokenizers  # noqa: F401

        from assistant.embedder import Embedder, ensure_export
        path = ensure_export(Path(cache))
        imported = time.perf_counter()
        model = Embedder.from_export(path, threads=threads)
        query, bulk = model.encode_query, model.encode
    else:
        import torch
        from sentence_transformers import SentenceTransformer

        from assistant.embedder import model_dir
        imported = time.perf_counter()
        st = SentenceTransformer(str(model_dir(Path(cache))), device="cpu")
        torch.set_num_threads(threads)

        def bulk(texts):
            return st.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                             show_progress_bar=False)

        def query(text):   # what Embedder.encode_query did: one thread for one question
            torch.set_num_threads(1)
            try:
                return bulk([text])[0]
            finally:
                torch.set_num_threads(threads)
    loaded = time.perf_counter()
    query("warm-up question")
    latencies = []
    for question in questions:
        t = time.perf_counter()
        query(question)
        latencies.append((time.perf_counter() - t) * 1000)
    latencies.sort()
    t = time.perf_counter()
    short_vectors = bulk(notes)
    short_seconds = time.perf_counter() - t
    t = time.perf_counter()
    long_vectors = bulk(long)
    long_seconds = time.perf_counter() - t
    np.save(vectors_out, np.concatenate([short_vectors, long_vectors]).astype(np.float32))
    return {"import_s": round(imported - started, 3), "load_s": round(loaded - imported, 3),
            "query_p50_ms": round(statistics.median(latencies), 2),
            "query_p95_ms": round(latencies[int(0.95 * len(latencies)) - 1], 2),
            "short_texts_per_s": round(len(notes) / short_seconds, 1),
            "long_texts_per_s": round(len(long) / long_seconds, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def run(settings: Settings, rounds: int = 3) -> dict[str, Any]:
    """Interleaved rounds of both backends, each in a fresh process; medians."""
    import numpy as np

    from assistant.embedder import ensure_export

    threads = settings.threads
    samples: dict[str, list[dict[str, Any]]] = {b: [] for b in BACKENDS}
    distance = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        ensure_export(settings.cache_dir)     # the one-time export is set-up's, not a measurement
        for _ in range(rounds):
            vectors = {}
            for backend in BACKENDS:
                out = Path(tmp) / f"{backend}.npy"
                code = ("import json, sys; from benchmarks.embedder import _child; "
                        "print(json.dumps(_child(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])))")
                child = subprocess.run([sys.executable, "-c", code, backend, str(settings.cache_dir),
                                        str(threads), str(out)], capture_output=True, text=True, check=True)
                samples[backend].append(json.loads(child.stdout.strip().splitlines()[-1]))
                vectors[backend] = np.load(out)
            a, b = vectors.values()
            distance = max(distance, float((1 - (a * b).sum(1)).max()))
    result = {b: {k: statistics.median(s[k] for s in samples[b]) for k in samples[b][0]} for b in BACKENDS}
    return {"threads": threads, "rounds": rounds, "load_average": [round(x, 2) for x in os.getloadavg()], "questions": QUESTIONS, "short_texts": 1000, "long_texts": 200,
            "backends": result, "samples": samples, "max_cosine_distance": distance}


def report(result: dict[str, Any]) -> str:
    """A table for people."""
    rows = [f"{'':22}" + "".join(f"{b:>24}" for b in BACKENDS)]
    for key in result["backends"][BACKENDS[0]]:
        rows.append(f"{key:22}" + "".join(f"{result['backends'][b][key]:>24}" for b in BACKENDS))
    rows.append(f"largest cosine distance between them: {result['max_cosine_distance']:.2e}")
    return "\n".join(rows)
