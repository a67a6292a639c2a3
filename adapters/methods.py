"""The training methods behind `ember adapt --method`: each trains on a dataset and writes its adapter
file (atomically), and says what it made. LoRA (DP-SGD, backprop in torch) and ZO (forward passes only:
a control vector in llama.cpp, or LoRA in torch) share the dataset, gate, registry and ledger."""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Callable

from adapters import export, layerwise, lora, privacy, zo
from adapters.dataset import Dataset
from adapters.gate import Evaluator


@dataclasses.dataclass
class Made:
    """An adapter file written by a method, with what the registry and the report need."""

    kind: str                    # lora | control_vector
    losses: list[float]
    seconds: float
    params: dict[str, Any]       # how it was trained (stored in the registry)


def train_lora(model_path: Path, cache_dir: Path, data: Dataset, config: lora.LoraConfig, path: Path, *,
               base_sha256: str, checkpoint: Path, extra: dict[str, Any],
               on_step: Callable[[lora.Progress], None], should_stop: Callable[[], bool] | None,
               start: dict[str, Any] | None = None) -> Made | None:
    """DP-SGD LoRA (from `start["lora"]`'s weights when given); None when paused."""
    trained = lora.train(model_path, cache_dir, data, config, checkpoint=checkpoint, on_step=on_step,
                         should_stop=should_stop, init=(start or {}).get("lora"))
    if trained is None:
        return None
    export.write_lora_gguf(path, trained.weights, alpha=config.alpha, n_head=trained.n_head,
                           n_head_kv=trained.n_head_kv, base_sha256=base_sha256, base_name=model_path.name,
                           architecture=export.model_architecture(model_path), extra=extra)
    return Made("lora", trained.losses, trained.seconds, dataclasses.asdict(config))


def train_adaptive(model_path: Path, cache_dir: Path, data: Dataset, config: layerwise.AdaptiveConfig, path: Path,
                   *, base_sha256: str, checkpoint: Path, extra: dict[str, Any],
                   on_step: Callable[[lora.Progress], None], should_stop: Callable[[], bool] | None) -> Made | None:
    """DP-SGD LoRA with EDGE-LLM's adaptive layer tuning (a window moving shallow → deep); None when paused.
    Every window's LoRA goes into one GGUF; the exits and their gains into `ember.exits`."""
    trained = layerwise.train(model_path, cache_dir, data, config, checkpoint=checkpoint, on_step=on_step,
                              should_stop=should_stop)
    if trained is None:
        return None
    export.write_lora_gguf(path, trained.weights, alpha=config.alpha, n_head=trained.n_head,
                           n_head_kv=trained.n_head_kv, base_sha256=base_sha256, base_name=model_path.name,
                           extra={**extra, "exits": layerwise.gains_document(trained, config)})
    return Made("lora", trained.losses, trained.seconds,
                {**dataclasses.asdict(config), "layers": "adaptive",
                 "windows": [dataclasses.asdict(w) for w in trained.windows]})


def train_zo(model_path: Path, cache_dir: Path, data: Dataset, config: zo.ZoConfig, path: Path, *,
             base_sha256: str, checkpoint: Path, extra: dict[str, Any],
             on_step: Callable[[lora.Progress], None], should_stop: Callable[[], bool] | None,
             start: dict[str, Any] | None = None) -> Made | None:
    """Zeroth-order training on the chosen backend; None when paused. The update log goes into the file.

    With `start["sums"]` (FedKSeed pool sums) the tensors start from the household's global update,
    replayed from the pool; the run must not stop early (`eval_every=0`), which would reset them."""
    if config.backend == "llama":
        longest = max(len(e.tokens) for e in data.train + data.heldout)
        backend: Any = zo.LlamaControlVector(model_path, data.train, config, base_sha256=base_sha256,
                                             n_ctx=max(512, longest + 8), heldout=data.heldout)
        heldout = (lambda: backend.heldout(data.heldout)) if config.eval_every else None
    else:
        backend = zo.TorchLora(model_path, cache_dir, data.train, config)
        heldout = HeldoutInLlama(backend, model_path, data, config, base_sha256) if config.eval_every else None
    try:
        if start and start.get("sums") is not None:
            from adapters.federated import replay_sums, seed_pool

            replay_sums(backend.tensors, start["sums"], seed_pool(config.pool_seed, config.seed_pool),
                        lr=config.learning_rate(0), perturbations=config.perturbations)
        trained = zo.train(backend, data, config, checkpoint=checkpoint, on_step=on_step,
                           should_stop=should_stop, heldout_loss=heldout)
        if trained is None:
            return None
        extra = {**extra, "zo_log": zo.log_document(config, trained)}
        if config.backend == "llama":
            export.write_control_vector_gguf(path, backend.directions(), base_sha256=base_sha256,
                                             base_name=model_path.name,
                                             model_hint=export.model_architecture(model_path), extra=extra)
        else:
            n_head, n_head_kv, _ = backend.prepared.shape
            export.write_lora_gguf(path, backend.weights(), alpha=config.alpha, n_head=n_head,
                                   n_head_kv=n_head_kv, base_sha256=base_sha256, base_name=model_path.name,
                                   architecture=export.model_architecture(model_path), extra=extra)
    finally:
        backend.close()
        if heldout is not None and hasattr(heldout, "close"):
            heldout.close()
    return Made(backend.kind, trained.losses, trained.seconds,
                {**dataclasses.asdict(config), "best_step": trained.best_step, "heldout_curve": trained.heldout,
                 "updates": len(trained.log)})


class HeldoutInLlama:
    """Held-out loss of the torch backend's current LoRA, measured as the gate does: exported to GGUF and
    scored in llama.cpp on the quantized model."""

    def __init__(self, backend: zo.TorchLora, model_path: Path, data: Dataset, config: zo.ZoConfig,
                 base_sha256: str):
        self.backend, self.data, self.config, self.base_sha256 = backend, data, config, base_sha256
        self.model_path = model_path
        self.evaluator: Evaluator | None = None

    def __call__(self) -> float:
        if self.evaluator is None:
            self.evaluator = Evaluator(self.model_path, n_ctx=512, threads=self.config.threads,
                                       base_sha256=self.base_sha256)
        n_head, n_head_kv, _ = self.backend.prepared.shape
        with tempfile.TemporaryDirectory() as folder:
            path = export.write_lora_gguf(Path(folder) / "probe.gguf", self.backend.weights(),
                                          alpha=self.config.alpha, n_head=n_head, n_head_kv=n_head_kv,
                                          base_sha256=self.base_sha256, base_name=self.model_path.name,
                                          architecture=export.model_architecture(self.model_path))
            self.evaluator.use(path)
            loss = self.evaluator.loss(self.data.heldout)
            self.evaluator.use(None)
        return loss

    def close(self) -> None:
        if self.evaluator is not None:
            self.evaluator.close()


def plan(method: str, config: Any, n_train: int) -> tuple[int, privacy.Plan | None]:
    """(steps, DP plan) of a run of `method` with `config` on n examples."""
    if method == "zo":
        return config.steps, zo.plan_for(config, n_train)
    return lora.steps_for(config, n_train), lora.plan_for(config, n_train)
