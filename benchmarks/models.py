"""Every architecture Ember trains, measured: the tiny random-weight GGUF of each (benchmarks/tiny_models.py,
Q8_0) and the bundled SmolLM2-135M (Q4_1), the baseline, in the same run.

Per model, in a fresh process (so peak RSS is the model's own): the base loaded into torch the first time
(transformers dequantizes the GGUF; Ember caches the weights), torch and transformers imported first and timed apart; the load from Ember's cache, as later runs do),
the LoRA trainer's seconds per step
without DP (batch 8, rank 2 on q/v/o of the top 2 layers, the habit user's log), the process's peak RSS,
the adapter's export time, parity (KL of llama.cpp with a random adapter on every projection of every
layer against torch with it merged, next to the base model's own KL) and the hot-swap time (load +
apply on a loaded llama.cpp model). Then the same LoRA steps in float32 and in bfloat16, each in a fresh
process of its own with the cache warm (and the bf16 copy written beforehand, as every run after the first
finds it): peak RSS and seconds per step per dtype, side by side (`LoraConfig.dtype`).
"""
from __future__ import annotations

import multiprocessing
import tempfile
import time
from pathlib import Path
from typing import Any

from assistant.config import Settings

ARCHS = ("qwen2", "llama3", "mistral", "qwen3", "gemma2", "gemma3", "phi3")
PROMPT = "The capital of France is Paris. The capital of Italy is"
STEPS = 10
CONVERSATIONS = 40


def random_lora(base: Any, arch: Any, rank: int = 4, seed: int = 0, scale: float = 0.3) -> dict[str, tuple[Any, Any]]:
    """LoRA (A r×in, B out×r) on every projection of every layer, large enough to move the output
    (peft's B=0 start would prove nothing)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(base.config.num_hidden_layers):
        for module in dict.fromkeys(arch.modules.values()):
            name = f"model.layers.{layer}.{module}"
            out_f, in_f = base.get_submodule(name).weight.shape
            weights[name] = (torch.randn(rank, in_f, generator=gen) / in_f ** 0.5,
                             torch.randn(out_f, rank, generator=gen) * scale / rank ** 0.5)
    return weights


def torch_probs(base: Any, tokens: list[int], weights: dict[str, tuple[Any, Any]], alpha: float, rank: int) -> Any:
    """Next-token distribution of torch with ΔW = (α/r)·B·A merged into the base weights (restored after)."""
    import torch

    saved = {}
    with torch.no_grad():
        for module, (a, b) in weights.items():
            linear = base.get_submodule(module)
            saved[module] = linear.weight.clone()
            linear.weight += (alpha / rank) * b @ a
        logits = base(torch.tensor([tokens])).logits[0, -1].double()
        for module, weight in saved.items():
            base.get_submodule(module).weight.copy_(weight)
    return torch.softmax(logits, -1).numpy()


def llama_probs(llm: Any, tokens: list[int]) -> Any:
    """llama.cpp's next-token distribution after `tokens`."""
    import numpy as np

    llm.reset()
    llm.eval(tokens)
    logits = np.asarray(llm.scores[len(tokens) - 1], dtype=np.float64)
    p = np.exp(logits - logits.max())
    return p / p.sum()


def kl(p: Any, q: Any) -> float:
    """KL(p‖q) in nats."""
    import numpy as np

    return float(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12))))


def measure(model_path: str, home: str, threads: int, steps: int) -> dict[str, Any]:
    """One model, in a fresh process: load, LoRA steps, peak RSS, export, parity, hot-swap."""
    from adapters import architectures, dataset, export, lora, runtime
    from adapters.base import file_sha256, load_base
    from adapters.llama_log import quiet_llama
    from adapters.pipeline import process_peak_mb
    from adapters.template import ChatTemplate
    from benchmarks.synthetic_user import seed_habit_user
    from storage.db import open_db

    path, cache = Path(model_path), Path(home) / "cache"
    db = open_db(Path(home))
    seed_habit_user(db, CONVERSATIONS)
    data = dataset.build(db, ChatTemplate.from_gguf(model_path), max_len=96)
    arch = architectures.of_gguf(path)
    started = time.perf_counter()
    import torch  # noqa: F401 - timed apart: every model pays it once per process
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401
    import_seconds = time.perf_counter() - started
    started = time.perf_counter()
    load_base(path, cache, threads=threads)          # dequantizes the GGUF, writes the cache
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    base = load_base(path, cache, threads=threads)   # what every later run does
    cached_seconds = time.perf_counter() - started
    trained = lora.train(path, cache, data, lora.LoraConfig(epsilon=None, steps=steps, batch_size=8, threads=threads))
    peak = process_peak_mb()
    sha = file_sha256(path, cache)
    started = time.perf_counter()
    trained_file = export.write_lora_gguf(Path(home) / "trained.gguf", trained.weights, alpha=16.0,
                                          n_head=trained.n_head, n_head_kv=trained.n_head_kv, base_sha256=sha,
                                          base_name=path.name, architecture=arch.name)
    export_seconds = time.perf_counter() - started
    weights = random_lora(base, arch)
    adapter = export.write_lora_gguf(Path(home) / "random.gguf", weights, alpha=8, n_head=trained.n_head,
                                     n_head_kv=trained.n_head_kv, base_sha256=sha, base_name=path.name,
                                     architecture=arch.name)
    llm = quiet_llama(model_path=model_path, n_ctx=256, logits_all=True, n_threads=threads)
    try:
        tokens = llm.tokenize(PROMPT.encode())
        plain = torch_probs(base, tokens, {}, 8, 4)
        base_gap = kl(plain, llama_probs(llm, tokens))
        started = time.perf_counter()
        loaded = runtime.load(llm, trained_file, base_sha256=sha)
        runtime.apply(llm, loaded)
        swap_ms = (time.perf_counter() - started) * 1000
        runtime.apply(llm, None)
        runtime.free(loaded)
        random_loaded = runtime.load(llm, adapter, base_sha256=sha)
        runtime.apply(llm, random_loaded)
        adapted = llama_probs(llm, tokens)
        runtime.apply(llm, None)
        runtime.free(random_loaded)
    finally:
        llm.close()
    return {"model": path.name, "architecture": arch.name, "model_type": base.config.model_type,
            "layers": base.config.num_hidden_layers, "width": base.config.hidden_size,
            "file_mb": round(path.stat().st_size / 2 ** 20, 1),
            "import_seconds": round(import_seconds, 2), "load_seconds": round(load_seconds, 2),
            "load_cached_seconds": round(cached_seconds, 2), "seconds_per_lora_step": round(trained.seconds / steps, 3),
            "train_loss_first": round(trained.losses[0], 3), "train_loss_last": round(trained.losses[-1], 3),
            "peak_rss_mb": round(peak, 1), "export_seconds": round(export_seconds, 3),
            "parity_kl_base": round(base_gap, 6), "parity_kl_adapter": round(kl(torch_probs(base, tokens, weights, 8, 4),
                                                                                  adapted), 6),
            "adapter_effect_kl": round(kl(plain, adapted), 4), "hot_swap_ms": round(swap_ms, 2)}


def measure_dtype(model_path: str, home: str, threads: int, steps: int, dtype: str) -> dict[str, Any]:
    """The LoRA steps alone, in this (fresh) process, the frozen base held in `dtype`: peak RSS, s/step."""
    from adapters import dataset, lora
    from adapters.pipeline import process_peak_mb
    from adapters.template import ChatTemplate
    from benchmarks.synthetic_user import seed_habit_user
    from storage.db import open_db

    folder = Path(tempfile.mkdtemp(dir=home))
    db = open_db(folder)
    seed_habit_user(db, CONVERSATIONS)
    data = dataset.build(db, ChatTemplate.from_gguf(model_path), max_len=96)
    trained = lora.train(Path(model_path), Path(home) / "cache", data,
                         lora.LoraConfig(epsilon=None, steps=steps, batch_size=8, threads=threads, dtype=dtype))
    return {"peak_rss_mb": round(process_peak_mb(), 1), "seconds_per_step": round(trained.seconds / steps, 3)}


def run(settings: Settings, rounds: int = 1, quick: bool = False) -> dict[str, Any]:
    """Measure every architecture fixture and the bundled model, each in a fresh process."""
    from adapters.base import bf16_supported
    from benchmarks import tiny_models
    from benchmarks.train_memory import DTYPES, warm

    archs = ARCHS[:2] if quick else ARCHS
    steps = 3 if quick else STEPS
    spawn = multiprocessing.get_context("spawn")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        fixtures = Path(folder) / "fixtures"
        started = time.perf_counter()
        models = [str(tiny_models.build(name, fixtures, settings.model_path)["Q8_0"]) for name in archs]
        build_seconds = time.perf_counter() - started
        for model in [str(settings.model_path), *models]:
            home = tempfile.mkdtemp(dir=folder)
            with spawn.Pool(1) as pool:
                row = pool.apply(measure, (model, home, settings.threads, steps))
            for dtype in DTYPES:
                with spawn.Pool(1) as pool:
                    pool.apply(warm, (model, str(Path(home) / "cache"), dtype))
                with spawn.Pool(1) as pool:
                    row[dtype] = pool.apply(measure_dtype, (model, home, settings.threads, steps, dtype))
            rows.append(row)
    return {"quick": quick, "steps": steps, "fixture_build_seconds": round(build_seconds, 1),
            "bf16_supported": bf16_supported(), "models": rows}


def report(result: dict[str, Any]) -> str:
    """A table, one model a line."""
    lines = [f"{'model':34} {'arch':7} {'load s':>7} {'cached':>7} {'s/step':>7} {'RSS MB':>7} {'KL base':>9} "
             f"{'KL +LoRA':>9} {'effect':>7} {'swap ms':>8} {'f32 MB':>7} {'bf16 MB':>7} {'f32 s':>6} {'bf16 s':>6}"]
    for r in result["models"]:
        f32, bf16 = r.get("float32", {}), r.get("bfloat16", {})
        lines.append(f"{r['model'][:34]:34} {r['architecture']:7} {r['load_seconds']:7.2f} {r['load_cached_seconds']:7.2f} "
                     f"{r['seconds_per_lora_step']:7.3f} {r['peak_rss_mb']:7.0f} {r['parity_kl_base']:9.5f} "
                     f"{r['parity_kl_adapter']:9.5f} {r['adapter_effect_kl']:7.3f} {r['hot_swap_ms']:8.2f} "
                     f"{f32.get('peak_rss_mb', float('nan')):7.0f} {bf16.get('peak_rss_mb', float('nan')):7.0f} "
                     f"{f32.get('seconds_per_step', float('nan')):6.3f} {bf16.get('seconds_per_step', float('nan')):6.3f}")
    return "\n".join(lines)
