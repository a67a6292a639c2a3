"""`ember bench NAME`: benchmarks, written to benchmarks/results/NAME.json."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import click

from assistant.cli.common import json_option, model_option, print_json, settings_from
from assistant.errors import InvalidInput

BENCHMARKS = {
    "engine": "Ember's engine vs bare llama-cpp-python: decode tok/s, time to first token, chat start-up",
    "embedder": "the embedder: onnxruntime (what Ember runs) vs sentence-transformers on torch: import, load, "
                "question latency, bulk throughput, peak RSS, agreement",
    "dense_skip": "the router's BM25-first rule on MemoryBank: questions not embedded, routes changed (must be 0)",
    "memory": "memory ingest throughput and search latency at 10k and 100k chunks",
    "recall": "recall@5/10 of evidence turns on MemoryBank: BM25, dense and hybrid side by side",
    "evidence": "memory you can trust on MemoryBank: echo of each memory style, answer F1/EM with and without "
                "the evidence first, the memory gate's precision and everyday requests kept off memory",
    "adapt": "DP and non-DP LoRA on a synthetic user: s/step, examples/s, peak RSS, learning, canary exposure",
    "layers": "which layers LoRA trains: vanilla (all, full backprop) vs top-N vs adaptive layer tuning with early "
              "exits (EDGE-LLM): s/step, training memory, held-out loss at equal wall time, habit; exit voting",
    "voting": "combining the early exits' next-token distributions (last exit, max-confidence, average, and a "
              "mixture weighted on a bank of the user's held-out examples) on held-out data and MemoryBank's probes",
    "zo": "forward-only (ZO) training vs backprop: peak RSS against inference, held-out loss at equal wall time, canary",
    "router": "base, RAG, adapter, both and the router on facts (MemoryBank) and style tasks: quality and latency",
    "serve": "ember serve: ember ask through the resident engine vs a bare llama-cpp-python script (whole "
             "processes), 1/4/16 streaming clients (ttft p50/p95, tok/s, 429s), and nothing lost",
    "models": "every architecture Ember trains (tiny qwen2, llama 3, mistral, qwen3, gemma2, gemma3, phi3 GGUFs and the "
              "bundled SmolLM2): load, s/LoRA step, peak RSS, export, parity KL, hot-swap",
    "train_memory": "peak RSS of LoRA training per model size (tiny Llama-3-shaped GGUFs of 3 widths and the bundled "
                    "SmolLM2), float32 vs bfloat16: the MB per parameter the daemon's memory check uses",
    "import": "ember import of a synthetic ChatGPT export (2,000 conversations, 40,000 messages): time, peak RSS, "
              "search p95 after it, and a re-import that adds nothing",
    "compress": "ember compress (LUC) at uniform Q4_1's size vs uniform Q4_0/Q4_1/Q5_1/Q8_0 and a random mix: "
                "file size, held-out perplexity and KL in llama.cpp, prompt and decode tok/s",
    "federated": "household learning on Flower, 3 devices in one process: FedAvg-LoRA vs FedKSeed-ZO vs each alone "
                 "(held-out by round, habit on the device that never saw it, bytes/round, wall time, canary)",
    "federated_wire": "household learning over real processes (serve + 2 joins, TLS, node auth): bytes a device "
                      "sends per round on the wire vs its reply messages, its text absent from the stream, wall time",
}
# A benchmark whose name is a Python keyword lives in a module of another name.
MODULES = {"import": "imports"}


@click.command()
@click.argument("name", required=False)
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("benchmarks/results"), show_default=True)
@click.option("--quick", is_flag=True,
              help="A small run that checks the benchmark works (engine: 500 memory chunks, not 10,000).")
@model_option
@json_option
def bench(name, rounds, output_dir, model, as_json, quick):
    """Run benchmark NAME (omit it to list them)."""
    if name is None:
        for key, what in BENCHMARKS.items():
            click.echo(f"{key:10} {what}")
        return
    if name not in BENCHMARKS:
        raise InvalidInput(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    module = benchmark_module(name)
    from benchmarks.common import write_result

    settings = settings_from(model=model)
    result = module.run(settings, rounds=rounds, **({"quick": True} if quick else {}))
    path = write_result(output_dir, name, result)
    if as_json:
        print_json(result)
    else:
        click.echo(module.report(result))
        click.echo(f"written to {path}")


def benchmark_module(name: str) -> Any:
    """Ember's `benchmarks.<module>` for benchmark `name`.

    Another installed distribution may ship a top-level `benchmarks` package too (Opacus 1.6 does, with a
    `layers` module of its own), and the `ember` console script, whose sys.path starts with its bin
    folder, would find that one first: an editable install's finder comes after site-packages. So the
    folder holding Ember's `benchmarks` goes first on sys.path (the benchmarks' spawned processes inherit
    it) and a foreign `benchmarks` already imported is forgotten. Raises `InvalidInput` when this install
    has no benchmarks folder."""
    root = Path(__file__).resolve().parents[2]        # assistant/cli/bench.py -> the folder of assistant/
    ours = root / "benchmarks" / "__init__.py"
    if not ours.is_file():
        raise InvalidInput(f"ember bench needs the benchmarks/ folder of Ember's source beside {root / 'assistant'}")
    if sys.path[:1] != [str(root)]:
        sys.path.insert(0, str(root))
    loaded = sys.modules.get("benchmarks")
    if loaded is not None and Path(getattr(loaded, "__file__", None) or "/").resolve() != ours.resolve():
        for key in [k for k in sys.modules if k == "benchmarks" or k.startswith("benchmarks.")]:
            del sys.modules[key]
    return importlib.import_module(f"benchmarks.{MODULES.get(name, name)}")


COMMANDS = [bench]
