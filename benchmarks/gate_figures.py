"""The figures behind the gate's behaviour check (README, "The gate's behaviour check"): the habit adapters the
suite trains on SmolLM2, each judged by `adapters.gate.judge`, with the replies to the general requests.

A one-off measurement script, not an `ember bench` (nothing here is a speed target):
`PYTHONPATH=. python benchmarks/gate_figures.py [NAME ...] --out DIR` trains each named run (all by default)
on a fresh habit user in DIR, exports it, and writes DIR/gate-NAME.json: the verdict and, per general request,
the base model's and the candidate's replies with the base model's surprise at each (mean NLL per token). The
base model's own replies are the baseline, measured in the same run. ~2 minutes per run on 2 cores.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import time
from pathlib import Path

# name: (conversations, canary planted and trained on as test_adapt does, LoraConfig changes)
RUNS = {
    "cli-nodp-16": (30, False, {"epsilon": None, "steps": 16}),     # tests/test_adapt_cli.py's run
    "cli-nodp-12": (30, False, {"epsilon": None, "steps": 12}),
    "cli100-nodp-16": (100, False, {"epsilon": None, "steps": 16}),
    "cli-dp50": (30, False, {"epsilon": 50.0}),                      # tests/test_daemon.py's real daemon
    "adapt-nodp": (100, True, {"epsilon": None}),                    # tests/test_adapt.py's `plain`
    "adapt-dp8": (100, True, {"epsilon": 8.0}),                      # tests/test_adapt.py's `private`
}


def main() -> None:
    from adapters import dataset, export, gate, lora
    from adapters.base import file_sha256
    from adapters.template import ChatTemplate
    from assistant.config import bundled_model
    from benchmarks.adapt import CANARY, CANARY_COPIES
    from benchmarks.synthetic_user import seed_habit_user
    from storage.db import open_db

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"runs, of {', '.join(RUNS)} (default: all)")
    parser.add_argument("--out", type=Path, required=True, help="a scratch directory (homes, adapters, results)")
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(RUNS))
    if unknown:
        parser.error(f"unknown run {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    model = bundled_model()
    template = ChatTemplate.from_gguf(str(model))
    sha = file_sha256(model)
    evaluator = gate.Evaluator(model, n_ctx=512, threads=2, base_sha256=sha)
    try:
        for name in args.names or list(RUNS):
            conversations, canary, changes = RUNS[name]
            home = args.out / f"home-{name}"
            shutil.rmtree(home, ignore_errors=True)
            db = open_db(home)
            seed_habit_user(db, conversations, **({"canary": CANARY, "canary_copies": CANARY_COPIES} if canary else {}))
            data = dataset.build(db, template, max_len=192, keep_facts=canary)
            db.close()
            config = dataclasses.replace(lora.LoraConfig(), threads=2, **changes)
            started = time.perf_counter()
            trained = lora.train(model, args.out / "cache", data, config)
            path = args.out / f"{name}.gguf"
            export.write_lora_gguf(path, trained.weights, alpha=config.alpha, n_head=trained.n_head,
                                   n_head_kv=trained.n_head_kv, base_sha256=sha, base_name=model.name)
            verdict = gate.judge(evaluator, data.heldout, path, None)
            result = {"run": name, "conversations": conversations, "config": changes, "steps": len(trained.losses),
                      "train_seconds": round(time.perf_counter() - started, 1), "verdict": verdict.as_json(),
                      "surprise_over_base": round(verdict.surprise - verdict.base_surprise, 3),
                      "median_over_requests": round(statistics.median(
                          b["surprise"] - b["base_surprise"] for b in verdict.behaviour
                          if b["surprise"] is not None and b["base_surprise"] is not None), 3)}
            (args.out / f"gate-{name}.json").write_text(json.dumps(result, indent=1))
            print(f"{name}: held-out {verdict.base_loss:.3f} -> {verdict.heldout_loss:.3f}, surprise "
                  f"{result['surprise_over_base']:+.2f} over the base's own; "
                  f"{'promoted' if verdict.promote else 'refused: ' + verdict.reason}", flush=True)
    finally:
        evaluator.close()


if __name__ == "__main__":
    main()
