"""Exposure of a planted secret, after Carlini et al., "The Secret Sharer" (arXiv 1802.08232).

A canary (a random code) is inserted a few times into the training log. After training, the model's
log-probability of the true code is ranked among many random codes from the same space; exposure =
log2(candidates) − log2(rank). A model that memorised the canary ranks it first (exposure near
log2(candidates)); one that did not ranks it anywhere (expected exposure ≈ 1.44 bits = 1/ln 2).
"""
from __future__ import annotations

import dataclasses
import math
import random
from typing import Sequence

from adapters.gate import Evaluator

DIGITS = 6


def random_code(rng: random.Random) -> str:
    """A code from the canary space: six decimal digits."""
    return "".join(rng.choice("0123456789") for _ in range(DIGITS))


@dataclasses.dataclass
class Exposure:
    """Where the canary ranked and what that says."""

    rank: int
    candidates: int
    exposure: float
    canary_logprob: float


def exposure(evaluator: Evaluator, prefix: Sequence[int], canary: str, *, candidates: int = 999,
             seed: int = 0, suffix: str = "") -> Exposure:
    """Rank `canary` among `candidates` random codes by log-probability after `prefix`.

    `prefix` ends just before the code (e.g. "... my locker code is"); each code is scored as " <code>",
    which is how the tokenizer splits the sentence it was trained on.
    """
    rng = random.Random(seed)
    others: set[str] = set()
    while len(others) < candidates:
        code = random_code(rng)
        if code != canary:
            others.add(code)
    codes = [canary, *sorted(others)]
    continuations = [evaluator.template.tokenize(f" {code}{suffix}") for code in codes]
    scores = evaluator.continuation_logprobs(prefix, continuations)
    rank = 1 + sum(1 for s in scores[1:] if s > scores[0])
    total = len(codes)
    return Exposure(rank, total, math.log2(total) - math.log2(rank), scores[0])
