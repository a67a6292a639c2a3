"""The everyday path, measured as a user meets it: whole `ember ask` processes against a bare
llama-cpp-python script, the router's decision in a warm engine, and a conversation turn after turn.

Part of `ember bench engine` (benchmarks/engine.py). The user's home holds 10,000 memory chunks
(benchmarks.memory's synthetic notes, embedded for real) and no adapter unless a run adds one.
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

CHUNKS = 10_000
STORY = "Write a detailed story about a lighthouse keeper during a storm."
MAX_TOKENS = 128
# Conversations per route for the chat's 10-turn target. Its turns take 60-100 ms, and one turn's
# median over 3 conversations moved by 20-30 ms from run to run (2026-11-30: auto's turn 2 at 56 and
# 61 ms where turns 3-9 took 77-88), which decides a ratio of two such turns; a median of 5 is less at
# the mercy of one or two conversations caught by other work on the machine.
TYPED_ROUNDS = 5
# Whole processes, as the issue measured them (median of 5 interleaved runs): a ~3 s process moves by
# 5-10% from run to run on this 2-core machine (2026-11-30 16:43: `--route base` 3.28-3.60 s, bare
# 2.81-3.05 s, and base, a subset of auto's work, came out slower than auto), so a median of 3 decides
# a 10% bound by chance.
WHOLE_ROUNDS = 5

# The baseline: what a user would write with llama-cpp-python alone, the same model, prompt and answer.
BARE = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), n_threads=int(sys.argv[3]),
                      n_threads_batch=int(sys.argv[3]), seed=0, verbose=False)
for chunk in llm.create_chat_completion([{"role": "user", "content": sys.argv[4]}], max_tokens=int(sys.argv[5]),
                                        temperature=0.0, seed=0, stream=True):
    sys.stdout.write(chunk["choices"][0]["delta"].get("content") or "")
    sys.stdout.flush()
"""


def populate(home: Path, settings: Settings, chunks: int = CHUNKS) -> None:
    """A user's home with `chunks` memory notes, every one embedded."""
    from assistant.embedder import Embedder
    from assistant.retrieval import embed_pending
    from benchmarks.memory import _records, sentences
    from storage import memory
    from storage.db import open_db

    db = open_db(home)
    memory.upsert_records(db, _records(sentences(chunks), 0))
    embed_pending(db, Embedder(settings.cache_dir, threads=settings.threads))
    db.close()


def _timed_process(args: list[str], env: dict[str, str]) -> dict[str, float]:
    """Wall time and peak RSS (MB) of one whole process, from spawn to exit.

    RSS is sampled every 5 ms: the kernel's own peak (`wait4`'s ru_maxrss) would include this
    benchmark's memory, which a forked child is charged for until it execs.
    """
    import threading

    import psutil

    started = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        watched = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                peak = max(peak, watched.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{args[2:4]} failed ({proc.returncode}): {err.decode(errors='replace')[-400:]}")
    return {"seconds": seconds, "peak_rss_mb": peak / 2 ** 20, "output": out.decode(errors="replace")}


def shell_env(home: Path, settings: Settings) -> dict[str, str]:
    """The environment of a user's shell for whole processes of `ember` and of the bare script.

    Without the OpenMP wait settings this process got from importing Ember (assistant/__init__.py):
    Ember sets them again for itself, and a bare script does not have them (alone on 2 cores, a bare
    decode ran 3.5x faster with GNU OpenMP's default spin than with the PASSIVE it used to inherit here)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "EMBER_DEBUG")}
    env.update(EMBER_HOME=str(home), EMBER_N_CTX=str(settings.n_ctx), EMBER_THREADS=str(settings.threads))
    return env


def whole_process(home: Path, settings: Settings, rounds: int) -> dict[str, Any]:
    """Median wall time and peak RSS of `ember ask` (auto and base) and the bare script, interleaved."""
    env = shell_env(home, settings)
    sides = {
        "bare": [sys.executable, "-c", BARE, str(settings.model_path), str(settings.n_ctx),
                 str(settings.threads), STORY, str(MAX_TOKENS)],
        # --no-log: every run is the user's first question on this memory (a logged story would share
        # words with the next run's and change what the router does).
        "auto": [sys.executable, "-m", "assistant", "ask", "--no-log", "--max-tokens", str(MAX_TOKENS),
                 "--temperature", "0", "--seed", "0", STORY],
        "base": [sys.executable, "-m", "assistant", "ask", "--no-log", "--route", "base", "--max-tokens",
                 str(MAX_TOKENS), "--temperature", "0", "--seed", "0", STORY],
    }
    # Ember's bytecode, as an installed package has it: with PYTHONDONTWRITEBYTECODE set (or a source
    # edited since), every `ember` process would compile its changed modules again (~50 ms), which
    # llama-cpp-python's, compiled when installed, never does.
    import compileall

    root = Path(__file__).resolve().parent.parent
    for package in ("assistant", "storage", "adapters"):
        compileall.compile_dir(root / package, quiet=1)
    for args in sides.values():     # warm the page cache and every one-time cache (exported embedder, self-check)
        _timed_process(args, env)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    for i in range(rounds):
        names = list(sides) if i % 2 == 0 else list(reversed(sides))
        for name in names:
            runs[name].append(_timed_process(sides[name], env))
    out: dict[str, Any] = {}
    for name, measured in runs.items():
        out[name] = {"seconds_median": round(statistics.median(r["seconds"] for r in measured), 3),
                     "peak_rss_mb_median": round(statistics.median(r["peak_rss_mb"] for r in measured), 1),
                     "seconds": [round(r["seconds"], 3) for r in measured]}
    out["same_answer"] = runs["auto"][0]["output"].strip() == runs["bare"][0]["output"].strip()
    bare = out["bare"]["seconds_median"]
    out["ratio"] = {"auto_vs_bare": round(out["auto"]["seconds_median"] / bare, 3),
                    "base_vs_bare": round(out["base"]["seconds_median"] / bare, 3),
                    "auto_rss_vs_base": round(out["auto"]["peak_rss_mb_median"] / out["base"]["peak_rss_mb_median"], 3)}
    out["target"] = {"auto_vs_bare_at_most": 1.25, "base_vs_bare_at_most": 1.10, "auto_rss_vs_base_at_most": 1.3}
    out["met"] = (out["ratio"]["auto_vs_bare"] <= 1.25 and out["ratio"]["base_vs_bare"] <= 1.10
                  and out["ratio"]["auto_rss_vs_base"] <= 1.3)
    return out


QUESTIONS = ["What did I say about the restaurant with my sister?", "When did I visit the museum?",
             "Write a short note to my neighbour about the garden.", "What is the capital of France?",
             "Do you remember my passport trip?", "Give me three tips for a marathon.",
             "How should I fix a broken bicycle?", "What did my cousin cook on Monday?",
             "Summarise my week in two lines.", "Which concert did I book in Oslo?"]


def router_decisions(home: Path, settings: Settings, engine: Any, *, adapter: Path | None,
                     repeats: int = 3, typed: bool = False, decided_ahead: bool = False) -> dict[str, Any]:
    """p50 and p95 of the router's decision in a warm engine (model loaded, memory open, one
    decision already made), over QUESTIONS × `repeats`.

    `typed`: as in the chat when the user sends a message while typing its last word: its complete words
    were read ahead (`router.read_ahead`, untimed here), so the decision evaluates that word and the
    chat template's tail. `decided_ahead`: as in the chat when the message was complete before Enter:
    the router decided for it while it was typed (`router.decide(ahead=True)`, untimed here), and the
    decision at send checks that nothing it depends on changed and reuses it. Without either (`ember
    ask`, `ember serve`), it evaluates the whole question.
    """
    from assistant import router
    from assistant.retrieval import retriever_for
    from storage.db import open_db

    db = open_db(home)
    engine.load_adapter(adapter, "bench-adapter" if adapter else None)
    retriever = retriever_for(settings, db)
    router.decide(QUESTIONS[0], engine=engine, retriever=retriever, db=db, system=None, k=settings.memory_k)
    times = []
    routes: dict[str, int] = {}
    reused = 0   # decisions made while typed and reused at send
    for _ in range(repeats):
        for question in QUESTIONS:
            if typed:
                router.read_ahead(question, engine=engine, db=db, system=None)
            if decided_ahead:
                router.decide(question, engine=engine, retriever=retriever, db=db, system=None,
                              k=settings.memory_k, ahead=True)
            started = time.perf_counter()
            decision = router.decide(question, engine=engine, retriever=retriever, db=db, system=None,
                                     k=settings.memory_k)
            times.append((time.perf_counter() - started) * 1000)
            routes[decision.route] = routes.get(decision.route, 0) + 1
            reused += decision.features.decided_ahead
    engine.load_adapter(None, None)
    db.close()
    times.sort()
    return {"p50_ms": round(statistics.median(times), 1), "p95_ms": round(times[int(0.95 * len(times)) - 1], 1),
            "decisions": len(times), "routes": routes, "decided_ahead": reused}


TURNS = ["Tell me about lighthouses in about a hundred words.", "Why were they built on rocks?",
         "Who kept them running?", "What did a keeper eat?", "How did they get fresh water?",
         "What happened in big storms?", "Were keepers lonely?", "When were they automated?",
         "Which one is the most famous?", "Summarise what we said in one line."]


def multi_turn(home: Path, settings: Settings, engine: Any, route: str, *, adapter: Path | None,
               rounds: int = 1, typed: bool = False) -> dict[str, Any]:
    """Ten turns of one conversation on `route`, `rounds` times (a new conversation each): the median
    time to first token and the prompt size per turn, and how many memories repeated a message
    already in the prompt. Each round's conversation is deleted after it. One turn is a few hundred
    ms, so a single run is at the mercy of whatever else the machine does; the per-turn median over
    rounds is what the target is checked on.

    `typed`: as in the chat, which reads each message while it is typed (`conversation.read_ahead`,
    untimed here: the reply's end as soon as it is written, then each complete word), so sending it
    evaluates its last word and the template's tail. Without, as `ember ask` and `ember serve`: the
    whole new turn is evaluated after it is sent.
    """
    import dataclasses

    from assistant.conversation import read_ahead, respond
    from assistant.retrieval import retriever_for
    from storage import conversations as convs
    from storage.db import open_db

    db = open_db(home)
    engine.load_adapter(adapter, "bench-adapter" if adapter else None)
    turn_settings = dataclasses.replace(settings, max_tokens=100, temperature=0.0, seed=0)
    retriever = retriever_for(settings, db)
    runs: list[list[float]] = []
    prompt_tokens: list[int] = []
    repeated = 0
    for _ in range(max(1, rounds)):
        engine.llm.reset()
        conversation_id = None
        ttft: list[float] = []
        prompt_tokens = []
        for text in TURNS:
            if typed:
                for end in [0, *(i + 1 for i, ch in enumerate(text) if ch == " "), len(text)]:
                    read_ahead(db, engine, turn_settings, text[:end], conversation_id=conversation_id,
                               route=route, retriever=retriever)
            exchange = respond(db, engine, turn_settings, text, conversation_id=conversation_id, route=route,
                               retriever=retriever)
            conversation_id = exchange.conversation_id
            in_prompt = {m["id"] for m in convs.messages(db, conversation_id)}
            repeated += sum(hit.message_id in in_prompt for hit in exchange.memories)
            ttft.append(exchange.first_token_seconds or exchange.seconds)
            prompt_tokens.append(exchange.prompt_tokens)
        runs.append(ttft)
        convs.delete_conversation(db, conversation_id)   # every round and route starts from the same memory
    engine.load_adapter(None, None)
    db.close()
    median = [statistics.median(run[turn] for run in runs) for turn in range(len(TURNS))]
    return {"ttft_s": [round(t, 3) for t in median], "rounds": len(runs), "prompt_tokens": prompt_tokens,
            "turn10_vs_turn2": round(median[9] / median[1], 2), "repeated_memories": repeated,
            "met": median[9] <= 1.5 * median[1] and repeated == 0}


def run(settings: Settings, rounds: int, engine: Any, *, chunks: int = CHUNKS,
        typed_rounds: int | None = None, whole_rounds: int | None = None) -> dict[str, Any]:
    """Every everyday-path measurement, in one home built for the run with `chunks` memory notes;
    the chat's 10 turns over `typed_rounds` conversations per route and `whole_rounds` interleaved runs
    of each whole process (None: `rounds`)."""
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        started = time.perf_counter()
        populate(home, settings, chunks)
        built = time.perf_counter() - started
        adapter = random_adapter(Path(tmp) / "bench-adapter.gguf", settings.model_path, settings.cache_dir)
        result: dict[str, Any] = {"memory_chunks": chunks, "home_built_s": round(built, 1)}
        result["whole_process"] = whole_process(home, settings, whole_rounds or rounds)
        result["router_decision"] = {
            "no_adapter": router_decisions(home, settings, engine, adapter=None),
            "with_adapter": router_decisions(home, settings, engine, adapter=adapter),
            "with_adapter_typed": router_decisions(home, settings, engine, adapter=adapter, typed=True),
            "with_adapter_decided_ahead": router_decisions(home, settings, engine, adapter=adapter,
                                                           decided_ahead=True)}
        rd = result["router_decision"]
        # The target is the running chat's, where messages are read while typed: with_adapter_typed, when
        # Enter comes with the last word, is the one checked; with_adapter_decided_ahead, when the message
        # was complete before Enter, is reported beside it.
        # with_adapter is `ember ask`'s and the server's decision, reported beside it.
        rd["target"] = {"no_adapter_p50_ms_at_most": 30, "with_adapter_typed_p50_ms_at_most": 150}
        rd["met"] = rd["no_adapter"]["p50_ms"] <= 30 and rd["with_adapter_typed"]["p50_ms"] <= 150
        # The target is the chat's (multi_turn_typed), where each message is read while typed; multi_turn
        # is `ember ask`'s and the server's, each turn evaluated whole once sent, reported beside it.
        for key, typed in (("multi_turn", False), ("multi_turn_typed", True)):
            result[key] = {route: multi_turn(home, settings, engine, route, typed=typed,
                                             rounds=typed_rounds or rounds if typed else rounds,
                                             adapter=adapter if route in ("adapter", "both", "auto") else None)
                           for route in ("base", "rag", "adapter", "both", "auto")}
    return result


def random_adapter(path: Path, model_path: Path, cache_dir: Path | None, *, seed: int = 0) -> Path:
    """A small random LoRA adapter for the bundled SmolLM2-135M: r=2 on the last layer's q_proj and
    v_proj (the router probes it here; the tests use it too)."""
    import numpy as np

    from adapters.base import file_sha256
    from adapters.export import write_lora_gguf

    rng = np.random.default_rng(seed)
    hidden, kv_out, rank = 576, 192, 2   # 9 heads of 64; 3 key/value heads
    weights = {"model.layers.29.self_attn.q_proj": (rng.standard_normal((rank, hidden)) / hidden ** 0.5,
                                                    rng.standard_normal((hidden, rank)) * 0.05),
               "model.layers.29.self_attn.v_proj": (rng.standard_normal((rank, hidden)) / hidden ** 0.5,
                                                    rng.standard_normal((kv_out, rank)) * 0.05)}
    return write_lora_gguf(path, weights, alpha=rank, n_head=9, n_head_kv=3,
                           base_sha256=file_sha256(model_path, cache_dir), base_name=model_path.name)


def report(result: dict[str, Any]) -> str:
    """A few readable lines."""
    wp, rd = result["whole_process"], result["router_decision"]
    lines = [f"whole process ({result['memory_chunks']} memory chunks): auto {wp['auto']['seconds_median']:.2f} s, "
             f"base {wp['base']['seconds_median']:.2f} s, bare {wp['bare']['seconds_median']:.2f} s "
             f"(auto {wp['ratio']['auto_vs_bare']:.2f}x ≤ 1.25, base {wp['ratio']['base_vs_bare']:.2f}x ≤ 1.10); "
             f"peak RSS auto {wp['auto']['peak_rss_mb_median']:.0f} MB vs base {wp['base']['peak_rss_mb_median']:.0f} MB "
             f"({wp['ratio']['auto_rss_vs_base']:.2f}x ≤ 1.3)",
             f"router decision warm: p50 {rd['no_adapter']['p50_ms']:.1f} ms (≤ 30) without adapter, "
             f"{rd['with_adapter_typed']['p50_ms']:.1f} ms (≤ 150) with one in the chat (read while typed), "
             f"{rd['with_adapter_decided_ahead']['p50_ms']:.1f} ms when decided while typed, "
             f"{rd['with_adapter']['p50_ms']:.1f} ms when the whole question is read at once (ember ask)"]
    for key, how in (("multi_turn_typed", "typed, as in the chat"), ("multi_turn", "sent whole, as ember ask")):
        for route, turns in result.get(key, {}).items():
            lines.append(f"10 turns on {route:7} ({how}): ttft turn 2 {turns['ttft_s'][1] * 1000:.0f} ms, turn 10 "
                         f"{turns['ttft_s'][9] * 1000:.0f} ms ({turns['turn10_vs_turn2']:.2f}x ≤ 1.5), "
                         f"repeated memories {turns['repeated_memories']}")
    return "\n".join(lines)


if __name__ == "__main__":   # pragma: no cover - a quick look without the rest of `ember bench engine`
    from assistant.config import load_settings
    from assistant.engine import Engine

    s = load_settings({})
    e = Engine(s.model_path, n_ctx=s.n_ctx, n_threads=s.threads, seed=0, cache_dir=s.cache_dir)
    print(json.dumps(run(s, 3, e), indent=1))
