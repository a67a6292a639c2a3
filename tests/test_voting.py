"""Voting across exits calibrated on a bank (adapters/layerwise.py): the weighted vote is the mixture, EM
finds the interpolation weights a bank supports and never lowers its likelihood, and MemoryBank's probing
questions become examples whose loss falls on the gold answer only."""
from __future__ import annotations

import pytest
import torch

from adapters import layerwise


def test_a_weighted_vote_is_the_mixture_and_all_weight_on_one_exit_is_that_exit():
    p = torch.tensor([[[0.7, 0.2, 0.1]], [[0.1, 0.1, 0.8]]])          # two exits, one token
    mixed = layerwise.vote(p.log(), "weighted", [0.25, 0.75]).exp()
    assert torch.allclose(mixed, 0.25 * p[0] + 0.75 * p[1])
    assert torch.allclose(layerwise.vote(p.log(), "weighted", [0.0, 1.0]).exp(), p[1], atol=1e-6)
    with pytest.raises(ValueError, match="one weight per exit"):
        layerwise.vote(p.log(), "weighted", [1.0])


def _likelihood(gold, w):
    return float(torch.logsumexp(gold + torch.tensor(w).log()[:, None], dim=0).mean())


def test_em_weights_follow_what_the_bank_supports():
    # exit 1 always gives the true token more probability: all the weight goes to it
    better = torch.tensor([[0.1, 0.2, 0.1, 0.3], [0.6, 0.7, 0.5, 0.9]]).log()
    w = layerwise.mixture_weights(better)
    assert sum(w) == pytest.approx(1.0) and w[1] > 0.99
    # each exit right on half the bank: the mixture needs both
    split = torch.tensor([[0.9, 0.9, 0.01, 0.01], [0.01, 0.01, 0.9, 0.9]]).log()
    w = layerwise.mixture_weights(split)
    assert w == pytest.approx([0.5, 0.5], abs=1e-3)
    # EM never lowers the bank's likelihood
    gold = torch.rand(3, 50).clamp_min(1e-3).log()
    last = None
    for iterations in (0, 1, 2, 5, 20):
        now = _likelihood(gold, layerwise.mixture_weights(gold, iterations))
        assert last is None or now >= last - 1e-12
        last = now


def test_memorybank_probes_carry_loss_on_the_gold_answer_only(template):
    from benchmarks.voting import memorybank_examples

    examples = memorybank_examples(template, limit=3)
    assert len(examples) == 3
    first = examples[0]
    answer = template.tokenize_plain("\"The Wandering Earth\", a sci-fi movie with stunning visuals.")
    assert list(first.tokens[first.loss_from:first.loss_from + len(answer)]) == answer
    assert first.loss_tokens in (len(answer) + 1, len(answer) + 2)   # and the end-of-turn marker
