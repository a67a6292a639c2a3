"""Privacy accounting: calibrate DP noise to a target (ε, δ) and report what a run has spent.

A thin wrapper around Google's dp-accounting RDP accountant (Mironov, arXiv 1702.07476; subsampled
Gaussian, Mironov et al. arXiv 1908.10530). The same question serves both trainers: DP-SGD adds Gaussian
noise to a Poisson-subsampled sum of clipped gradients, and DPZero (arXiv 2310.09639) to a subsampled sum
of clipped scalars — both are the subsampled Gaussian mechanism with noise multiplier σ and rate q.
dp-accounting rather than Opacus' accountant: it needs no torch, so forward-only training in llama.cpp
can account for itself at inference memory (Opacus' accountant imports torch, ~300 MB). It reproduces
Opacus' published values (tests/test_privacy.py).
"""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from typing import Any

from adapters.errors import InvalidInput

MAX_DELTA = 1e-6
# Opacus' default RDP orders stop at 63; small personal datasets at ε≈8 need larger ones for a tight
# bound (the best order is otherwise the largest). A superset of orders can only tighten ε.
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


def _steps(sigma: float, sample_rate: float, steps: int) -> Any:
    import dp_accounting

    step = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(sigma))
    return dp_accounting.SelfComposedDpEvent(step, steps)


def _accountant() -> Any:
    from absl import logging as absl_logging
    from dp_accounting.rdp import RdpAccountant

    # At large sampling rates a few fractional orders' series do not converge; dp-accounting leaves them
    # out of the bound (which stays valid) and logs each one. Not the user's concern.
    absl_logging.set_verbosity(absl_logging.ERROR)
    return RdpAccountant(orders=ALPHAS)


def epsilon_spent(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε after `steps` subsampled Gaussian steps (σ, q) at δ, by the RDP accountant."""
    if steps <= 0:
        return 0.0
    accountant = _accountant()
    accountant.compose(_steps(sigma, sample_rate, steps))
    return float(accountant.get_epsilon(delta))


def noise_for(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest σ (to within 1e-4) so that `steps` steps at rate q spend at most ε."""
    import dp_accounting
    from dp_accounting.mechanism_calibration import LowerEndpointAndGuess

    return float(dp_accounting.calibrate_dp_mechanism(
        _accountant, lambda sigma: _steps(sigma, sample_rate, steps), epsilon, delta,
        LowerEndpointAndGuess(0.05, 1.0), tol=1e-4))


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


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A plan and the ε it has spent after each step (at up to 500 evenly spaced steps, rounded up)."""

    plan: Plan
    points: tuple[tuple[int, float], ...]

    def epsilon_at(self, step: int) -> float:
        """ε spent after `step` steps (the next computed point's, so never under-reported)."""
        return next((eps for at, eps in self.points if at >= step), self.plan.epsilon)


def schedule_isolated(n_examples: int, *, epsilon: float, delta: float | None, batch_size: int, steps: int,
                      clip: float) -> Schedule:
    """`plan` plus ε per step, computed in a child process: the accountant's imports (scipy and friends,
    ~80 MB) then never enter a process that must train at inference memory."""
    request = {"n_examples": n_examples, "epsilon": epsilon, "delta": delta, "batch_size": batch_size,
               "steps": steps, "clip": clip}
    done = subprocess.run([sys.executable, "-m", "adapters.privacy"], input=json.dumps(request),
                          capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise InvalidInput(lines[-1] if lines else "the privacy accountant failed")
    answer = json.loads(done.stdout)
    return Schedule(Plan(**answer["plan"]), tuple((int(a), float(e)) for a, e in answer["points"]))


def _serve() -> None:
    """`python -m adapters.privacy`: a JSON request on stdin, the plan and its ε per step on stdout."""
    request = json.loads(sys.stdin.read())
    try:
        planned = plan(request["n_examples"], epsilon=request["epsilon"], delta=request["delta"],
                       batch_size=request["batch_size"], steps=request["steps"], clip=request["clip"])
    except InvalidInput as err:
        sys.exit(str(err))
    marks = sorted({math.ceil(planned.steps * i / 500) for i in range(1, 501)} - {0})
    points = [(at, epsilon_spent(planned.sigma, planned.sample_rate, at, planned.delta)) for at in marks]
    print(json.dumps({"plan": dataclasses.asdict(planned), "points": points}))


if __name__ == "__main__":
    _serve()
