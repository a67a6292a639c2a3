"""Recall of evidence turns on MemoryBank: BM25 alone, dense alone and Ember's hybrid, in one run.

Data: ../shared/data/memorybank (MIT): 15 simulated users' dated chat histories and 7 probing
questions each. The gold evidence turns and answers in benchmarks/data/memorybank_gold.jsonl were
written for Ember by reading the histories (they are not part of the dataset). Each user's turns are
imported into their own fresh memory, as a user of Ember would have them, and each answerable
question is searched with `now` = the day after that user's last conversation. (Some user names in
the dataset carry stray spaces; the gold file uses them stripped.)
"""
from __future__ import annotations

import datetime as dt
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from assistant.config import Settings
from assistant.errors import EmberError
from assistant.embedder import Embedder
from assistant.retrieval import Retriever
from storage import memory
from storage.db import open_db

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "memorybank"
GOLD = Path(__file__).resolve().parent / "data" / "memorybank_gold.jsonl"
MODES = ("bm25", "dense", "hybrid")
KS = (5, 10)


def turns(user: dict[str, Any]) -> list[dict[str, str]]:
    """A user's history as memory records, one per exchange, id `<date>#<index>`."""
    records = []
    for date, exchanges in sorted(user["history"].items()):
        for i, turn in enumerate(exchanges):
            records.append({"id": f"{date}#{i}", "time": date, "speaker": user["name"], "session": date,
                            "text": f"{user['name']}: {turn['query']}\nAI: {turn['response']}"})
    return records


def evaluate(embedder: Embedder, workdir: Path) -> dict[str, Any]:
    """Per-mode recall@k (fraction of a question's evidence turns in the top k, averaged)."""
    users = json.loads((DATA / "memory_bank_en.json").read_text(encoding="utf-8"))
    gold = [json.loads(line) for line in GOLD.read_text(encoding="utf-8").splitlines() if line.strip()]
    scores: dict[str, dict[int, list[float]]] = {m: {k: [] for k in KS} for m in MODES}
    hits_any: dict[str, dict[int, list[float]]] = {m: {k: [] for k in KS} for m in MODES}
    per_question = []
    for name, user in users.items():
        questions = [g for g in gold if g["user"] == name.strip() and g["answerable"] and g["evidence"]]
        if not questions:
            continue
        db = open_db(workdir / name)
        memory.upsert_records(db, turns(user))
        retriever = Retriever(db, embedder)
        retriever.refresh()
        for q in questions:
            row = {"qid": q["qid"], "evidence": q["evidence"]}
            for mode in MODES:
                found = [h.public_id for h in retriever.search(q["question"], max(KS), mode=mode,
                                                                 now=dt.date.fromisoformat(q["now"]))]
                row[mode] = found
                for k in KS:
                    got = len(set(found[:k]) & set(q["evidence"]))
                    scores[mode][k].append(got / len(q["evidence"]))
                    hits_any[mode][k].append(1.0 if got else 0.0)
            per_question.append(row)
        db.close()
    table = {mode: {f"recall@{k}": round(statistics.mean(scores[mode][k]), 4) for k in KS}
             | {f"hit@{k}": round(statistics.mean(hits_any[mode][k]), 4) for k in KS} for mode in MODES}
    return {"questions": len(per_question), "results": table, "per_question": per_question}


def run(settings: Settings, rounds: int = 1) -> dict[str, Any]:
    """The whole evaluation (rounds is ignored: retrieval is deterministic)."""
    if not DATA.is_dir():
        raise EmberError(f"{DATA} is missing: the MemoryBank data lives in ../shared/data")
    if not GOLD.is_file():
        raise EmberError(f"the gold evidence labels {GOLD} are not written yet; see benchmarks/recall.py")
    embedder = Embedder(settings.cache_dir, threads=settings.threads)
    with tempfile.TemporaryDirectory() as tmp:
        result = evaluate(embedder, Path(tmp))
    hybrid = result["results"]["hybrid"]
    best_single = {k: max(result["results"][m][f"recall@{k}"] for m in ("bm25", "dense")) for k in KS}
    result["hybrid_beats_both"] = all(hybrid[f"recall@{k}"] > best_single[k] for k in KS)
    result["dataset"] = "MemoryBank (MIT), 15 users, gold evidence annotated for Ember"
    return result


def report(result: dict[str, Any]) -> str:
    lines = [f"{result['questions']} answerable questions; recall of evidence turns",
             f"{'':8}{'recall@5':>10}{'recall@10':>11}{'hit@5':>8}{'hit@10':>8}"]
    for mode, row in result["results"].items():
        lines.append(f"{mode:8}{row['recall@5']:>10.3f}{row['recall@10']:>11.3f}"
                     f"{row['hit@5']:>8.3f}{row['hit@10']:>8.3f}")
    lines.append(f"hybrid beats both at k=5 and k=10: {result['hybrid_beats_both']}")
    return "\n".join(lines)
