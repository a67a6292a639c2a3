"""LUC from an unquantised source: `ember bench compress`'s comparison on a model whose reference is F32.

The bundled SmolLM2 ships only as Q4_1, which makes uniform Q4_1 its exact copy (benchmarks/compress.py).
No F16 chat model ships here, so this builds one: the tiny Llama 3 of benchmarks/tiny_models.py, 6 layers
of width 256, trained (all weights) on the chat corpus `tiny_models.chat_corpus()` until it answers in its
style, written as F32. Calibration and held-out text are conversations of that corpus in the model's
chat template (seeds 1 and 2), the text it reads, each chat in a fresh context as in its training (the
calibration chats packed for the torch reference: `Reference.logits(lengths=…)`). The shipped prose is
out of its reach (perplexity ~10⁶ there, above its vocabulary's size).

The model trains on the corpora of seeds 10-39 together (`--corpus-seeds`), 30 task → tip pairings of
each task, so that it learns that any of the five tips may follow a task. Trained on one seed's pairing
alone, and read with its chats joined in one context (the 2026-11-30 run), it was sure of one tip per
task, wrong on the held-out seeds' pairings and out of its depth after the first chat; quantisation
noise then lowered its perplexity (73.8 for F32, 64.4 for uniform Q4_1), and perplexity could not rank
the variants.

    python -m benchmarks.luc_f32 [--steps 1200] [--corpus-seeds 10-39] [--folder DIR]

writes benchmarks/results/compress_f32.json and prints the same lines as `ember bench compress`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import storage  # noqa: F401  (Ember's SQLite driver first)
from assistant.config import Settings, bundled_model, load_settings
from benchmarks import compress, tiny_models
from benchmarks.common import write_result


def corpus_chats(model: Path, seed: int) -> list[list[int]]:
    """Every (question, answer) of `chat_corpus(seed)` as one chat each, in the model's template."""
    from adapters.template import ChatTemplate

    template = ChatTemplate.from_gguf(str(model))
    chats = []
    for question, answer in tiny_models.chat_corpus(seed):
        prefix, target = template.target([{"role": "user", "content": question}],
                                         {"role": "assistant", "content": answer})
        chats.append(list(prefix) + list(target))
    return chats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200, help="pretraining steps (1200: ~4 min on 2 cores)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/ember-luc-f32"))
    parser.add_argument("--corpus-seeds", default="10-39", help="FIRST-LAST: the chat corpora trained on")
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    parser.add_argument("--heldout-tokens", type=int, default=2048)
    parser.add_argument("--reuse", action="store_true", help="use the model already in --folder (same --steps)")
    args = parser.parse_args()
    first, last = (int(x) for x in args.corpus_seeds.split("-"))
    seeds = range(first, last + 1)
    if {1, 2} & set(seeds):
        parser.error("--corpus-seeds must leave out seeds 1 and 2 (calibration and held-out text)")
    started = time.perf_counter()
    source = args.folder / f"tiny-llama3-w{tiny_models.WIDTH}-l{args.layers}-chat-seeds{first}-{last}.F32.gguf"
    built = None     # reused: built by an earlier run
    if not (args.reuse and source.is_file()):
        tiny_models.pretrained("llama3", args.folder, bundled_model(), steps=args.steps, layers=args.layers,
                               corpus_seeds=seeds)
        built = round(time.perf_counter() - started, 1)
    settings: Settings = load_settings({"model": source})
    texts = ((f"tiny_models.chat_corpus(seed=1) in the model's chat template, each chat in a fresh context",
              corpus_chats(source, 1)),
             (f"tiny_models.chat_corpus(seed=2) in the model's chat template, each chat in a fresh context",
              corpus_chats(source, 2)))
    result = compress.run(settings, texts=texts, sizes=(args.calibration_tokens, args.heldout_tokens),
                          source_note=f"{source.name}: F32, the tiny Llama 3 ({args.layers} layers, width "
                                    f"{tiny_models.WIDTH}) after {args.steps} steps on the chat corpora of "
                                    f"seeds {first}-{last}")
    result["model_built_seconds"] = built
    path = write_result(Path("benchmarks/results"), "compress_f32", result)
    print(compress.report(result))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
