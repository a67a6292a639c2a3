"""Which layers LoRA trains: vanilla (all 30 layers, full backprop) vs Ember's top-N vs adaptive layer
tuning with early exits (EDGE-LLM, arXiv 2406.15758), and voting across the exits.

One synthetic user (benchmarks/synthetic_user.py, the habit user of `ember bench adapt`), the same steps,
batch, seed and LoRA rank for the methods (adaptive twice: Ember's schedule, and upstream's equal blocks at
one lr), without DP (DP changes neither s/step nor memory much:
`ember bench adapt`). Each run is a process of its own, so that its peak RSS is its own; a fourth process
loads the same base and runs one inference forward pass over a batch, and its peak RSS is the inference
baseline that "training memory" is measured above. Wall time counts from the call to the trainer (base
loading and every cached forward pass included).

Held-out loss at equal wall time, two ways:
- at adaptive's time: each method's LoRA as it was at its last step before the adaptive run (the same
  steps) ended, exported and measured in llama.cpp;
- at an equal budget: vanilla's whole time for its steps is the budget. Adaptive and top-N train again,
  each with as many steps as its own measured fixed cost (loading, caching) and seconds per step fit in
  that budget (adaptive's windows planned over those steps), and each is measured at its last step
  before the budget ran out. This is the daemon's question: given this much idle time, which method
  leaves the better adapter. The target is judged here, on the mean over seeds 0 … rounds−1 (`--rounds`):
  vanilla, adaptive and top-N train again with each further seed, for the same steps, cut at the same
  budget, since one seed's held-out loss moves by more than the 5 % the target allows.

Voting: the adaptive adapter merged into the torch model; each exit's next-token distribution (frozen
final norm × the exit's gain, tied head), max-confidence and average voting, against the last exit alone,
on the held-out split. On the llama.cpp path, the numpy cost of one exit's head per token is measured
against the decode time per token.
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
from benchmarks.adapt import habit_logprob, habit_user

TARGETS = {"speedup_per_step": 2.92, "memory_reduction": 4.0, "loss_within": 0.05}


def configs(steps: int, batch: int, seed: int = 0) -> dict[str, Any]:
    """The methods' configurations, equal in everything but which layers train (and adaptive's schedule)."""
    from adapters import layerwise, lora

    # One dtype for all: adaptive loads its base in float32 (AdaptiveConfig.dtype), and LoRA's "auto"
    # would be bfloat16 on a CPU with bf16, halving vanilla's and top-N's memory for a reason that is not
    # which layers train.
    common = {"epsilon": None, "steps": steps, "batch_size": batch, "seed": seed, "checkpoint_every": 10 ** 6,
              "dtype": "float32"}
    return {"vanilla": lora.LoraConfig(layers=30, **common),
            "top_n": lora.LoraConfig(**common),
            "adaptive": layerwise.AdaptiveConfig(**common),
            "adaptive_upstream": layerwise.AdaptiveConfig(final_share=None, shallow_lr_scale=1.0, **common)}


def inference_baseline(model_path: str, home: str, batch: int, threads: int) -> dict[str, Any]:
    """Peak RSS of loading the base in torch and one no-grad forward pass over a batch (child process)."""
    from adapters import dataset, lora
    from adapters.base import import_torch, load_base
    from adapters.pipeline import process_peak_mb
    from adapters.template import ChatTemplate
    from storage.db import open_db

    torch = import_torch()
    data = dataset.build(open_db(Path(home)), ChatTemplate.from_gguf(model_path), keep_facts=True)
    model = load_base(Path(model_path), Path(home) / "cache", threads=threads)
    chunk = data.train[:batch]
    ids, mask, _ = lora._tensors(torch, chunk, max(len(e.tokens) for e in data.train))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    return {"peak_rss_mb": round(process_peak_mb(), 1)}


def train_once(name: str, model_path: str, home: str, steps: int, batch: int, threads: int, until: float | None,
               out: str, seed: int = 0) -> dict[str, Any]:
    """Train one method (child process); export its final LoRA, and the LoRA as it was at `until` seconds."""
    from adapters import dataset, export, layerwise, lora
    from adapters.base import file_sha256, import_torch
    from adapters.pipeline import process_peak_mb
    from adapters.template import ChatTemplate
    from storage.db import open_db

    torch = import_torch()
    config = dataclasses.replace(configs(steps, batch, seed)[name], threads=threads)
    data = dataset.build(open_db(Path(home)), ChatTemplate.from_gguf(model_path), keep_facts=True)
    stamps: list[float] = []
    at_until: dict[str, Any] = {}
    started = time.perf_counter()

    def keep(step: int, weights: dict[str, Any]) -> None:
        # A method whose first step alone takes longer than `until` (a loaded machine) is compared by its
        # first step, and says so (over_time), rather than by nothing.
        if until is None or stamps[-1] <= until or not at_until:
            at_until.update(step=step, seconds=stamps[-1], weights=weights,
                            over_time=until is not None and stamps[-1] > until)

    trainer = layerwise.train if name.startswith("adaptive") else lora.train
    trained = trainer(Path(model_path), Path(home) / "cache", data, config,
                      on_step=lambda _p: stamps.append(time.perf_counter() - started), on_weights=(1, keep))
    sha = file_sha256(Path(model_path))

    def write(path: str, weights: dict[str, Any]) -> None:
        export.write_lora_gguf(Path(path), weights, alpha=config.alpha, n_head=trained.n_head,
                               n_head_kv=trained.n_head_kv, base_sha256=sha, base_name=Path(model_path).name)

    write(f"{out}.final.gguf", trained.weights)
    write(f"{out}.until.gguf", at_until["weights"])
    if name == "adaptive" and seed == 0:
        torch.save({"weights": trained.weights, "gains": trained.gains,
                    "exits": [w.exit for w in trained.windows]}, f"{out}.pt")
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"steps": len(stamps), "seconds_per_step_median": round(statistics.median(intervals), 3),
            "seconds_per_step_mean": round(stamps[-1] / len(stamps), 3), "wall_seconds": round(stamps[-1], 1),
            "peak_rss_mb": round(process_peak_mb(), 1), "loss_first": round(trained.losses[0], 4),
            "loss_last": round(trained.losses[-1], 4), "at_equal_time": {"step": at_until["step"],
                                                                         "seconds": round(at_until["seconds"], 1),
                                                                         "over_time": at_until["over_time"]},
            "trainable_layers": sorted({int(m.split(".")[2]) for m in trained.weights}),
            "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "threads"}}


def budget_steps(run: dict[str, Any], budget: float) -> int:
    """How many steps of a method fit in `budget` seconds, from its equal-steps run: its fixed cost (wall
    time less its steps at the median step time: loading, caching) and its median step, with 3% to spare
    so that the last window is not cut short."""
    fixed = max(run["wall_seconds"] - run["steps"] * run["seconds_per_step_median"], 0.0)
    return int(0.97 * (budget - fixed) / max(run["seconds_per_step_median"], 1e-3))


def voting(model_path: Path, cache_dir: Path, data: Any, saved: Path, threads: int) -> dict[str, Any]:
    """Next-token accuracy and NLL on the held-out split: each exit, max and mean voting (base and adapted)."""
    from adapters import layerwise
    from adapters.base import import_torch, load_base

    torch = import_torch()
    state = torch.load(saved, weights_only=False)
    model = load_base(model_path, cache_dir, threads=threads)
    exits = state["exits"]
    result = {"exits": exits, "base": layerwise.voting_scores(model, data.heldout, exits)}
    alpha, rank = configs(1, 1)["adaptive"].alpha, configs(1, 1)["adaptive"].rank
    with torch.no_grad():
        for module, (a, b) in state["weights"].items():
            model.get_submodule(module).weight += (alpha / rank) * (b @ a)
    gains = {e: torch.tensor(g) for e, g in state["gains"].items()}
    result["adaptive"] = layerwise.voting_scores(model, data.heldout, exits, gains)
    # The llama.cpp path would apply the final norm and the 49,152 × 576 tied head in numpy to each
    # intermediate exit's `l_out-N`, per generated token: its cost, against a decode step.
    import numpy as np

    head = model.lm_head.weight.detach().numpy()
    h = np.random.default_rng(0).standard_normal(head.shape[1]).astype(np.float32)
    started = time.perf_counter()
    for _ in range(20):
        logits = head @ h
        np.exp(logits - logits.max())
    result["numpy_head_ms_per_exit_token"] = round((time.perf_counter() - started) / 20 * 1000, 2)
    return result


def write_partial(runs: dict[str, Any], baseline: dict[str, Any]) -> None:
    """The training figures so far, in case the evaluation after them fails (benchmarks/results/layers.partial.json)."""
    import json

    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/layers.partial.json").write_text(json.dumps({"baseline": baseline, "runs": runs}))


def run(settings: Settings, rounds: int = 1, quick: bool = False) -> dict[str, Any]:
    """The runs, their measurements in llama.cpp, and voting."""
    from adapters import dataset, gate
    from adapters.template import ChatTemplate
    from storage.db import open_db

    steps, batch = (6, 4) if quick else (20, 8)
    model = str(settings.model_path)
    threads = settings.threads
    with tempfile.TemporaryDirectory(prefix="ember-bench-layers-") as tmp:
        home = Path(tmp) / "home"
        habit_user(home)
        spawn = multiprocessing.get_context("spawn")
        with spawn.Pool(1) as pool:
            baseline = pool.apply(inference_baseline, (model, str(home), batch, threads))
        runs: dict[str, Any] = {}
        until = None
        for name in ("adaptive", "adaptive_upstream", "top_n", "vanilla"):
            with spawn.Pool(1) as pool:
                runs[name] = pool.apply(train_once, (name, model, str(home), steps, batch, threads, until,
                                                     str(Path(tmp) / name)))
            runs[name]["train_memory_mb"] = round(runs[name]["peak_rss_mb"] - baseline["peak_rss_mb"], 1)
            if name == "adaptive":
                until = runs[name]["wall_seconds"]
            write_partial(runs, baseline)
        budget = runs["vanilla"]["wall_seconds"]
        budget_runs: dict[str, Any] = {}
        for name in ("adaptive", "adaptive_upstream", "top_n"):
            planned = budget_steps(runs[name], budget)
            if planned <= steps:
                continue     # no more steps than the equal-steps run fit: that run already answers
            with spawn.Pool(1) as pool:
                budget_runs[name] = pool.apply(train_once, (name, model, str(home), planned, batch, threads, budget,
                                                            str(Path(tmp) / f"{name}-budget")))
        # The equal-budget comparison again with seeds 1 … rounds−1 (vanilla for its steps, adaptive and top-N
        # for the steps planned above, each cut at the budget): one seed's held-out loss moves by more than
        # the 5 % the target allows.
        repeats: dict[str, list[Path]] = {"vanilla": [], "adaptive": [], "top_n": []}
        for seed in range(1, rounds):
            for name, outs in repeats.items():
                planned = budget_runs[name]["steps"] if name in budget_runs else steps
                outs.append(Path(tmp) / f"{name}-seed{seed}")
                with spawn.Pool(1) as pool:
                    pool.apply(train_once, (name, model, str(home), planned, batch, threads,
                                            None if name == "vanilla" else budget, str(outs[-1]), seed))
        data = dataset.build(open_db(home), ChatTemplate.from_gguf(model), keep_facts=True)
        evaluator = gate.Evaluator(settings.model_path, n_ctx=512, threads=threads, base_sha256=None)

        def measured(path: Path | None) -> dict[str, float]:
            evaluator.use(path)
            return {"heldout_loss": round(evaluator.loss(data.heldout), 4),
                    "habit_logprob": round(habit_logprob(evaluator, path), 3)}

        try:
            quality = {"base": measured(None)}
            for name in runs:
                q = {when: measured(Path(tmp) / f"{name}.{when}.gguf")
                     for when in (("final", "until") if name != "adaptive" else ("final",))}
                quality[name] = {"equal_steps": q["final"], "equal_wall_time": q.get("until", q["final"])}
            for name in runs:
                quality[name]["equal_budget"] = (measured(Path(tmp) / f"{name}-budget.until.gguf")
                                                 if name in budget_runs else quality[name]["equal_steps"])
            by_seed = {name: [quality[name]["equal_budget"]["heldout_loss"]] for name in repeats}
            for name, outs in repeats.items():
                for out in outs:
                    evaluator.use(Path(f"{out}.until.gguf"))
                    by_seed[name].append(round(evaluator.loss(data.heldout), 4))
        finally:
            evaluator.close()
        votes = voting(settings.model_path, home / "cache", data, Path(tmp) / "adaptive.pt", threads)
    votes["llama_cpp"] = llama_voting_cost(settings.model_path, votes["exits"], threads)
    van, ada, top = runs["vanilla"], runs["adaptive"], runs["top_n"]
    compare = {
        "speedup_per_step_vs_vanilla": round(van["seconds_per_step_median"] / ada["seconds_per_step_median"], 2),
        "speedup_per_step_vs_vanilla_mean": round(van["seconds_per_step_mean"] / ada["seconds_per_step_mean"], 2),
        "memory_reduction_vs_vanilla": round(van["train_memory_mb"] / max(ada["train_memory_mb"], 1.0), 2),
        "heldout_loss_ratio_vs_vanilla_equal_time": round(
            quality["adaptive"]["equal_wall_time"]["heldout_loss"] / quality["vanilla"]["equal_wall_time"]["heldout_loss"], 3),
        "adaptive_vs_top_n_equal_time_loss": [quality["adaptive"]["equal_wall_time"]["heldout_loss"],
                                              quality["top_n"]["equal_wall_time"]["heldout_loss"]],
        "heldout_loss_ratio_vs_vanilla_equal_budget": round(
            quality["adaptive"]["equal_budget"]["heldout_loss"] / quality["vanilla"]["equal_budget"]["heldout_loss"], 3),
        "adaptive_vs_top_n_equal_budget_loss": [quality["adaptive"]["equal_budget"]["heldout_loss"],
                                                quality["top_n"]["equal_budget"]["heldout_loss"]],
        "adaptive_vs_upstream_schedule_equal_budget_loss": [
            quality["adaptive"]["equal_budget"]["heldout_loss"],
            quality["adaptive_upstream"]["equal_budget"]["heldout_loss"]],
        "equal_budget_by_seed": by_seed,
        # Judged on the seeds' mean (one seed alone when rounds is 1).
        "heldout_loss_ratio_vs_vanilla_equal_budget_mean": round(
            statistics.fmean(by_seed["adaptive"]) / statistics.fmean(by_seed["vanilla"]), 3),
    }
    compare["targets_met"] = {
        "speedup_per_step": compare["speedup_per_step_vs_vanilla"] >= TARGETS["speedup_per_step"],
        "memory_reduction": compare["memory_reduction_vs_vanilla"] >= TARGETS["memory_reduction"],
        "loss_within_5_percent":
            compare["heldout_loss_ratio_vs_vanilla_equal_budget_mean"] <= 1 + TARGETS["loss_within"]}
    return {"quick": quick, "steps": steps, "batch_size": batch, "threads": threads, "seeds": rounds,
            "targets": TARGETS,
            "inference_baseline": baseline, "runs": runs, "budget_seconds": budget, "budget_runs": budget_runs,
            "quality": quality, "compare": compare, "voting": votes}


def report(result: dict[str, Any]) -> str:
    """A few readable lines."""
    lines = [f"inference baseline peak RSS {result['inference_baseline']['peak_rss_mb']:.0f} MB"]
    for name, r in result["runs"].items():
        q = result["quality"][name]
        lines.append(f"{name:9} {r['seconds_per_step_median']:.2f} s/step (mean {r['seconds_per_step_mean']:.2f})  "
                     f"peak RSS {r['peak_rss_mb']:.0f} MB (+{r['train_memory_mb']:.0f} MB)  "
                     f"held-out {q['equal_steps']['heldout_loss']:.3f} at {r['steps']} steps, "
                     f"{q['equal_wall_time']['heldout_loss']:.3f} at equal time (step {r['at_equal_time']['step']})  "
                     f"habit log-p {q['equal_steps']['habit_logprob']:.2f}")
    for name, r in result.get("budget_runs", {}).items():
        lines.append(f"{name:9} in vanilla's {result['budget_seconds']:.1f} s: {r['steps']} steps planned, "
                     f"{r['at_equal_time']['step']} done in {r['at_equal_time']['seconds']:.1f} s, held-out "
                     f"{result['quality'][name]['equal_budget']['heldout_loss']:.3f}")
    c = result["compare"]
    for name, losses in c["equal_budget_by_seed"].items():
        lines.append(f"{name:9} at the equal budget, seeds 0-{len(losses) - 1}: "
                     f"{' '.join(f'{x:.3f}' for x in losses)} (mean {statistics.fmean(losses):.3f})")
    lines.append(f"adaptive vs vanilla: {c['speedup_per_step_vs_vanilla']}x faster/step, "
                 f"{c['memory_reduction_vs_vanilla']}x less training memory, held-out loss ratio "
                 f"{c['heldout_loss_ratio_vs_vanilla_equal_time']} at adaptive's time, "
                 f"{c['heldout_loss_ratio_vs_vanilla_equal_budget']} at an equal budget (seed 0), "
                 f"{c['heldout_loss_ratio_vs_vanilla_equal_budget_mean']} over the seeds' mean; "
                 f"targets met: {c['targets_met']}")
    v = result["voting"]
    for who in ("base", "adaptive"):
        last = f"exit_{v['exits'][-1]}"
        lines.append(f"voting ({who}): last exit acc {v[who][last]['accuracy']:.3f} nll {v[who][last]['nll']:.3f}; "
                     f"max acc {v[who]['vote_max']['accuracy']:.3f} nll {v[who]['vote_max']['nll']:.3f}; "
                     f"mean acc {v[who]['vote_mean']['accuracy']:.3f} nll {v[who]['vote_mean']['nll']:.3f}")
    c = v["llama_cpp"]
    lines.append(f"llama.cpp decode: {c['plain']['tokens_per_second']} tok/s as is, "
                 f"{c['callback']['tokens_per_second']} with cb_eval reading the exits, "
                 f"{c['callback_and_vote']['tokens_per_second']} voting in numpy")
    return "\n".join(lines)


def llama_voting_cost(model_path: Path, exit_layers: list[int], threads: int, tokens: int = 64) -> dict[str, Any]:
    """What voting would cost on the chat's path: greedy decode tok/s in llama.cpp as is, with a `cb_eval`
    callback copying the intermediate exits' `l_out-N` rows out of the graph, and with that plus the
    numpy work of voting per token (final RMS norm, a 49,152 × 576 head per intermediate exit, softmax,
    element-wise max, renormalise). The head here is random of the real shape: this measures cost only;
    what voting gains is measured in torch (`voting`)."""
    import ctypes

    import numpy as np
    import llama_cpp
    from llama_cpp import Llama
    from llama_cpp._internals import LlamaContext

    ggml = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    ggml.ggml_get_name.restype, ggml.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    ggml.ggml_nelements.restype, ggml.ggml_nelements.argtypes = ctypes.c_int64, [ctypes.c_void_p]
    ggml.ggml_get_data_f32.restype = ctypes.POINTER(ctypes.c_float)
    ggml.ggml_get_data_f32.argtypes = [ctypes.c_void_p]
    wanted = {f"l_out-{e}".encode() for e in exit_layers[:-1]}
    caught: dict[bytes, Any] = {}

    def observe(tensor: int, ask: bool, _user: int) -> bool:
        name = ggml.ggml_get_name(tensor)
        if ask:
            return name in wanted
        n = ggml.ggml_nelements(tensor)
        caught[name] = np.ctypeslib.as_array(ggml.ggml_get_data_f32(tensor), shape=(n,))[-576:].copy()
        return True

    callback = llama_cpp.ggml_backend_sched_eval_callback(observe)
    rng = np.random.default_rng(0)
    head = rng.standard_normal((49152, 576), dtype=np.float32)
    prompt = "Write a short note about gardening, in three paragraphs."
    result = {}
    for mode in ("plain", "callback", "callback_and_vote"):
        llm = Llama(str(model_path), n_ctx=256, n_threads=threads, verbose=False, seed=0)
        if mode != "plain":
            llm.context_params.cb_eval = callback
            llm._ctx = LlamaContext(model=llm._model, params=llm.context_params, verbose=False)
        produced, first = 0, 0.0
        messages = [{"role": "user", "content": prompt}]
        for _piece in llm.create_chat_completion(messages, max_tokens=tokens, temperature=0.0, stream=True):
            produced += 1
            if produced == 1:
                first = time.perf_counter()   # decode speed: from the first token on (the prompt excluded)
            if mode == "callback_and_vote":
                probs = []
                for h in caught.values():
                    x = h / np.sqrt((h * h).mean() + 1e-5)
                    z = head @ x
                    p = np.exp(z - z.max())
                    probs.append(p / p.sum())
                best = np.max(probs, axis=0)
                int(np.argmax(best / best.sum()))
        seconds = time.perf_counter() - first
        result[mode] = {"tokens_per_second": round((produced - 1) / seconds, 1), "tokens": produced,
                        "exits_seen": len(caught)}
        caught.clear()
        llm.close()
    return result
