"""Layer-wise unified compression (LUC) against uniform types and a random mix, in one run.

On the default model: the sensitivity of every block to every candidate type is measured on the shipped
calibration text (the Declaration of Independence), LUC's policy is chosen at the file size of uniform
Q4_1, and every variant is written by llama.cpp's quantiser and measured in llama.cpp on a held-out text
of another author (Lincoln's Gettysburg Address and Second Inaugural): file size, perplexity, KL to the
reference (the source file's own next-token distributions), prompt and decode tok/s.

The reference is the source file itself. For the bundled SmolLM2 that is Q4_1 (its only shipped file):
uniform Q4_1 then reproduces it exactly (llama.cpp copies a tensor whose type does not change), and no
policy of the same size can come closer to it; the target is reported as measured.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from assistant.config import Settings

HELDOUT = Path(__file__).parent / "data" / "lincoln.txt"
UNIFORM = ("Q4_0", "Q4_1", "Q5_1", "Q8_0")
RANDOM_SEEDS = 3


def _speed(path: Path, prompt: list[int], threads: int, decode: int) -> tuple[float, float]:
    """(prompt tok/s, decode tok/s) in llama.cpp, no logits kept but the last."""
    from adapters.llama_log import quiet_llama

    llm = quiet_llama(model_path=str(path), n_ctx=len(prompt) + decode + 8, n_batch=len(prompt),
                      n_threads=threads, n_threads_batch=threads, seed=0)
    import llama_cpp
    import numpy as np

    def last() -> int:   # greedy next token from the last position's logits
        row = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return int(np.ctypeslib.as_array(row, shape=(llm.n_vocab(),)).argmax())

    try:
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt)
        prompt_tps = len(prompt) / (time.perf_counter() - started)
        token = last()
        started = time.perf_counter()
        for _ in range(decode):
            llm.eval([token])
            token = last()
        return prompt_tps, decode / (time.perf_counter() - started)
    finally:
        llm.close()


def _whole(text: list[int] | list[list[int]], limit: int) -> list[list[int]]:
    """One token list cut to `limit`, or whole sequences of a list of them up to `limit` tokens in all."""
    if not text or isinstance(text[0], int):
        return [list(text[:limit])]
    kept: list[list[int]] = []
    for seq in text:
        if kept and sum(map(len, kept)) + len(seq) > limit:
            break
        kept.append(list(seq))
    return kept


def _heldout_scores(path: Path, sequences: list[list[int]], threads: int,
                    reference: list[Any] | None) -> tuple[list[Any], float, float]:
    """(logits per sequence, KL to `reference` per token, NLL per predicted token) of `path` in llama.cpp,
    each sequence in a fresh context; with no `reference`, the KL is 0 against itself."""
    from adapters import compress
    from assistant import compression

    outs = [compression.logits(path, seq, threads) for seq in sequences]
    kl_sum = nll_sum = 0.0
    for seq, out, ref in zip(sequences, outs, reference or outs):
        kl, nll = compress.kl_nll(ref, out, seq)
        kl_sum, nll_sum = kl_sum + kl * len(seq), nll_sum + nll * (len(seq) - 1)
    return outs, kl_sum / sum(map(len, sequences)), nll_sum / sum(len(s) - 1 for s in sequences)


def run(settings: Settings, *, rounds: int = 1, quick: bool = False,
        texts: tuple[tuple[str, list[int] | list[list[int]]], tuple[str, list[int] | list[list[int]]]] | None = None,
        source_note: str | None = None, sizes: tuple[int, int] | None = None) -> dict[str, Any]:
    """Measure sensitivity, choose LUC at uniform Q4_1's size, write and measure every variant.

    `texts`: ((name, tokens) to calibrate on, (name, tokens) held out) instead of the shipped prose, for a
    model that reads something else (benchmarks/luc_f32.py); `source_note` then says what the source is.
    Either text may be a list of sequences (a model's chats), each then read in a fresh context, whole
    sequences kept up to the token count. `sizes`: (calibration, held-out) token counts
    instead of (256, 512)."""
    from adapters import compress
    from adapters.llama_log import quiet_llama
    from assistant import compression
    from benchmarks.common import machine

    source = settings.model_path
    threads = settings.threads
    n_calib, n_held = (48, 96) if quick else sizes or (256, 512)
    types = ("Q4_0", "Q4_1", "Q5_1", "Q8_0") if quick else compress.CANDIDATES
    if texts is None:
        vocab = quiet_llama(model_path=str(source), vocab_only=True)
        bos = [vocab.token_bos()]
        calib = bos + vocab.tokenize(compression.BUILTIN_TEXT.read_bytes(), add_bos=False)[:n_calib - 1]
        held = bos + vocab.tokenize(HELDOUT.read_bytes(), add_bos=False)[:n_held - 1]
        vocab.close()
        calib_name, held_name = compression.BUILTIN_NAME, "Lincoln: Gettysburg Address and Second Inaugural (public domain)"
    else:
        (calib_name, calib), (held_name, held) = texts
    calib_seqs, sequences = _whole(calib, n_calib), _whole(held, n_held)
    calib = [t for seq in calib_seqs for t in seq]

    sens = compress.measure(source, calib, types=types, threads=threads, lengths=[len(s) for s in calib_seqs],
                            calibration="builtin" if texts is None else calib_name)
    policies = {f"uniform {t}": compress.uniform(sens, t) for t in UNIFORM if t in types}
    budget = policies["uniform Q4_1"].bytes
    policies["LUC"] = compress.assign(sens, size_bytes=budget)
    for seed in range(RANDOM_SEEDS):
        policies[f"random mix {seed}"] = compress.random_policy(sens, budget, seed=seed)
    # Halfway between uniform Q4_0 and Q4_1: where mixing types has room to matter against this reference.
    middle = (compress.uniform(sens, "Q4_0").bytes + budget) // 2
    policies["LUC (mid)"] = compress.assign(sens, size_bytes=middle)
    for seed in range(RANDOM_SEEDS):
        policies[f"random mix {seed} (mid)"] = compress.random_policy(sens, middle, seed=seed)
    stored = compress.source_types(source)
    reference, _, ref_nll = _heldout_scores(source, sequences, threads, None)
    variants: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ember-bench-compress-") as tmp:
        for name, policy in policies.items():
            path = Path(tmp) / f"{name.replace(' ', '_')}.gguf"
            compress.write(source, path, policy, source_types=stored, threads=threads)
            _, kl, nll = _heldout_scores(path, sequences, threads, reference)
            prompt = [t for seq in sequences for t in seq][:128]
            speeds = [_speed(path, prompt, threads, 16 if quick else 32) for _ in range(max(1, rounds))]
            variants[name] = {
                "bytes": path.stat().st_size, "mb": round(path.stat().st_size / 1e6, 2),
                "predicted_bytes": policy.bytes, "perplexity": round(compress.perplexity(nll), 3),
                "nll": round(nll, 4), "kl_to_reference": round(kl, 5), "predicted_kl": round(policy.kl, 5),
                "prompt_tok_s": round(max(s[0] for s in speeds), 1), "decode_tok_s": round(max(s[1] for s in speeds), 1),
                "types": policy.counts(), "policy": policy.as_json()["types"]}
            os.unlink(path)
    def target(luc: str, tag: str) -> dict[str, Any]:
        ppl = variants[luc]["perplexity"]
        uniform_rivals = [n for n, v in variants.items()
                          if n.startswith("uniform") and v["bytes"] <= variants[luc]["bytes"]]
        randoms = [n for n in variants if n.startswith("random") and n.endswith(tag)]
        return {"compared_with": uniform_rivals + randoms,
                "beats_uniform": {n: ppl < variants[n]["perplexity"] for n in uniform_rivals},
                "beats_random": {n: ppl < variants[n]["perplexity"] for n in randoms},
                "met": all(ppl < variants[n]["perplexity"] for n in uniform_rivals + randoms)}

    at_q4_1 = target("LUC", "")
    at_q4_1["compared_with"] = [n for n in at_q4_1["compared_with"] if "(mid)" not in n]
    at_q4_1["beats_random"] = {n: b for n, b in at_q4_1["beats_random"].items() if "(mid)" not in n}
    at_q4_1["met"] = all(at_q4_1["beats_uniform"].values()) and all(at_q4_1["beats_random"].values())
    return {
        "machine": machine(), "model": source.name, "threads": threads, "quick": quick,
        "load_average": os.getloadavg(),
        "reference": source_note or (f"{source.name} itself (dequantised; its blocks are stored as "
                                   f"{', '.join(sorted(set(sens.source_types)))}): the only file of this model shipped here"),
        "calibration": {"text": calib_name, "tokens": len(calib), "sequences": len(calib_seqs)},
        "heldout": {"text": held_name, "tokens": sum(map(len, sequences)), "sequences": len(sequences),
                    "reference_perplexity": round(compress.perplexity(ref_nll), 3)},
        "sensitivity": {"seconds": sens.seconds, "types": list(types),
                        "kl": [{t: round(b[t]["kl"], 5) for t in types} for b in sens.blocks]},
        "budget_bytes": budget, "middle_budget_bytes": middle, "variants": variants,
        "target": {"rule": "LUC perplexity lower than every uniform type of equal or smaller size and than the "
                           "random mixes of the same size (the issue's target: at uniform Q4_1's size)",
                   **at_q4_1},
        "at_middle_budget": target("LUC (mid)", "(mid)"),
    }


def report(result: dict[str, Any]) -> str:
    """A few readable lines."""
    lines = [f"reference: {result['reference']}",
             f"held-out: {result['heldout']['tokens']} tokens, reference perplexity "
             f"{result['heldout']['reference_perplexity']}"]
    for name, v in result["variants"].items():
        lines.append(f"{name:14} {v['mb']:7.2f} MB  ppl {v['perplexity']:8.3f}  KL {v['kl_to_reference']:.4f}  "
                     f"prompt {v['prompt_tok_s']:6.1f} tok/s  decode {v['decode_tok_s']:5.1f} tok/s  {v['types']}")
    target = result["target"]
    lines.append(f"target ({target['rule']}): {'met' if target['met'] else 'NOT met'}")
    mid = result["at_middle_budget"]
    lines.append(f"at {result['middle_budget_bytes'] / 1e6:.2f} MB: LUC beats {sum(mid['beats_random'].values())} of "
                 f"{len(mid['beats_random'])} random mixes and {sum(mid['beats_uniform'].values())} of "
                 f"{len(mid['beats_uniform'])} smaller uniform types")
    return "\n".join(lines)
