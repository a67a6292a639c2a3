"""`ember bench voting`: combining the early exits' next-token distributions, measured on the user's
held-out split and on MemoryBank's probing questions (issue §2), on the bundled model in torch.

Exits every 6 of SmolLM2's 30 layers (5, 11, 17, 23, 29), each scored with the model's own final norm and
tied head (`adapters.layerwise.exit_log_probs`). Compared, per loss-carrying token:
- the last exit alone (the model as the chat runs it);
- max-confidence voting (EDGE-LLM `main.py`: element-wise max of the exits' softmax, renormalised) and the
  average;
- a bank-calibrated mixture: per-exit weights fitted by EM (`adapters.layerwise.mixture_weights`) on a
  bank of the user's own held-out examples (every other one), then applied unchanged to the rest of the
  held-out split and to MemoryBank's probing questions (question → the gold answer, closed book: the
  questions' histories live outside this repository; the same text for every method).
Voting would ship only if the calibrated mixture beat the last exit in NLL and accuracy on both sets.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from assistant.config import Settings
from benchmarks.adapt import habit_user

GOLD = Path(__file__).resolve().parent / "data" / "memorybank_gold.jsonl"
STRIDE = 6


def memorybank_examples(template: Any, limit: int | None = None) -> list[Any]:
    """MemoryBank's answerable probing questions as examples: the question as the user's turn, loss on
    the gold answer (and its end-of-turn marker) as the assistant's."""
    from adapters.dataset import Example

    out = []
    for line in GOLD.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if not row.get("answerable"):
            continue
        context, target = template.target([{"role": "user", "content": row["question"]}],
                                          {"role": "assistant", "content": row["answer"]})
        out.append(Example(tuple(context + target), len(context), 0, (), "memorybank", "test"))
        if limit is not None and len(out) >= limit:
            break
    return out


def run(settings: Settings, rounds: int = 1, quick: bool = False) -> dict[str, Any]:
    """Fit the exit weights on the bank, score every combination on both test sets."""
    from adapters import dataset, layerwise
    from adapters.base import load_base
    from adapters.template import ChatTemplate
    from storage.db import open_db

    started = time.perf_counter()
    template = ChatTemplate.from_gguf(str(settings.model_path))
    with tempfile.TemporaryDirectory(prefix="ember-bench-voting-") as tmp:
        home = Path(tmp) / "home"
        habit_user(home)
        data = dataset.build(open_db(home), template, keep_facts=True)
    heldout = data.heldout[:20] if quick else data.heldout
    bank, test = heldout[0::2], heldout[1::2]
    probes = memorybank_examples(template, 20 if quick else None)
    model = load_base(settings.model_path, settings.cache_dir, threads=settings.threads)
    exits = layerwise.exits(model.config.num_hidden_layers, STRIDE)
    weights = layerwise.mixture_weights(layerwise.gold_log_probs(model, bank, exits))
    result: dict[str, Any] = {
        "model": settings.model_path.name, "exits": exits, "quick": quick,
        "bank": {"examples": len(bank), "tokens": sum(e.loss_tokens for e in bank),
                 "weights": {str(e): round(w, 4) for e, w in zip(exits, weights)}},
        "heldout_test": layerwise.voting_scores(model, test, exits, weights=weights),
        "memorybank": layerwise.voting_scores(model, probes, exits, weights=weights),
    }
    last = f"exit_{exits[-1]}"
    wins = {name: (s["vote_bank"]["nll"] < s[last]["nll"] and s["vote_bank"]["accuracy"] > s[last]["accuracy"])
            for name, s in (("heldout_test", result["heldout_test"]), ("memorybank", result["memorybank"]))}
    result["bank_vote_beats_last_exit"] = wins
    result["shipped"] = all(wins.values())
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def report(result: dict[str, Any]) -> str:
    """The figures for people."""
    last = f"exit_{result['exits'][-1]}"
    lines = [f"bank: {result['bank']['examples']} held-out examples, {result['bank']['tokens']} tokens; "
             f"EM weights per exit {result['bank']['weights']}"]
    for name in ("heldout_test", "memorybank"):
        s = result[name]
        lines.append(f"{name} ({s[last]['tokens']} tokens): " + "; ".join(
            f"{k} acc {s[k]['accuracy']:.3f} nll {s[k]['nll']:.3f}" for k in (last, "vote_max", "vote_mean", "vote_bank")))
    lines.append(f"bank-calibrated vote beats the last exit: {result['bank_vote_beats_last_exit']}; "
                 f"shipped: {result['shipped']}")
    return "\n".join(lines)
