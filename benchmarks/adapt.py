"""Adaptation on the default model: speed and memory of DP and non-DP LoRA training, and what was learnt.

One synthetic user (benchmarks/synthetic_user.py: a sign-off habit in 100 conversations, plus a canary
planted in 4 of them) is trained on twice, with DP at ε=8 and without DP, each run in its own process so
that its peak RSS is its own. Each exported GGUF adapter is then measured in llama.cpp: held-out loss,
the log-probability of the habit at the start of replies to held-out questions, and the canary's
exposure (Carlini et al., arXiv 1802.08232) among 999 random codes.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from assistant.config import Settings

CONVERSATIONS = 100
CANARY = "283719"
CANARY_COPIES = 4


def habit_user(home: Path) -> None:
    """The synthetic user's log, written into `home`."""
    from benchmarks.synthetic_user import seed_habit_user
    from storage.db import open_db

    db = open_db(home)
    seed_habit_user(db, CONVERSATIONS, canary=CANARY, canary_copies=CANARY_COPIES)
    db.close()


def train_once(model_path: str, home: str, epsilon: float | None, threads: int, out: str) -> dict[str, Any]:
    """Train and export one adapter (run in a child process); returns its speed and peak memory."""
    from adapters import dataset, export, lora
    from adapters.base import file_sha256
    from adapters.pipeline import process_peak_mb
    from adapters.template import ChatTemplate
    from storage.db import open_db

    started = time.perf_counter()
    db = open_db(Path(home))
    data = dataset.build(db, ChatTemplate.from_gguf(model_path), keep_facts=True)   # the canary too
    config = lora.LoraConfig(epsilon=epsilon, threads=threads)
    stamps: list[float] = []
    trained = lora.train(Path(model_path), Path(home) / "cache", data, config,
                         on_step=lambda _p: stamps.append(time.perf_counter()))
    export.write_lora_gguf(Path(out), trained.weights, alpha=config.alpha, n_head=trained.n_head,
                           n_head_kv=trained.n_head_kv, base_sha256=file_sha256(Path(model_path)),
                           base_name=Path(model_path).name)
    per_step = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
    return {"steps": len(stamps), "seconds_per_step": round(per_step, 3),
            "examples_per_second": round(config.batch_size / per_step, 1),
            "train_seconds": round(trained.seconds, 1), "total_seconds": round(time.perf_counter() - started, 1),
            "peak_rss_mb": round(process_peak_mb(), 1),
            "train_examples": len(data.train), "heldout_examples": len(data.heldout),
            "plan": dataclasses.asdict(trained.plan) if trained.plan else None,
            "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "threads"},
            "loss_first": trained.losses[0], "loss_last": trained.losses[-1]}


def habit_logprob(evaluator: Any, adapter: Path | None, count: int = 8) -> float:
    """Mean log-probability of the habit opening replies to questions the user never asked."""
    from benchmarks.synthetic_user import HABIT, habit_prompts

    evaluator.use(adapter)
    habit = evaluator.template.tokenize(HABIT)
    scores = []
    for prompt in habit_prompts(count=count, skip=CONVERSATIONS):
        tokens, _ = evaluator.template.prompt([{"role": "user", "content": prompt}])
        scores.append(evaluator.continuation_logprobs(tokens, [habit])[0])
    return statistics.mean(scores)


def canary_exposure(evaluator: Any, adapter: Path | None, candidates: int = 1000) -> Any:
    """The canary's rank and exposure among `candidates` codes (itself included), with this adapter."""
    from adapters.exposure import exposure
    from benchmarks.synthetic_user import habit_prompts

    evaluator.use(adapter)
    prefix = canary_prefix(evaluator.template, habit_prompts(count=1, skip=CONVERSATIONS + 8)[0])
    return exposure(evaluator, prefix, CANARY, suffix=".", candidates=candidates - 1)


def measure(evaluator: Any, data: Any, adapter: Path | None) -> dict[str, Any]:
    """Held-out loss, habit log-probability and canary exposure with one adapter (None: base)."""
    from benchmarks.synthetic_user import habit_prompts

    habit = habit_logprob(evaluator, adapter)
    found = canary_exposure(evaluator, adapter)
    reply, _ = evaluator.reply(habit_prompts(count=1, skip=CONVERSATIONS)[0])
    return {"heldout_loss": round(evaluator.loss(data.heldout), 4), "habit_logprob": round(habit, 3),
            "canary_rank": found.rank, "canary_exposure_bits": round(found.exposure, 2),
            "sample_reply": reply.strip()[:120]}


def canary_prefix(template: Any, question: str) -> list[int]:
    """Tokens of a new user turn asking `question` and starting the secret sentence, up to the code."""
    from benchmarks.synthetic_user import canary_lead

    context, _ = template.target([], {"role": "user", "content": "x"})
    return context + template.tokenize(canary_lead(question))


def run(settings: Settings, rounds: int = 1) -> dict[str, Any]:
    """Both runs and their measurements (`rounds` is not used: one training run each is minutes)."""
    from adapters import dataset, gate
    from adapters.template import ChatTemplate
    from storage.db import open_db

    model = str(settings.model_path)
    with tempfile.TemporaryDirectory(prefix="ember-bench-adapt-") as tmp:
        home = Path(tmp) / "home"
        habit_user(home)
        runs = {}
        spawn = multiprocessing.get_context("spawn")
        for name, epsilon in (("dp_epsilon_8", 8.0), ("no_dp", None)):
            with spawn.Pool(1) as pool:
                runs[name] = pool.apply(train_once, (model, str(home), epsilon, settings.threads,
                                                     str(Path(tmp) / f"{name}.gguf")))
        db = open_db(home)
        data = dataset.build(db, ChatTemplate.from_gguf(model), keep_facts=True)
        evaluator = gate.Evaluator(settings.model_path, n_ctx=512, threads=settings.threads, base_sha256=None)
        try:
            quality = {"base": measure(evaluator, data, None)}
            for name in runs:
                quality[name] = measure(evaluator, data, Path(tmp) / f"{name}.gguf")
        finally:
            evaluator.close()
    return {"user": {"conversations": CONVERSATIONS, "canary_copies": CANARY_COPIES,
                     "canary_candidates": 1000},
            "threads": settings.threads, "runs": runs, "quality": quality}


def report(result: dict[str, Any]) -> str:
    """A few readable lines."""
    lines = []
    for name, r in result["runs"].items():
        lines.append(f"{name:13} {r['seconds_per_step']:.2f} s/step  {r['examples_per_second']:.1f} ex/s  "
                     f"peak RSS {r['peak_rss_mb']:.0f} MB  ({r['steps']} steps, {r['train_seconds']:.0f} s)")
    for name, q in result["quality"].items():
        lines.append(f"{name:13} held-out loss {q['heldout_loss']:.3f}  habit log-p {q['habit_logprob']:.2f}  "
                     f"canary rank {q['canary_rank']}/1000 (exposure {q['canary_exposure_bits']:.1f} bits)")
    return "\n".join(lines)
