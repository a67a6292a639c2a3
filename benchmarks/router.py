"""The router against every single route, on one personal-assistant task set, in one run.

The user (constructed for this benchmark): the synthetic user of `ember bench adapt` — 100 how-to
conversations whose replies they edited to open with their sign-off ("Ahoy, matey!") — whose adapter is
trained by Ember's own pipeline (LoRA, without DP so that 160 examples leave a measurable style), plus, in
memory, the dated chat history of one MemoryBank user at a time (../shared/data/memorybank, MIT; their
facts, imported as Ember imports notes).

Tasks, two categories:
- facts: MemoryBank's answerable probing questions, with the gold answers Ember's recall benchmark wrote
  (benchmarks/data/memorybank_gold.jsonl); quality = share of the gold answer's content words in the reply;
- style: how-to questions on tasks the user never asked about, and rephrased ones they did; quality = 1
  when the reply opens with the user's sign-off.

Items are split in half by a stable hash: the router's thresholds are fitted on one half exactly as the
daemon fits them on a user's log (`assistant.router.fit_thresholds`: each route scored by the
log-probability of the wanted answer), and every route, the router included, answers the other half
through `ember ask`'s own code path (greedy, 48 tokens). Latency: wall time per answer, and the router's
own decision time.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from assistant.config import Settings
from benchmarks.recall import DATA, GOLD, turns
from benchmarks.synthetic_user import HABIT, TIPS, habit_prompts, seed_habit_user, tasks

CONVERSATIONS = 100
ROUTES = ("base", "rag", "adapter", "both", "auto")
MAX_TOKENS = 48
ADAPT_STEPS = 60
STOP = set("a an the and or of to in on at for with is was were are be been it its this that i you my your "
           "me we he she they them his her their our what which who how when where did do does about from "
           "by as into than then there very".split())


@dataclasses.dataclass
class Task:
    category: str
    question: str
    answer: str             # the wanted answer (for fitting) / gold (for scoring)
    user: str | None = None   # the MemoryBank user whose memory it needs
    now: str | None = None

    @property
    def fit_half(self) -> bool:
        return hashlib.sha256(self.question.encode()).digest()[0] % 2 == 0


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOP and len(w) > 1}


def quality(task: Task, reply: str) -> float:
    """facts: share of the gold answer's content words in the reply; style: 1 if it opens with the sign-off."""
    if task.category == "style":
        return 1.0 if reply.strip().lower().startswith(HABIT.lower().split(",")[0]) else 0.0
    gold = _words(task.answer)
    return len(gold & _words(reply)) / len(gold) if gold else 0.0


def task_set() -> list[Task]:
    """Facts from MemoryBank's gold file, style tasks from the synthetic user's unused and used tasks."""
    out = []
    for line in GOLD.read_text(encoding="utf-8").splitlines():
        g = json.loads(line) if line.strip() else None
        if g and g["answerable"] and g["evidence"]:
            answer = re.sub(r"\s*\([^)]*\)", "", g["answer"]).strip()
            out.append(Task("facts", g["question"], answer, user=g["user"], now=g["now"]))
    unused = [t for t in tasks()[CONVERSATIONS:CONVERSATIONS + 20]]
    used = tasks()[:20]
    for i, task in enumerate(unused):
        out.append(Task("style", habit_prompts(skip=CONVERSATIONS + i, count=1)[0],
                        f"{HABIT} To {task}, {TIPS[i % len(TIPS)]}."))
    for i, task in enumerate(used):
        out.append(Task("style", f"Any tips to {task}?", f"{HABIT} To {task}, {TIPS[i % len(TIPS)]}."))
    return out


class _Memory:
    """One MemoryBank user's history in the bench user's memory at a time."""

    def __init__(self, db: Any, retriever: Any) -> None:
        self.db, self.retriever, self.user = db, retriever, None
        self.users = {name.strip(): user for name, user in
                      json.loads((DATA / "memory_bank_en.json").read_text(encoding="utf-8")).items()}

    def load(self, name: str | None) -> None:
        from storage import memory

        if name == self.user:
            return
        for chunk_id in memory.chunk_ids_from(self.db, "import"):
            memory.delete_chunk(self.db, chunk_id)
        if name is not None:
            memory.upsert_records(self.db, turns(self.users[name]))
            self.retriever.refresh()
        self.user = name


def _train_adapter(settings: Settings, db: Any) -> dict[str, Any]:
    from adapters import lora
    from adapters.pipeline import AdaptConfig, adapt

    config = AdaptConfig(model_path=settings.model_path, home=settings.home, cache=settings.cache_dir,
                         lora=dataclasses.replace(lora.LoraConfig(), epsilon=None, steps=ADAPT_STEPS,
                                                  threads=settings.threads),
                         threads=settings.threads)
    return adapt(db, config)


def run(settings: Settings, rounds: int = 1) -> dict[str, Any]:
    """Train the user's adapter, fit the router on half the tasks, answer the other half every way."""
    from adapters.gate import Evaluator
    from assistant import router
    from assistant.conversation import respond, sync_adapter
    from assistant.engine import Engine
    from assistant.retrieval import memory_message, retriever_for
    from storage import registry, routing
    from storage.db import open_db

    items = task_set()
    with tempfile.TemporaryDirectory(prefix="ember-bench-router-") as tmp:
        user = dataclasses.replace(settings, home=Path(tmp) / "home", cache=settings.cache_dir,
                                   max_tokens=MAX_TOKENS, temperature=0.0, seed=0)
        db = open_db(user.home)
        seed_habit_user(db, CONVERSATIONS)
        started = time.perf_counter()
        made = _train_adapter(user, db)
        adapt_seconds = time.perf_counter() - started
        if not made["promoted"]:
            raise RuntimeError(f"the bench user's adapter was not promoted: {made['eval']['reason']}")
        engine = Engine(user.model_path, n_ctx=user.n_ctx, n_threads=user.threads, seed=0, cache_dir=user.cache_dir)
        sync_adapter(db, engine)
        retriever = retriever_for(user, db)
        retriever.refresh()
        mem = _Memory(db, retriever)
        evaluator = Evaluator(user.model_path, n_ctx=2048, threads=user.threads, base_sha256=engine.sha256)
        adapter_path = registry.active(db)["path"]

        # Fit on one half, as the daemon does on a user's judged replies.
        fit_items = []
        for task in sorted((t for t in items if t.fit_half), key=lambda t: t.user or ""):
            mem.load(task.user)
            now = dt.date.fromisoformat(task.now) if task.now else None
            features, hits = router.features_for(task.question, engine=engine, retriever=retriever, db=db,
                                                 system=user.system_prompt, k=user.memory_k, now=now)
            scores = router.route_quality(evaluator, task.question, task.answer, hits, system=user.system_prompt,
                                          adapter_path=adapter_path,
                                          memory_prompt=lambda h: memory_message(h)["content"])
            fit_items.append(router.Item(features, scores, task.category))
        evaluator.close()
        thresholds, fit_report = router.fit_thresholds(fit_items, adapter=True)
        routing.save_policy(db, router.encode_thresholds(thresholds), len(fit_items), engine.loaded_adapter,
                            fit_report)

        # Answer the other half every way.
        answers = []
        for task in sorted((t for t in items if not t.fit_half), key=lambda t: t.user or ""):
            mem.load(task.user)
            now = dt.date.fromisoformat(task.now) if task.now else None
            row: dict[str, Any] = {"category": task.category, "question": task.question}
            for route in ROUTES:
                began = time.perf_counter()
                exchange = respond(db, engine, user, task.question, log=False, route=route, retriever=retriever,
                                   max_tokens=MAX_TOKENS, temperature=0.0, seed=0, now=now)
                row[route] = {"quality": round(quality(task, exchange.text), 4),
                              "seconds": round(time.perf_counter() - began, 3)}
                if route == "auto":
                    row["auto"].update(chosen=exchange.route, decision_seconds=round(exchange.decision.seconds, 4))
            answers.append(row)
        mem.load(None)
        engine.close()
        db.close()

    categories = sorted({a["category"] for a in answers})
    summary: dict[str, Any] = {}
    for route in ROUTES:
        per = {c: statistics.mean(a[route]["quality"] for a in answers if a["category"] == c) for c in categories}
        summary[route] = {"overall": round(statistics.mean(a[route]["quality"] for a in answers), 4),
                          **{c: round(v, 4) for c, v in per.items()},
                          "seconds_mean": round(statistics.mean(a[route]["seconds"] for a in answers), 3)}
    summary["auto"]["decision_ms_mean"] = round(1000 * statistics.mean(a["auto"]["decision_seconds"] for a in answers), 1)
    singles = [r for r in ROUTES if r != "auto"]
    best_single = max(singles, key=lambda r: summary[r]["overall"])
    beats = {r: [c for c in categories if summary["auto"][c] > summary[r][c]] for r in singles}
    chosen = {c: {r: sum(a["auto"]["chosen"] == r for a in answers if a["category"] == c) for r in singles}
              for c in categories}
    return {"tasks": {"fit": len(fit_items), "test": len(answers),
                      "test_by_category": {c: sum(a["category"] == c for a in answers) for c in categories}},
            "adapter": {"steps": ADAPT_STEPS, "dp": False, "train_seconds": round(adapt_seconds, 1),
                        "eval": made["eval"]},
            "thresholds": router.encode_thresholds(thresholds), "fit": fit_report,
            "routes": summary, "router_routes_by_category": chosen,
            "proof": {"best_single_route": best_single,
                      "router_at_least_best_single": summary["auto"]["overall"] >= summary[best_single]["overall"],
                      "router_beats_each_on_a_category": {r: beats[r] for r in singles},
                      "holds": summary["auto"]["overall"] >= summary[best_single]["overall"]
                      and all(beats[r] for r in singles)},
            "answers": answers}


def report(result: dict[str, Any]) -> str:
    """A few readable lines."""
    cats = list(result["tasks"]["test_by_category"])
    lines = [f"{'route':8} {'overall':>8} " + " ".join(f"{c:>8}" for c in cats) + "  s/answer"]
    for route, s in result["routes"].items():
        lines.append(f"{route:8} {s['overall']:8.3f} " + " ".join(f"{s[c]:8.3f}" for c in cats)
                     + f"  {s['seconds_mean']:.2f}")
    lines.append(f"router decision {result['routes']['auto']['decision_ms_mean']:.0f} ms; routes chosen "
                 f"{result['router_routes_by_category']}")
    p = result["proof"]
    lines.append(f"best single route: {p['best_single_route']}; router ≥ it: {p['router_at_least_best_single']}; "
                 f"router beats each on: {p['router_beats_each_on_a_category']}")
    return "\n".join(lines)
