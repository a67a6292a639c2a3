"""Peak memory of LoRA training per model size, float32 against bfloat16: the figure the daemon's memory
check scales by the parameter count of the user's model (assistant/daemon.py).

Models: Llama-3-shaped tiny random-weight GGUFs (benchmarks/tiny_models.py, Q8_0) of three widths and
four layers, and the bundled SmolLM2-135M (Q4_1). Each run is a fresh process on the same synthetic
habit user (40 conversations): the base loaded from Ember's cache (dequantized beforehand, and for
bfloat16 its bf16 copy written beforehand, as every run after the first finds them), then Ember's LoRA
trainer (DP ε=8, batch 8, rank 2 on q/v/o of the top 2 layers) for `steps` steps; peak RSS is the
process's. A line through (parameters, peak) per dtype gives MB per million parameters and a fixed part.
"""
from __future__ import annotations

import multiprocessing
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from assistant.config import Settings

WIDTHS = (256, 512, 1024)
LAYERS = 4
DTYPES = ("float32", "bfloat16")
CONVERSATIONS = 40


def parameters(path: Path) -> int:
    """Parameters in a GGUF model (elements of every tensor), read from its header."""
    from adapters.base import gguf_parameters

    return gguf_parameters(path)


def warm(model_path: str, cache: str, dtype: str) -> None:
    """Dequantize once (and write the dtype's copy), so the measured run loads as later runs do."""
    from adapters.base import load_base

    load_base(Path(model_path), Path(cache), threads=2, dtype=dtype)


def measure(model_path: str, cache: str, dtype: str, steps: int, threads: int) -> dict[str, Any]:
    """One LoRA run in this (fresh) process; its peak RSS and time."""
    from adapters import dataset, lora
    from adapters.pipeline import process_peak_mb
    from adapters.template import ChatTemplate
    from benchmarks.synthetic_user import seed_habit_user
    from storage.db import open_db

    home = Path(tempfile.mkdtemp(dir=cache))
    db = open_db(home)
    seed_habit_user(db, CONVERSATIONS)
    data = dataset.build(db, ChatTemplate.from_gguf(model_path), max_len=96)
    started = time.perf_counter()
    trained = lora.train(Path(model_path), Path(cache), data,
                         lora.LoraConfig(epsilon=8.0, steps=steps, batch_size=8, threads=threads, dtype=dtype))
    return {"seconds": round(time.perf_counter() - started, 2),
            "seconds_per_step": round(trained.seconds / steps, 3), "peak_rss_mb": round(process_peak_mb(), 1)}


def _fit(points: list[tuple[float, float]]) -> dict[str, float]:
    """Least-squares line MB = fixed + per_million × (parameters / 1e6)."""
    n = len(points)
    mx, my = sum(p for p, _ in points) / n, sum(m for _, m in points) / n
    slope = sum((p - mx) * (m - my) for p, m in points) / sum((p - mx) ** 2 for p, _ in points)
    return {"mb_per_million_params": round(slope, 3), "fixed_mb": round(my - slope * mx, 1)}


def run(settings: Settings, rounds: int = 1, quick: bool = False) -> dict[str, Any]:
    """Every size × dtype, each in a fresh process; the fitted line per dtype."""
    from adapters.base import bf16_supported
    from benchmarks import tiny_models

    widths = WIDTHS[:2] if quick else WIDTHS
    steps = 2 if quick else 5
    spawn = multiprocessing.get_context("spawn")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        fixtures, cache = Path(folder) / "fixtures", Path(folder) / "cache"
        cache.mkdir(mode=0o700)
        models = [tiny_models.build("llama3", fixtures, settings.model_path, width=w, layers=LAYERS)["Q8_0"]
                  for w in widths]
        for model in [*models, settings.model_path]:
            for dtype in DTYPES:
                with spawn.Pool(1) as pool:
                    pool.apply(warm, (str(model), str(cache), dtype))
                with spawn.Pool(1) as pool:
                    row = pool.apply(measure, (str(model), str(cache), dtype, steps, settings.threads))
                rows.append({"model": Path(model).name, "parameters": parameters(Path(model)), "dtype": dtype, **row})
    fits = {dtype: _fit([(r["parameters"] / 1e6, r["peak_rss_mb"]) for r in rows if r["dtype"] == dtype])
            for dtype in DTYPES}
    return {"quick": quick, "steps": steps, "bf16_supported": bf16_supported(), "machine": platform.machine(),
            "rows": rows, "fit": fits}


def report(result: dict[str, Any]) -> str:
    """One line per model and dtype, then the fitted lines."""
    lines = [f"{'model':40} {'params':>12} {'dtype':9} {'peak MB':>8} {'s/step':>7}"]
    for r in result["rows"]:
        lines.append(f"{r['model'][:40]:40} {r['parameters']:12,} {r['dtype']:9} {r['peak_rss_mb']:8.0f} "
                     f"{r['seconds_per_step']:7.3f}")
    for dtype, fit in result["fit"].items():
        lines.append(f"{dtype}: {fit['fixed_mb']:.0f} MB + {fit['mb_per_million_params']:.2f} MB per million parameters")
    return "\n".join(lines)
