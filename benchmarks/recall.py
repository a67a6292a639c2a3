"""Recall of evidence turns on MemoryBank: BM25 alone, dense alone, the previous hybrid and Ember's
hybrid, in one run.

Data: ../shared/data/memorybank (MIT): 15 simulated users' dated chat histories and 7 probing
questions each. The gold evidence turns and answers in benchmarks/data/memorybank_gold.jsonl were
written for Ember by reading the histories (they are not part of the dataset). Each user's turns are
imported into their own fresh memory, as a user of Ember would have them, and each answerable
question is searched with `now` = the day after that user's last conversation. (Some user names in
the dataset carry stray spaces; the gold file uses them stripped.)

Baselines come from a second memory per user whose vectors are made as before Ember 0.2 (the chunk's
words alone, `embed_pending(in_context=False)`): `bm25`, `dense` and `hybrid-v1` (the previous fusion)
search it; `hybrid` and `dense-in-context` search the memory as Ember now builds it. The same is run
again with one record per turn (`by_turn`: the user's and the AI's turns apart, speaker and session
set, as a long chat is imported); an exchange counts as found when either of its turns is.
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
from assistant.retrieval import Retriever, embed_pending
from storage import memory
from storage.db import open_db

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "memorybank"
GOLD = Path(__file__).resolve().parent / "data" / "memorybank_gold.jsonl"
BASELINES = ("bm25", "dense", "hybrid-v1")       # searched in memory with the previous vectors
CURRENT = ("hybrid", "dense-in-context")          # searched in memory as Ember builds it now
MODES = BASELINES + CURRENT
KS = (5, 10)


def turns(user: dict[str, Any]) -> list[dict[str, str]]:
    """A user's history as memory records, one per exchange, id `<date>#<index>`."""
    records = []
    for date, exchanges in sorted(user["history"].items()):
        for i, turn in enumerate(exchanges):
            records.append({"id": f"{date}#{i}", "time": date, "speaker": user["name"], "session": date,
                            "text": f"{user['name']}: {turn['query']}\nAI: {turn['response']}"})
    return records


def turn_records(user: dict[str, Any]) -> list[dict[str, str]]:
    """A user's history as memory records, one per turn, id `<date>#<index>#user` or `...#ai`."""
    records = []
    for date, exchanges in sorted(user["history"].items()):
        for i, turn in enumerate(exchanges):
            records.append({"id": f"{date}#{i}#user", "time": date, "speaker": user["name"].strip(),
                            "session": date, "text": turn["query"]})
            records.append({"id": f"{date}#{i}#ai", "time": date, "speaker": "AI", "session": date,
                            "text": turn["response"]})
    return records


def _exchanges(found: list[str]) -> list[str]:
    """Exchange ids in the order their first turn was found (exchange ids map to themselves)."""
    return list(dict.fromkeys("#".join(public_id.split("#")[:2]) for public_id in found))


def evaluate(embedder: Embedder, workdir: Path, by_turn: bool = False) -> dict[str, Any]:
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
        records = turn_records(user) if by_turn else turns(user)
        kind = "turns" if by_turn else "exchanges"
        before = open_db(workdir / f"{name}-{kind}-v1")
        memory.upsert_records(before, records)
        embed_pending(before, embedder, in_context=False)
        db = open_db(workdir / f"{name}-{kind}")
        memory.upsert_records(db, records)
        retriever = Retriever(db, embedder)
        retriever.refresh()
        retrievers = {mode: Retriever(before, embedder) for mode in BASELINES}
        retrievers.update({mode: retriever for mode in CURRENT})
        for q in questions:
            row = {"qid": q["qid"], "evidence": q["evidence"]}
            for mode in MODES:
                # turns of one exchange count once: ask for enough turns to fill k exchanges
                hits = retrievers[mode].search(q["question"], max(KS) * (2 if by_turn else 1),
                                               mode=mode.removesuffix("-in-context"),
                                               now=dt.date.fromisoformat(q["now"]))
                found = _exchanges([h.public_id for h in hits])[: max(KS)]
                row[mode] = found
                for k in KS:
                    got = len(set(found[:k]) & set(q["evidence"]))
                    scores[mode][k].append(got / len(q["evidence"]))
                    hits_any[mode][k].append(1.0 if got else 0.0)
            per_question.append(row)
        db.close()
        before.close()
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
        by_turn = evaluate(embedder, Path(tmp), by_turn=True)
    result["by_turn"] = {"questions": by_turn["questions"], "results": by_turn["results"]}
    hybrid = result["results"]["hybrid"]
    best_single = {k: max(result["results"][m][f"recall@{k}"] for m in ("bm25", "dense")) for k in KS}
    result["hybrid_beats_both"] = all(hybrid[f"recall@{k}"] > best_single[k] for k in KS)
    result["hybrid_beats_v1"] = all(hybrid[f"{metric}@{k}"] >= result["results"]["hybrid-v1"][f"{metric}@{k}"]
                                    for metric in ("recall", "hit") for k in KS)
    result["dataset"] = "MemoryBank (MIT), 15 users, gold evidence annotated for Ember"
    return result


def _table(results: dict[str, dict[str, float]]) -> list[str]:
    lines = [f"{'':18}{'recall@5':>10}{'recall@10':>11}{'hit@5':>8}{'hit@10':>8}"]
    for mode, row in results.items():
        lines.append(f"{mode:18}{row['recall@5']:>10.3f}{row['recall@10']:>11.3f}"
                     f"{row['hit@5']:>8.3f}{row['hit@10']:>8.3f}")
    return lines


def report(result: dict[str, Any]) -> str:
    lines = [f"{result['questions']} answerable questions; recall of evidence exchanges, one record an exchange",
             *_table(result["results"])]
    if "by_turn" in result:
        lines += ["one record a turn (speaker and session set)", *_table(result["by_turn"]["results"])]
    lines.append(f"hybrid beats both at k=5 and k=10: {result['hybrid_beats_both']}")
    if "hybrid_beats_v1" in result:
        lines.append(f"hybrid at least hybrid-v1 everywhere: {result['hybrid_beats_v1']}")
    return "\n".join(lines)
