"""Privacy accounting: calibrate DP noise to a target (ε, δ) and report what a run has spent.

A thin wrapper around Opacus' RDP accountant (Mironov, arXiv 1702.07476; subsampled Gaussian,
Mironov et al. arXiv 1908.10530). The same question serves both trainers: DP-SGD adds Gaussian noise to a
Poisson-subsampled sum of clipped gradients, and DPZero (arXiv 2310.09639) to a subsampled sum of
clipped scalars — both are the subsampled Gaussian mechanism with noise multiplier σ and rate q.
"""
from __future__ import annotations

import dataclasses

from adapters.errors import InvalidInput

MAX_DELTA = 1e-6
# Opacus' default RDP orders stop at 63; small personal datasets at ε≈8 need larger ones for a tight
# bound (Opacus warns "optimal order is the largest alpha"). A superset of orders can only tighten ε.
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 96, 128, 192, 256, 512, 1024]


@dataclasses.dataclass(frozen=True)
class Plan:
    """A run's privacy parameters, as recorded in the ledger."""

    epsilon: float
    delta: float
    sigma: float          # noise multiplier: noise std = σ·C
    clip: float           # C
    sample_rate: float    # q: each example joins a step's batch independently with this probability
    steps: int
    batch_size: int       # expected batch size q·n


def default_delta(n_examples: int) -> float:
    """δ = min(1/n², 1e-6): well below the chance of any one example."""
    if n_examples < 1:
        raise InvalidInput("no training examples: δ needs at least one")
    return min(1.0 / n_examples ** 2, MAX_DELTA)


def epsilon_spent(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε after `steps` subsampled Gaussian steps (σ, q) at δ, by the RDP accountant."""
    from opacus.accountants import RDPAccountant

    if steps <= 0:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(sigma, sample_rate, steps)]
    return float(accountant.get_epsilon(delta, alphas=ALPHAS))


def noise_for(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest σ (to Opacus' search tolerance) so that `steps` steps at rate q spend at most ε."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant="rdp", alphas=ALPHAS))


def plan(n_examples: int, *, epsilon: float, delta: float | None = None, batch_size: int, steps: int,
         clip: float) -> Plan:
    """Calibrate σ for `steps` Poisson-sampled steps of expected size `batch_size` over n examples."""
    if epsilon is None or epsilon <= 0:
        raise InvalidInput(f"ε must be positive, not {epsilon}")
    if n_examples < 1 or batch_size < 1 or steps < 1:
        raise InvalidInput("a DP run needs at least one example, a batch size and a step")
    if clip <= 0:
        raise InvalidInput(f"the clipping norm C must be positive, not {clip}")
    delta = default_delta(n_examples) if delta is None else delta
    if not 0 < delta < 1:
        raise InvalidInput(f"δ must be between 0 and 1, not {delta}")
    rate = min(1.0, batch_size / n_examples)
    sigma = noise_for(epsilon, delta, rate, steps)
    return Plan(epsilon, delta, sigma, clip, rate, steps, min(batch_size, n_examples))
