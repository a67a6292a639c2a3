"""What memory puts in front of the model, and what comes out, on MemoryBank, in one run.

Data: ../shared/data/memorybank (MIT) with the gold answers and evidence turns of
benchmarks/data/memorybank_gold.jsonl (see benchmarks/recall.py), plus EVERYDAY: requests that need no
memory at all. Each user's turns are imported into their own memory, as `ember bench recall` does.

- **Echo**: every answerable question is answered on the rag route (greedy, MAX_TOKENS) once per memory
  style of `assistant.retrieval.MEMORY_STYLES`; a reply echoes when it matches that style's framing
  (`MEMORY_ECHO`) or anything header-like (`assistant.evidence._HEADER`), measured on the raw model text,
  before Ember's filter.
- **Answers**: token F1 and exact match against the gold answer (SQuAD's normalisation), of the raw
  reply and of what Ember shows (the default style, markup filtered, the evidence sentence put first
  for a direct recall question whose answer does not carry it).
- **Memory gate**: the router's decision for every answerable question and every everyday request.
  Precision is the share of answers given memories whose cited evidence (`evidence_for`) includes a
  gold evidence turn; the share of everyday requests given no memory at all must be 1. Compared, on the
  same features, with the previous gate, whose query typing made any request naming a time
  ("… tonight?") temporal, with memory from a similarity of 0.30 (`_query_type_v1`).
"""
from __future__ import annotations

import collections
import datetime as dt
import json
import re
import statistics
import string
import tempfile
import time
from pathlib import Path
from typing import Any

from assistant.config import Settings
from benchmarks.recall import DATA, GOLD, turns

MAX_TOKENS = 48
EVERYDAY = [
    "What should I cook for dinner tonight?", "Explain how a rainbow forms.", "Write a haiku about autumn.",
    "How do I boil an egg?", "What is the capital of France?", "Give me three tips for sleeping better.",
    "Translate 'good morning' into Spanish.", "What's a good name for a goldfish?",
    "How many minutes are in a day?", "Suggest a stretch for a stiff neck.", "What should I wear today?",
    "Tell me a joke about cats.", "How do I make cold brew coffee?", "What is photosynthesis?",
    "Plan a 20-minute workout for tonight.", "Write a two-line birthday message for a colleague.",
    "Why is the sky blue?", "How do I remove a coffee stain?", "What rhymes with orange?",
    "Summarise the plot of Romeo and Juliet in one sentence.",
]


def _normalise(text: str) -> list[str]:
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return [w for w in text.split() if w not in ("a", "an", "the")]


def f1(prediction: str, gold: str) -> float:
    """SQuAD token F1."""
    p, g = _normalise(prediction), _normalise(gold)
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if not common:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def exact(prediction: str, gold: str) -> float:
    return float(_normalise(prediction) == _normalise(gold))


def _query_type_v1(question: str, now: dt.date) -> str:
    """The router's query typing before the memory-trust work: a named time made any request temporal."""
    from assistant import router

    if router.time_window(question, now) or router._WHEN.search(question):
        return "temporal"
    return router.query_type(question, now)


def _routes(decision: Any, question: str, now: dt.date, db: Any) -> tuple[bool, bool]:
    """Whether the decision gives memory, under today's gate and the previous one (same features)."""
    import dataclasses

    from assistant import router

    thresholds, _ = router.thresholds_in_use(db)
    old = dataclasses.replace(decision.features, query_type=_query_type_v1(question, now))
    return decision.route in ("rag", "both"), router.choose(old, thresholds, adapter=False)[0] in ("rag", "both")


def _shown(raw: str, question: str, hits: list[Any]) -> str:
    from assistant import evidence

    cited = evidence.evidence_for(hits, question, "")
    stream = evidence.Shown(question, cited[0] if cited else None, markup=True)
    return stream.feed(raw) + stream.flush()


def run(settings: Settings, rounds: int = 1, quick: bool = False) -> dict[str, Any]:
    """Echo per style, answer F1/EM with and without the evidence first, and the memory gate."""
    from assistant import evidence, router
    from assistant.conversation import Question, prompt_messages
    from assistant.embedder import Embedder
    from assistant.engine import Engine
    from assistant.retrieval import MEMORY_ECHO, MEMORY_STYLE, MEMORY_STYLES, Retriever, fit_memories, memory_message
    from storage import memory
    from storage.db import open_db

    users = json.loads((DATA / "memory_bank_en.json").read_text(encoding="utf-8"))
    gold = [json.loads(line) for line in GOLD.read_text(encoding="utf-8").splitlines() if line.strip()]
    gold = [g for g in gold if g["answerable"] and g["evidence"]]
    if quick:
        gold = gold[::5]
    engine = Engine(settings.model_path, n_ctx=2048, n_threads=settings.threads, seed=0, cache_dir=settings.cache_dir)
    embedder = Embedder(settings.cache_dir, threads=settings.threads)
    echo = {style: [] for style in MEMORY_STYLES}
    header = {style: [] for style in MEMORY_STYLES}
    answers = {style: {"raw": {"f1": [], "em": []}, "shown": {"f1": [], "em": []}} for style in MEMORY_STYLES}
    prefixed = dict.fromkeys(MEMORY_STYLES, 0)
    gate: dict[str, list[float]] = {"precision": [], "precision_previous_gate": [], "everyday_no_memory": [],
                                    "everyday_no_memory_previous_gate": [], "facts_given_memory": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, user in users.items():
            questions = [g for g in gold if g["user"] == name.strip()]
            if not questions:
                continue
            db = open_db(Path(tmp) / name)
            memory.upsert_records(db, turns(user))
            retriever = Retriever(db, embedder)
            retriever.refresh()
            for q in questions:
                now = dt.date.fromisoformat(q["now"])
                hits = fit_memories(retriever.search(q["question"], settings.memory_k, now=now),
                                    engine.count_tokens, 900)
                for style in MEMORY_STYLES:
                    messages = [memory_message(hits, style), {"role": "user", "content": q["question"]}]
                    raw = "".join(engine.generate(messages, max_tokens=MAX_TOKENS, temperature=0.0, seed=0))
                    echo[style].append(bool(MEMORY_ECHO[style].search(raw)))
                    header[style].append(bool(evidence._HEADER.search(raw)))
                    shown = _shown(raw, q["question"], hits)
                    prefixed[style] += shown != raw and shown.startswith("From your notes")
                    for kind, text in (("raw", raw), ("shown", shown)):
                        answers[style][kind]["f1"].append(f1(text, q["answer"]))
                        answers[style][kind]["em"].append(exact(text, q["answer"]))
                decision = router.decide(q["question"], engine=engine, retriever=retriever, db=db, system=None,
                                         k=settings.memory_k, now=now)
                uses_memory, used_before = _routes(decision, q["question"], now, db)
                gate["facts_given_memory"].append(float(uses_memory))
                cited = {e.memory_id for e in evidence.evidence_for(decision.hits, q["question"], "")}
                for key, used in (("precision", uses_memory), ("precision_previous_gate", used_before)):
                    if used:
                        gate[key].append(float(bool(cited & set(q["evidence"]))))
            for request in EVERYDAY if name == next(iter(users)) or not quick else []:
                decision = router.decide(request, engine=engine, retriever=retriever, db=db, system=None,
                                         k=settings.memory_k, now=dt.date(2023, 5, 10))
                uses_memory, used_before = _routes(decision, request, dt.date(2023, 5, 10), db)
                gate["everyday_no_memory"].append(float(not (uses_memory and decision.hits)))
                gate["everyday_no_memory_previous_gate"].append(float(not (used_before and decision.hits)))
            db.close()
    engine.close()
    mean = lambda values: round(statistics.mean(values), 4) if values else None   # noqa: E731
    return {
        "questions": len(gold), "everyday_requests": len(gate["everyday_no_memory"]),
        "max_tokens": MAX_TOKENS, "default_style": MEMORY_STYLE, "seconds": round(time.perf_counter() - started, 1),
        "echo": {style: {"framing_echo_rate": mean(echo[style]), "header_like_rate": mean(header[style])}
                 for style in MEMORY_STYLES},
        "answers": {style: {kind: {"f1": mean(v["f1"]), "exact_match": mean(v["em"])} for kind, v in rows.items()}
                    | {"evidence_put_first": prefixed[style]} for style, rows in answers.items()},
        "memory_gate": {key: mean(values) for key, values in gate.items()}
        | {"answers_with_memory": len(gate["precision"])},
    }


def report(result: dict[str, Any]) -> str:
    lines = [f"{result['questions']} MemoryBank questions, {result['everyday_requests']} everyday requests "
             f"({result['seconds']} s)",
             "memory style        framing echo  header-like  F1 model  F1 shown  EM model  EM shown  put first"]
    for style, row in result["echo"].items():
        a = result["answers"][style]
        mark = " (default)" if style == result["default_style"] else ""
        lines.append(f"{style + mark:20}{row['framing_echo_rate']:>12.3f}{row['header_like_rate']:>13.3f}"
                     f"{a['raw']['f1']:>10.3f}{a['shown']['f1']:>10.3f}{a['raw']['exact_match']:>10.3f}"
                     f"{a['shown']['exact_match']:>10.3f}{a['evidence_put_first']:>11}")
    g = result["memory_gate"]
    lines.append(f"memory precision {g['precision']} (previous gate {g['precision_previous_gate']}) over "
                 f"{g['answers_with_memory']} answers with memory; everyday requests kept off memory "
                 f"{g['everyday_no_memory']} (previous gate {g['everyday_no_memory_previous_gate']})")
    return "\n".join(lines)
