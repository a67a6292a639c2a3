"""The router's BM25-first rule checked on real chat histories: does skipping the embedding change a route?

The router embeds a task or open question only when BM25 finds a note sharing a word with it, or when
the type's threshold is low (`assistant.router.needs_dense`); recall and temporal questions are always
embedded. This measures the claim behind it, that without a shared word the dense similarity does not
reach the task/open thresholds, on MemoryBank (../shared/data/memorybank, MIT): each of the 15 users'
earlier days (the first 70% of their dates) is their memory, and their later messages are the
questions, with how-to tasks (benchmarks.synthetic_user) and general questions added; then once more with
all users' earlier days in one memory (a larger one, where more words are shared). Every question is
routed twice under the default thresholds, with the rule and with every feature measured, and the routes
compared; also reported: the best dense similarity among questions that share no word with memory.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from assistant.config import Settings
from benchmarks.recall import DATA, turns

MEMORY_SHARE = 0.7
GENERAL = ["What is the capital of France?", "Tell me a joke about cats.", "Explain how a rainbow forms.",
           "Write a haiku about autumn.", "Translate 'good morning' into Spanish.", "What's a good book to read?",
           "Recommend a movie for tonight.", "How do I make pancakes?", "What is the weather like on Mars?",
           "Can you suggest some relaxing music?", "Give me a workout plan for beginners.",
           "How can I sleep better?", "What are some healthy snacks?", "Help me plan a trip to Japan.",
           "Who painted the Mona Lisa?", "Write a short story about a lighthouse keeper during a storm."]


def _split(user: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    """(memory records of the user's earlier days, the user's messages on later days)."""
    dates = sorted(user["history"])
    cut = max(1, int(len(dates) * MEMORY_SHARE))
    remembered = {"history": {d: user["history"][d] for d in dates[:cut]}, "name": user["name"]}
    later = [" ".join(turn["query"].split()) for d in dates[cut:] for turn in user["history"][d]]
    return turns(remembered), [q for q in later if q]


def run(settings: Settings, rounds: int = 1) -> dict[str, Any]:
    """Route every question with and without the rule; count the differences."""
    from assistant import router
    from assistant.embedder import Embedder
    from assistant.engine import Engine
    from assistant.retrieval import Retriever
    from benchmarks.synthetic_user import tasks
    from storage import memory
    from storage.db import open_db

    users = json.loads((DATA / "memory_bank_en.json").read_text(encoding="utf-8"))
    embedder = Embedder(settings.cache_dir, threads=settings.threads)
    engine = Engine(settings.model_path, n_ctx=512, n_threads=settings.threads, seed=0)
    extra = GENERAL + [f"How should I {t}?" for t in tasks()[:30]] + [f"Any tips to {t}?" for t in tasks()[30:60]]
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ember-bench-dense-skip-") as tmp:
        split = {name.strip(): _split(user) for name, user in users.items()}
        pooled = [dict(r, id=f"{name}/{r['id']}") for name, (records, _) in split.items() for r in records]
        homes = [(name, records, later) for name, (records, later) in split.items()]
        homes.append(("all users", pooled, [q for _, later in split.values() for q in later]))
        for name, records, later in homes:
            db = open_db(Path(tmp) / name.replace(" ", "-"))
            memory.upsert_records(db, records)
            retriever = Retriever(db, embedder)
            retriever.refresh()
            for source, questions in (("later messages", later), ("tasks and general", extra)):
                for question in questions:
                    lazy, _ = router.features_for(question, engine=engine, retriever=retriever, db=db, system=None,
                                                  k=5, thresholds=router.DEFAULTS)
                    full, _ = router.features_for(question, engine=engine, retriever=retriever, db=db, system=None,
                                                  k=5)
                    rows.append({"user": name, "source": source, "question": question,
                                 "type": full.query_type, "shares_a_word": full.bm25 is not None,
                                 "similarity": full.similarity, "skipped": lazy.dense_skipped,
                                 "route_with_rule": router.choose(lazy, router.DEFAULTS, adapter=False)[0],
                                 "route_measured": router.choose(full, router.DEFAULTS, adapter=False)[0]})
            db.close()
    engine.close()
    by_type: dict[str, Any] = {}
    for kind in router.TYPES:
        mine = [r for r in rows if r["type"] == kind]
        apart = [r for r in mine if not r["shares_a_word"] and r["similarity"] is not None]
        threshold = router.DEFAULTS[kind]["min_similarity"]
        by_type[kind] = {
            "questions": len(mine), "threshold": threshold,
            "share_no_word": len(apart), "skipped": sum(r["skipped"] for r in mine),
            "best_similarity_sharing_no_word": round(max((r["similarity"] for r in apart), default=0.0), 4),
            "sharing_no_word_at_threshold": sum(r["similarity"] >= threshold for r in apart),
            "at_threshold": sum(r["similarity"] is not None and r["similarity"] >= threshold for r in mine)}
    changed = [r for r in rows if r["route_with_rule"] != r["route_measured"]]
    skipped = [r for r in rows if r["skipped"]]
    return {"users": len(users), "questions": len(rows), "memory_share": MEMORY_SHARE,
            "memory_records_per_user_median": statistics.median(len(r) for _, r, _ in homes[:-1]),
            "memory_records_all_users": len(pooled),
            "by_type": by_type, "skipped": len(skipped), "routes_changed": len(changed),
            "changed": [{k: r[k] for k in ("user", "question", "type", "similarity", "route_with_rule",
                                           "route_measured")} for r in changed],
            "proof": {"holds": not changed}, "seconds": round(time.perf_counter() - started, 1)}


def report(result: dict[str, Any]) -> str:
    """A few readable lines."""
    lines = [f"{result['questions']} questions against {result['users']} MemoryBank users' earlier days "
             f"(each alone, then all {result['memory_records_all_users']} exchanges together): "
             f"{result['skipped']} not embedded by the rule, {result['routes_changed']} routes changed"]
    for kind, row in result["by_type"].items():
        lines.append(f"  {kind:8} {row['questions']:4} questions, {row['share_no_word']:3} share no word with memory "
                     f"(best similarity {row['best_similarity_sharing_no_word']:.2f}, threshold "
                     f"{row['threshold']:.2f}); {row['skipped']} skipped")
    return "\n".join(lines)
