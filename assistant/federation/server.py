"""The household's ServerApp: FedAvg over what devices send (LoRA B tensors or FedKSeed pool sums),
with Flower's user-level DP (client-side fixed clipping + Gaussian noise on the average, accounted by
Flower's RDP accountant) when σ > 0. The server sees each device's clipped update; SecAgg+ would hide
those individual updates from it too, but Flower offers it only on the legacy workflow API (see README).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg

from adapters import federated
from assistant.federation.client import arrays_of, record_of
from assistant.federation.plan import Household


@dataclasses.dataclass
class Outcome:
    """What a household's run produced, for the CLI, the benchmark and tests."""

    arrays: dict[str, np.ndarray] | None = None
    train_metrics: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    evaluate_metrics: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    refused: list[tuple[int, int, str]] = dataclasses.field(default_factory=list)   # (round, node, reason)
    epsilon: float | None = None       # user-level ε from Flower's RDP accountant (None: no user-level DP)
    delta: float | None = None


class CheckedFedAvg(FedAvg):
    """FedAvg that drops malformed replies (wrong names or shapes, NaN, oversized) before averaging and
    notes errors (a device that refused the round) with their one-line reason."""

    def __init__(self, expected: dict[str, tuple[int, ...]], outcome: Outcome, **kwargs: Any):
        super().__init__(**kwargs)
        self.expected, self.outcome = expected, outcome

    def checked(self, server_round: int, replies: Any) -> list[Message]:
        kept = []
        for msg in replies:
            if msg.has_error():
                self.outcome.refused.append((server_round, msg.metadata.src_node_id, msg.error.reason or ""))
                continue
            try:
                federated.check_update(arrays_of(msg.content["arrays"]), self.expected)
            except federated.MalformedUpdate as err:
                self.outcome.refused.append((server_round, msg.metadata.src_node_id, str(err)))
                continue
            kept.append(msg)
        return kept


class CheckedDP(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping DP wrapper, with malformed replies removed first."""

    def aggregate_train(self, server_round: int, replies: Any) -> Any:
        return super().aggregate_train(server_round, self.strategy.checked(server_round, list(replies)))


class CheckedPlain(CheckedFedAvg):
    """Without user-level DP: FedAvg weighted by examples, malformed replies removed first."""

    def aggregate_train(self, server_round: int, replies: Any) -> Any:
        return super().aggregate_train(server_round, self.checked(server_round, list(replies)))


def strategy_for(plan: Household, model_path: Path, n_devices: int, outcome: Outcome) -> Any:
    """FedAvg (every device every round) wrapped in Flower's user-level DP when σ > 0."""
    common = {"fraction_train": 1.0, "fraction_evaluate": 1.0, "min_train_nodes": n_devices,
              "min_evaluate_nodes": n_devices, "min_available_nodes": n_devices, "weighted_by_key": "weight"}
    expected = plan.expected(model_path)
    if plan.sigma <= 0:
        return CheckedPlain(expected, outcome, **common)
    from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

    accountant = RdpAccountant(PrivacyConfig(
        target_delta=plan.delta, population_size=n_devices,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION))
    return CheckedDP(CheckedFedAvg(expected, outcome, **common), noise_multiplier=plan.sigma,
                     clipping_norm=plan.clip, num_sampled_clients=n_devices, accountant=accountant)


def server_app(plan: Household, model_path: Path, n_devices: int, outcome: Outcome, *,
               timeout: float = 3600) -> ServerApp:
    """The ServerApp of one household run: `plan.rounds` rounds of train + evaluate on every device."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_rounds(grid, plan, model_path, n_devices, outcome, timeout=timeout)

    return app


def run_rounds(grid: Grid, plan: Household, model_path: Path, n_devices: int, outcome: Outcome, *,
               timeout: float = 3600) -> Outcome:
    """`plan.rounds` rounds of train + evaluate over `grid` (in process or a SuperLink's), into `outcome`."""
    strategy = strategy_for(plan, model_path, n_devices, outcome)
    result = strategy.start(grid=grid, initial_arrays=record_of(plan.initial(model_path)),
                            num_rounds=plan.rounds, timeout=timeout,
                            train_config=ConfigRecord(plan.config()), evaluate_config=ConfigRecord(plan.config()))
    outcome.arrays = arrays_of(result.arrays) if result.arrays is not None and len(result.arrays) else None
    outcome.train_metrics = {r: dict(m) for r, m in result.train_metrics_clientapp.items()}
    outcome.evaluate_metrics = {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()}
    spent = strategy.privacy_spent() if hasattr(strategy, "privacy_spent") else None
    if spent is not None:
        outcome.epsilon, outcome.delta = spent.epsilon, spent.delta
    return outcome

