"""One-off tuning runs for zeroth-order training with a window of top layers (not a registered
benchmark; `ember bench zo` measures the chosen defaults).

    python -m benchmarks.zo_tuning [--epsilon E] [--steps S] SECONDS 'WINDOW:LR,MU,PERTURBATIONS,BATCH[,CLIP[,SCHEDULE]];...' ...

On the synthetic user of `ember bench zo`, for each window the backend is built once (the layers below
run once per example, then the full model is freed), and each (lr, μ, perturbations, batch, clip C,
lr and μ schedule) trains from zero for SECONDS of wall time or S steps (default 100,000), whichever
comes first: without DP, or with DP at ε = E (σ calibrated to S steps; the schedules decay over S). Held-out loss is scored by the window's own scorer (the whole
model's within 2·10⁻³ nats, tests/test_zo.py). One JSON line per run on stdout.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str]) -> None:
    from adapters import zo
    from assistant.config import load_settings
    from benchmarks.adapt import habit_user
    from benchmarks.zo import _data

    settings = load_settings()
    epsilon, steps_cap = None, 100_000
    while argv and argv[0].startswith("--"):
        flag, value, argv = argv[0], argv[1], argv[2:]
        if flag == "--epsilon":
            epsilon = float(value)
        elif flag == "--steps":
            steps_cap = int(value)
        else:
            raise SystemExit(f"unknown option {flag}")
    wall = float(argv[0])
    with tempfile.TemporaryDirectory(prefix="ember-zo-tuning-") as tmp:
        home = Path(tmp) / "home"
        habit_user(home)
        data = _data(str(settings.model_path), str(home))
        for spec in argv[1:]:
            window, _, grid = spec.partition(":")
            began = time.perf_counter()
            backend = zo.LlamaControlVector(settings.model_path, data.train,
                                            zo.ZoConfig(window=int(window), threads=settings.threads),
                                            base_sha256=None, heldout=data.heldout)
            built = time.perf_counter() - began
            base = backend.heldout(data.heldout)
            for item in grid.split(";"):
                lr, mu, n, batch, *rest = item.split(",")
                clip = float(rest[0]) if rest and rest[0] else None
                schedule = rest[1] if len(rest) > 1 else "constant"
                backend.reset()
                config = zo.ZoConfig(window=int(window), lr=float(lr), mu=float(mu), perturbations=int(n),
                                     batch_size=int(batch), epsilon=epsilon, steps=steps_cap, eval_every=0,
                                     patience=0, threads=settings.threads, clip=clip, lr_schedule=schedule,
                                     mu_schedule=schedule)
                steps = {"n": 0}
                start = time.perf_counter()
                zo.train(backend, data, config, on_step=lambda p: steps.update(n=p.step),
                         should_stop=lambda: time.perf_counter() - start >= wall)
                seconds = time.perf_counter() - start
                print(json.dumps({"window": int(window), "lr": float(lr), "mu": float(mu), "perturbations": int(n),
                                  "batch": int(batch), "epsilon": epsilon, "clip": config.dp_clip(),
                                  "schedule": schedule, "steps": steps["n"], "seconds": round(seconds, 1),
                                  "build_seconds": round(built, 1), "examples": len(data.train),
                                  "cached_tokens": backend.top.cached_tokens if backend.top else None,
                                  "heldout_base": round(base, 4),
                                  "heldout": round(backend.heldout(data.heldout), 4)}), flush=True)
            backend.close()


if __name__ == "__main__":
    main(sys.argv[1:])
