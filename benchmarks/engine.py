"""Ember's engine against bare llama-cpp-python: same model, prompt and settings, in one run.

Decode speed is tokens after the first divided by the time after the first; time to first token
includes prompt evaluation (the KV cache is reset before every run so neither side reuses a prompt).
Runs alternate between the two sides so that machine noise hits both alike. Also measured: how soon
the chat app is ready to type in (imports plus first mount, the model loading in the background), and
the everyday path (benchmarks/everyday.py): whole `ember ask` processes on the default and base routes
against a bare llama-cpp-python script, the router's decision in a warm engine, and ten turns of one
conversation on every route.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

from assistant.config import Settings
from assistant.engine import Engine
from benchmarks import everyday

PROMPT = [{"role": "user", "content": "Write a detailed story about a lighthouse keeper during a storm."}]
MAX_TOKENS = 128
N_CTX = 2048


def _timed(stream: Iterator[str], count_tokens: Callable[[str], int]) -> dict[str, float]:
    started = time.perf_counter()
    first = None
    parts = []
    for piece in stream:
        if piece and first is None:
            first = time.perf_counter() - started
        parts.append(piece)
    total = time.perf_counter() - started
    tokens = count_tokens("".join(parts))
    return {"ttft_s": first, "total_s": total, "tokens": tokens,
            "decode_tps": (tokens - 1) / (total - first) if first is not None and tokens > 1 else None}


def _summary(runs: list[dict[str, float]]) -> dict[str, Any]:
    return {"ttft_s_median": statistics.median(r["ttft_s"] for r in runs),
            "decode_tps_median": statistics.median(r["decode_tps"] for r in runs),
            "tokens": runs[0]["tokens"], "runs": runs}


def startup_seconds(settings: Settings, repeats: int = 3) -> float:
    """Median time from a fresh interpreter to the chat's first paint with the prompt focused.

    Interpreter start-up itself (before the first line runs, ~20 ms) is not included.
    """
    code = (
        "import time; t0 = time.perf_counter()\n"
        "import asyncio, pathlib, sys\n"
        "from assistant.config import load_settings\n"
        "from assistant.tui.app import EmberApp\n"
        "async def main():\n"
        "    app = EmberApp(load_settings())\n"
        "    async with app.run_test(size=(100, 30)) as pilot:\n"
        "        while app.painted_at is None:\n"
        "            await pilot.pause(0.01)\n"
        "        assert app.focused is not None\n"
        "        print(app.painted_at - t0)\n"
        "        app.engine_ready.wait()\n"
        "asyncio.run(main())\n")
    env = {"EMBER_HOME": str(settings.home), "PATH": "/usr/bin:/bin"}
    times = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                             check=True)
        times.append(float(out.stdout.strip().splitlines()[0]))
    return statistics.median(times)


def run(settings: Settings, rounds: int = 5, quick: bool = False) -> dict[str, Any]:
    """Measure both sides and return the result document."""
    import llama_cpp

    path = settings.model_path
    threads = settings.threads
    ember = Engine(path, n_ctx=N_CTX, n_threads=threads, seed=0)
    bare = llama_cpp.Llama(model_path=str(path), n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads,
                           seed=0, verbose=False)

    def count(text: str) -> int:
        return len(bare.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def ember_run() -> dict[str, float]:
        ember.llm.reset()
        return _timed(iter(ember.generate(PROMPT, max_tokens=MAX_TOKENS, temperature=0.0, seed=0)), count)

    def bare_run() -> dict[str, float]:
        bare.reset()
        chunks = bare.create_chat_completion(PROMPT, max_tokens=MAX_TOKENS, temperature=0.0, seed=0,
                                             stream=True)
        return _timed((c["choices"][0]["delta"].get("content") or "" for c in chunks), count)

    ember_run(), bare_run()   # warm up both (page cache, thread pools)
    ember_runs, bare_runs = [], []
    for i in range(rounds):
        order = (ember_run, bare_run) if i % 2 == 0 else (bare_run, ember_run)
        for fn in order:
            (ember_runs if fn is ember_run else bare_runs).append(fn())
    ember_sum, bare_sum = _summary(ember_runs), _summary(bare_runs)
    decode_ratio = ember_sum["decode_tps_median"] / bare_sum["decode_tps_median"]
    ttft_ratio = bare_sum["ttft_s_median"] / ember_sum["ttft_s_median"]
    return {
        "model": path.name, "threads": threads, "n_ctx": N_CTX, "max_tokens": MAX_TOKENS,
        "prompt": PROMPT[0]["content"], "rounds": rounds, "same_output": ember_sum["tokens"] == bare_sum["tokens"],
        "ember": ember_sum, "bare_llama_cpp": bare_sum,
        "ratio": {"decode_speed": round(decode_ratio, 3), "ttft_speed": round(ttft_ratio, 3)},
        "target": {"ratio_at_least": 0.95, "met": decode_ratio >= 0.95 and ttft_ratio >= 0.95},
        "chat_ready_to_type_s": round(startup_seconds(settings), 3),
        "everyday": everyday.run(settings, rounds, ember, chunks=500 if quick else everyday.CHUNKS,
                                 typed_rounds=None if quick else max(rounds, everyday.TYPED_ROUNDS),
                                 whole_rounds=None if quick else max(rounds, everyday.WHOLE_ROUNDS)),
    }


def report(result: dict[str, Any]) -> str:
    """A few readable lines."""
    e, b = result["ember"], result["bare_llama_cpp"]
    return (f"decode   ember {e['decode_tps_median']:.1f} tok/s   bare {b['decode_tps_median']:.1f} tok/s   "
            f"ratio {result['ratio']['decode_speed']:.3f}\n"
            f"ttft     ember {e['ttft_s_median'] * 1000:.1f} ms   bare {b['ttft_s_median'] * 1000:.1f} ms   "
            f"ratio {result['ratio']['ttft_speed']:.3f}\n"
            f"target   ≥ {result['target']['ratio_at_least']} of bare: "
            f"{'met' if result['target']['met'] else 'NOT met'}\n"
            f"chat ready to type in {result['chat_ready_to_type_s'] * 1000:.0f} ms\n"
            + everyday.report(result["everyday"]))
