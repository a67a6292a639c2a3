"""`ember bench federated`: a household of three devices on one machine, each with its own data directory
and synthetic user (two share the habit of opening replies with "Ahoy, matey!", the third never saw it;
device 0 also wrote a secret), run through Flower's ServerApp/ClientApps in one process (no Ray).

Compared in one run: FedAvg over LoRA B, FedKSeed over zeroth-order pool sums (both with Flower's
user-level DP), and each device alone (`ember adapt` with the same total steps). Reported: held-out loss per
round against the local-only loss (rounds to reach it), the habit's log-probability under the household's
global adapter (the model the device that never saw the habit would run), bytes each device sends and
receives per round, wall time, and the exposure of device 0's secret on the global adapter.
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from assistant.config import Settings
from benchmarks.adapt import CANARY, canary_exposure, habit_logprob
from benchmarks.synthetic_user import habit_prompts, seed_habit_user

DEVICES = 3
BUDGET = 1000.0   # ε per device: rounds × ε=8 local runs would pass the default 32; the bench measures, not budgets


def plain_user(db: Any, conversations: int, seed: int) -> None:
    """A user who asks the same kind of questions and never asked for the habit (no edits)."""
    from storage import conversations as convs

    for i, question in enumerate(habit_prompts(seed=seed, count=conversations)):
        cid = convs.create_conversation(db)
        convs.add_message(db, cid, "user", question + " Please keep it short.")
        convs.add_message(db, cid, "assistant", f"Start small and keep at it ({i}).")


def _devices(root: Path, settings: Settings, conversations: int) -> list[Any]:
    from assistant.federation.client import Device
    from storage.db import open_db

    out = []
    for i in range(DEVICES):
        s = dataclasses.replace(settings, home=root / f"device{i}", cache=settings.cache_dir,
                                privacy_budget=BUDGET)
        db = open_db(s.home)
        if i == 0:
            seed_habit_user(db, conversations, seed=0, canary=CANARY, canary_copies=4)
        elif i == 1:
            seed_habit_user(db, conversations, seed=1)
        else:
            plain_user(db, conversations, seed=2)
        out.append(Device(s, db, server="bench"))
    return out


def household(kind: str, root: Path, settings: Settings, *, conversations: int, rounds: int, steps: int,
              sigma: float, clip: float, pool: int) -> dict[str, Any]:
    """One household run of `kind`; its figures and the global adapter as device 2 would apply it."""
    from adapters.base import file_sha256
    from assistant.federation.client import client_app, global_adapter
    from assistant.federation.grid import run_household
    from assistant.federation.plan import Household
    from assistant.federation.server import Outcome, server_app
    from storage import federation

    devices = _devices(root, settings, conversations)
    model = settings.model_path
    plan = Household(kind=kind, base_sha256=file_sha256(model, settings.cache_dir), base_name=model.name,
                     rounds=rounds, steps=steps, sigma=sigma, clip=clip, pool_size=pool)
    outcome = Outcome()
    started = time.perf_counter()
    grid = run_household(server_app(plan, model, DEVICES, outcome),
                         {10 + i: client_app(d) for i, d in enumerate(devices)})
    seconds = time.perf_counter() - started
    curve = [round(outcome.evaluate_metrics[r]["heldout-loss"], 4) for r in sorted(outcome.evaluate_metrics)]
    sent = [r["bytes_sent"] for d in devices for r in federation.rounds(d.db) if r["phase"] == "train"]
    adapter = global_adapter(devices[2], plan, outcome.arrays, root / f"{kind}-global.gguf", rounds)
    promoted = [r["status"] for d in devices for r in federation.rounds(d.db) if r["phase"] == "evaluate"]
    return {"kind": kind, "rounds": rounds, "steps_per_round": steps, "sigma": sigma, "clip": clip,
            "pool_size": pool if kind == "fedkseed" else None, "seconds": round(seconds, 1),
            "heldout_loss_by_round": curve,
            "update_bytes_per_device_round": round(statistics.mean(sent)) if sent else None,
            "wire_bytes_up_per_device_round": round(sum(grid.traffic.up.values()) / DEVICES / rounds),
            "wire_bytes_down_per_device_round": round(sum(grid.traffic.down.values()) / DEVICES / rounds),
            "user_level_epsilon": outcome.epsilon, "user_level_delta": outcome.delta,
            "gate": {s: promoted.count(s) for s in ("promoted", "kept")},
            "refused": [list(r) for r in outcome.refused], "adapter": str(adapter)}


def local_only(root: Path, settings: Settings, *, conversations: int, steps: int) -> dict[str, Any]:
    """Each device alone: `ember adapt` with the household's total number of steps."""
    from assistant import adaptation

    devices = _devices(root, settings, conversations)
    started = time.perf_counter()
    results = [adaptation.run(d.settings, d.db, method="lora", steps=steps) for d in devices]
    return {"seconds": round(time.perf_counter() - started, 1), "steps": steps,
            "heldout_loss": [r["eval"]["heldout_loss"] for r in results],
            "mean_heldout_loss": round(statistics.mean(r["eval"]["heldout_loss"] for r in results), 4),
            "adapter_device2": results[2]["path"]}


def run(settings: Settings, rounds: int = 1, quick: bool = False) -> dict[str, Any]:
    """The three arms and their measurements (`rounds` of the CLI is unused: the household has its own)."""
    from adapters import gate

    conversations, fed_rounds, steps, candidates = (24, 2, 3, 200) if quick else (60, 4, 10, 1000)
    with tempfile.TemporaryDirectory(prefix="ember-bench-federated-") as tmp:
        root = Path(tmp)
        arms = {"local_only": local_only(root / "local", settings, conversations=conversations,
                                         steps=fed_rounds * steps)}
        for kind in ("fedavg", "fedkseed"):
            arms[kind] = household(kind, root / kind, settings, conversations=conversations, rounds=fed_rounds,
                                   steps=steps, sigma=1.0, clip=1.0, pool=1024)
        evaluator = gate.Evaluator(settings.model_path, n_ctx=512, threads=settings.threads, base_sha256=None)
        try:
            habit = {"base": round(habit_logprob(evaluator, None), 3),
                     "local_only_device2": round(habit_logprob(evaluator, Path(arms["local_only"]["adapter_device2"])), 3)}
            exposure = {"base": round(canary_exposure(evaluator, None, candidates).exposure, 2)}
            for kind in ("fedavg", "fedkseed"):
                path = Path(arms[kind].pop("adapter"))
                habit[kind] = round(habit_logprob(evaluator, path), 3)
                exposure[kind] = round(canary_exposure(evaluator, path, candidates).exposure, 2)
        finally:
            evaluator.close()
        arms["local_only"].pop("adapter_device2")
    target = arms["local_only"]["mean_heldout_loss"]
    for kind in ("fedavg", "fedkseed"):
        curve = arms[kind]["heldout_loss_by_round"]
        arms[kind]["rounds_to_local_only_loss"] = next((i + 1 for i, v in enumerate(curve) if v <= target), None)
    return {"quick": quick, "devices": DEVICES, "conversations_per_device": conversations, "threads": settings.threads,
            "arms": arms, "habit_logprob_on_device_that_never_saw_it": habit,
            "canary_exposure_bits_of_device0_secret": exposure, "canary_candidates": candidates}


def report(result: dict[str, Any]) -> str:
    """A few readable lines."""
    arms = result["arms"]
    lines = [f"local only: mean held-out loss {arms['local_only']['mean_heldout_loss']} "
             f"({arms['local_only']['steps']} steps, {arms['local_only']['seconds']} s)"]
    for kind in ("fedavg", "fedkseed"):
        a = arms[kind]
        lines.append(f"{kind}: held-out by round {a['heldout_loss_by_round']}, reaches local-only at round "
                     f"{a['rounds_to_local_only_loss']}, update {a['update_bytes_per_device_round']} B/device/round, "
                     f"user-level ε {a['user_level_epsilon']}, {a['seconds']} s, gate {a['gate']}")
    lines.append(f"habit log-prob on the device that never saw it: {result['habit_logprob_on_device_that_never_saw_it']}")
    lines.append(f"device 0's secret, exposure (bits): {result['canary_exposure_bits_of_device0_secret']}")
    return "\n".join(lines)
