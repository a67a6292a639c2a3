"""What one household agrees on before its first round: the base model, the kind of update and its shape,
the public seeds and the user-level DP. The server sends it in every round's config; a device checks it."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from adapters import federated, lora
from adapters.errors import InvalidInput
from assistant.federation import KINDS


@dataclasses.dataclass(frozen=True)
class Household:
    """The shared configuration of a household's rounds (sent to devices as a Flower ConfigRecord)."""

    kind: str                        # fedavg | fedkseed
    base_sha256: str
    base_name: str
    rounds: int = 3
    steps: int = 20                  # local optimizer steps per round
    rank: int = lora.LoraConfig.rank
    layers: int = lora.LoraConfig.layers
    modules: tuple[str, ...] = lora.LoraConfig.modules
    a_seed: int = 0                  # FFA-LoRA: the public seed of the frozen A
    pool_size: int = 1024            # FedKSeed: K
    pool_seed: int = 0
    # User-level DP (Flower's client-side fixed clipping): each device's update is clipped to C in L2
    # and the server adds N(0, (σC/n)²) to the average. σ = 0: no user-level DP.
    sigma: float = 0.0
    clip: float = 1.0
    delta: float = 1e-5
    local_epsilon: float | None = None   # ε of each device's local run (None: the device's own setting)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidInput(f"the kind of round must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.rounds < 1 or self.steps < 1:
            raise InvalidInput("a household needs at least one round of at least one step")
        if self.sigma < 0 or self.clip <= 0:
            raise InvalidInput("user-level DP needs σ ≥ 0 and a positive clip C")

    def config(self) -> dict[str, Any]:
        """The ConfigRecord's values (Flower accepts str, int, float, bool and lists of them)."""
        out = {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items() if v is not None}
        out["modules"] = list(self.modules)
        return out

    @classmethod
    def from_config(cls, values: Any) -> Household:
        """Back from a received ConfigRecord (unknown keys, such as Flower's own, are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        found = {k.replace("-", "_"): values[k] for k in values.keys() if k.replace("-", "_") in names}
        if "modules" in found:
            found["modules"] = tuple(found["modules"])
        missing = {"kind", "base_sha256", "base_name"} - set(found)
        if missing:
            raise InvalidInput(f"the server's round config has no {sorted(missing)[0]}; is it an Ember household?")
        return cls(**found)

    def targets(self, model_path: Path) -> dict[str, tuple[int, int]]:
        """{llama.cpp weight name: (out, in)} the LoRA adapts."""
        return federated.lora_targets(model_path, rank=self.rank, layers=self.layers, modules=self.modules)

    def expected(self, model_path: Path) -> dict[str, tuple[int, ...]]:
        """The names and shapes of a valid update."""
        if self.kind == "fedkseed":
            return {federated.POOL_KEY: (self.pool_size,)}
        return {f"{n}{federated.LORA_B}": (out, self.rank) for n, (out, _) in self.targets(model_path).items()}

    def initial(self, model_path: Path) -> dict[str, np.ndarray]:
        """Round 1's global update: nothing learned yet."""
        if self.kind == "fedkseed":
            return {federated.POOL_KEY: np.zeros(self.pool_size, dtype=np.float32)}
        return federated.zero_b(self.targets(model_path), rank=self.rank)
