"""Zeroth-order training: forward passes only, at inference memory (MeZO, arXiv 2305.17333), with
differential privacy in the style of DPZero (arXiv 2310.09639).

One step, for each of `perturbations` directions z (regenerated from a seed, one tensor at a time):
the loss of every example of the batch at θ+μz and at θ−μz gives a projected-gradient scalar
gᵢ = (L₊ − L₋)/2μ. Under DP each example's scalars are clipped to norm C, summed, Gaussian noise σC is
added and the sum divided by the expected batch size (the subsampled Gaussian mechanism the LoRA
trainer's accountant already prices); without DP they are averaged. Then θ ← θ − η·ĝ·z.

Perturbed parameters are built from a saved copy of θ (θ₀ + μz), not by adding and subtracting, so θ
comes back exactly, and a run is a pure function of its initial θ and its update log: the list of
(step, seed, ĝ) entries. The log is stored in the adapter file; `replay` rebuilds the adapter from it bit
for bit, and an update is a few bytes, the unit federated sharing can exchange.

Two backends share the step: `TorchLora` (LoRA A/B on the dequantized base; the LoRA trainer's
frozen-layer cache) and `LlamaControlVector` (one additive vector per layer in llama.cpp on the
quantized model itself; no torch at all, exactly inference memory).
"""
from __future__ import annotations

import dataclasses
import json
import math
import secrets
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from adapters import privacy
from adapters.base import write_private
from adapters.dataset import Dataset, Example
from adapters.errors import InvalidInput
from adapters.lora import Progress

BACKENDS = ("llama", "torch")
SCHEDULES = ("constant", "linear", "cosine")
# Per backend: a control vector lives in the residual stream (O(1) entries), LoRA B starts at zero and
# its A at Kaiming scale; these are the step sizes that moved held-out loss on the synthetic user
# (torch, batches of 8, no DP, held-out 3.730 from: 120 steps at lr 2e-3 → 3.722, 1e-2 → 3.634, 3e-2 and
# μ 0.1 diverged; 300 steps at 1e-2 reached 3.41 and then diverged, at 5e-3 → 3.448 and still falling).
DEFAULTS = {"llama": {"lr": 1e-2, "mu": 0.3, "clip": 2.0, "batch": 8},
            "torch": {"lr": 5e-3, "mu": 1e-2, "clip": 2.0, "batch": 8}}
# The llama backend with a window of top layers (window 8 on the synthetic user, batches of 8, no DP, 40 s
# each on the loaded machine, ~20 steps, held-out 3.729 →): lr 1e-2 μ 0.3 3.729; 3e-2 0.3 3.728; 0.1 0.3
# 3.727; 0.1 1.0 3.725; 0.3 1.0 3.715; 0.3 3.0 3.721; 1.0 1.0 3.662; 3.0 1.0 3.621; 10 1.0 diverged (3.894).
# DPZero's clip C for the window: at μ 1.0 its per-example scalars (L₊ − L₋)/2μ are small (|g| quantiles
# 10/50/90/99 %: 0.011, 0.066, 0.195, 0.289 over 30 steps of a no-DP run; the batch mean's median 0.042),
# so the all-layers C = 2 clipped nothing and its noise σC/B = 0.19 (σ 0.75 for ε 8, 70 steps, q 0.051)
# was 4.4× the signal: held-out 3.729 → 4.742 in 70 steps at lr 3, batch 8. There C 0.2 (9 % clipped,
# noise 0.019) → 3.451; C 0.1 (34 % clipped) lr 3 → 3.498, lr 6 → 3.488. At batch 4, 160 steps: C 0.2
# lr 3 → 3.377, lr 5 → 3.652; C 0.1 lr 3 → 3.221 (`benchmarks.zo_tuning --epsilon 8 --steps N`, one run
# each with fresh DP noise, run-to-run spread not measured; 2026-11-30 19:03-19:21 UTC).
# Batch: without DP, 60 s from zero at lr 3 μ 1: batch 8 → 3.418 (80 steps), 4 → 3.205 (149), 2 → 3.230
# (247); lr 5: batch 8 → 3.390, 4 → 3.225, 2 → 3.495; 2 perturbations a step: batch 8 → 3.383, 4 → 3.341.
WINDOW_DEFAULTS = {"lr": 3.0, "mu": 1.0, "clip": 0.1, "batch": 4}


@dataclasses.dataclass(frozen=True)
class ZoConfig:
    """Everything that shapes a ZO run; saved in the adapter with its update log."""

    backend: str = "llama"
    steps: int = 200
    batch_size: int | None = None   # examples a step (with DP: the expected number); None: the default
    perturbations: int = 1          # directions per step (their estimates are averaged)
    lr: float | None = None         # None: the backend's default
    lr_schedule: str = "constant"   # constant | linear (to 0) | cosine (to 0)
    mu: float | None = None         # perturbation size; None: the backend's default
    mu_schedule: str = "constant"
    loss_on: str = "target"         # target: the message being learned; all: every token after the first
    clip: float | None = None       # C, on each example's vector of scalars; None: the backend's default
    epsilon: float | None = 8.0     # None: no differential privacy
    delta: float | None = None
    eval_every: int = 25            # held-out loss every N steps (0: never) ...
    patience: int = 3               # ... stop after this many evaluations without a new best
    seed: int = 0
    threads: int = 2
    checkpoint_every: int = 10
    # The torch backend's LoRA shape (as the LoRA trainer's defaults).
    rank: int = 2
    alpha: float = 16.0
    layers: int = 2
    modules: tuple[str, ...] = ("q_proj", "v_proj", "o_proj")
    # FedKSeed (arXiv 2312.06353): directions only from a public pool of `seed_pool` seeds drawn from
    # `pool_seed` (0: every step's own seed). Household learning sets it; the lr must then be constant.
    seed_pool: int = 0
    pool_seed: int = 0
    # The llama backend's window: train only the top `window` layers' vectors, the layers below run once
    # per example (adapters/top_layers.py); 0: every layer's vector, the whole model run at every step.
    window: int = 0

    def __post_init__(self) -> None:
        if self.seed_pool and self.lr_schedule != "constant":
            raise InvalidInput("a seed pool needs a constant learning rate (per-seed sums must add up)")
        if self.backend not in BACKENDS:
            raise InvalidInput(f"the ZO backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        for name in ("lr_schedule", "mu_schedule"):
            if getattr(self, name) not in SCHEDULES:
                raise InvalidInput(f"{name} must be one of {', '.join(SCHEDULES)}")
        if self.loss_on not in ("target", "all"):
            raise InvalidInput("loss_on must be target or all")
        if self.window < 0 or (self.window and self.backend != "llama"):
            raise InvalidInput("a ZO window is a number of top layers, for the llama backend")
        if self.perturbations < 1 or self.steps < 1 or self.batch() < 1:
            raise InvalidInput("a ZO run needs at least one step, one example a batch and one perturbation")

    def default(self, name: str) -> float:
        """The backend's (or the window's) default `lr` or `mu`."""
        return (WINDOW_DEFAULTS if self.window else DEFAULTS[self.backend])[name]

    def batch(self) -> int:
        """Examples a step: the one given, else the backend's (or the window's) default."""
        return self.batch_size if self.batch_size is not None else int(self.default("batch"))

    def dp_clip(self) -> float:
        """DPZero's clip C: the one given, else the backend's (or the window's) default."""
        return self.clip if self.clip is not None else self.default("clip")

    def learning_rate(self, step: int) -> float:
        """η at `step` (0-based)."""
        return _scheduled(self.lr if self.lr is not None else self.default("lr"), self.lr_schedule, step, self.steps)

    def perturbation(self, step: int) -> float:
        """μ at `step` (0-based); decays like η when scheduled, never below a tenth of its start."""
        start = self.mu if self.mu is not None else self.default("mu")
        return max(_scheduled(start, self.mu_schedule, step, self.steps), start / 10)


def _scheduled(start: float, schedule: str, step: int, steps: int) -> float:
    if schedule == "linear":
        return start * (1 - step / steps)
    if schedule == "cosine":
        return start * 0.5 * (1 + math.cos(math.pi * step / steps))
    return start


class Backend(Protocol):
    """What the ZO step needs from a model: its trainable tensors (float32 numpy arrays, written in
    place) and the per-example losses at their current values."""

    tensors: list[np.ndarray]

    def losses(self, examples: Sequence[int]) -> np.ndarray: ...


def schedule_for(config: ZoConfig, n_train: int) -> privacy.Schedule | None:
    """The DP plan (σ calibrated to ε) and its ε per step, or None without DP. Computed in a child
    process, so that training in llama.cpp stays at inference memory."""
    if config.epsilon is None:
        return None
    return privacy.schedule_isolated(n_train, epsilon=config.epsilon, delta=config.delta,
                                     batch_size=config.batch(), steps=config.steps, clip=config.dp_clip())


def plan_for(config: ZoConfig, n_train: int) -> privacy.Plan | None:
    """The DP plan for this run, or None without DP."""
    found = schedule_for(config, n_train)
    return found.plan if found else None


def direction_seed(run_seed: int, step: int, k: int) -> int:
    """The seed of perturbation k at `step`: public randomness, independent of the data."""
    return int(np.random.SeedSequence([run_seed, step, k]).generate_state(1, np.uint64)[0])


def step_seed(config: ZoConfig, step: int, k: int) -> int:
    """The seed of perturbation k at `step`: its own, or with a seed pool one of the pool's K, picked
    uniformly (public randomness either way)."""
    if not config.seed_pool:
        return direction_seed(config.seed, step, k)
    from adapters.federated import seed_pool

    pick = direction_seed(config.seed, step, k) % config.seed_pool
    return seed_pool(config.pool_seed, config.seed_pool)[pick]


def perturb(tensors: list[np.ndarray], origin: list[np.ndarray], seed: int, scale: float) -> None:
    """θ = θ₀ + scale·z, z ~ N(0, I) from `seed`, one tensor at a time."""
    rng = np.random.default_rng(seed)
    for t, o in zip(tensors, origin):
        z = rng.standard_normal(t.shape, dtype=np.float32)
        np.multiply(z, np.float32(scale), out=z)
        np.add(o, z, out=t)


def update(tensors: list[np.ndarray], seed: int, coefficient: np.float32) -> None:
    """θ ← θ − coefficient·z, z regenerated from `seed`."""
    rng = np.random.default_rng(seed)
    for t in tensors:
        z = rng.standard_normal(t.shape, dtype=np.float32)
        np.multiply(z, coefficient, out=z)
        np.subtract(t, z, out=t)


def coefficient(config: ZoConfig, step: int, scalar: float) -> np.float32:
    """η_t·ĝ/n in float32, computed the same way in training and in replay."""
    return np.float32(np.float32(config.learning_rate(step)) * np.float32(scalar) / np.float32(config.perturbations))


def zo_step(backend: Backend, batch: Sequence[int], config: ZoConfig, step: int, plan: privacy.Plan | None,
            noise: np.random.Generator) -> tuple[float, list[tuple[int, int, float]]]:
    """One ZO-SGD step on `batch`; returns the batch's mean loss and the step's log entries."""
    mu, n = config.perturbation(step), config.perturbations
    origin = [t.copy() for t in backend.tensors]
    scalars = np.zeros((len(batch), n))
    losses = []
    seeds = [step_seed(config, step, k) for k in range(n)]
    for k, seed in enumerate(seeds):
        if len(batch):
            perturb(backend.tensors, origin, seed, mu)
            plus = backend.losses(batch)
            perturb(backend.tensors, origin, seed, -mu)
            minus = backend.losses(batch)
            scalars[:, k] = (plus - minus) / (2 * mu)
            losses.append((plus + minus) / 2)
    for t, o in zip(backend.tensors, origin):
        np.copyto(t, o)                                   # exactly θ again
    if plan is None:
        estimate = scalars.mean(axis=0)
    else:
        # DPZero: each example's scalars clipped to norm C, summed, noised (σC), over the expected batch.
        norms = np.linalg.norm(scalars, axis=1, keepdims=True)
        clipped = scalars * np.minimum(1.0, plan.clip / np.maximum(norms, 1e-12))
        estimate = (clipped.sum(axis=0) + noise.normal(0.0, plan.sigma * plan.clip, n)) / plan.batch_size
    entries = [(step, seed, float(np.float32(g))) for seed, g in zip(seeds, estimate)]
    for _, seed, g in entries:
        update(backend.tensors, seed, coefficient(config, step, g))
    return (float(np.mean(losses)) if len(batch) else float("nan")), entries


def replay(tensors: list[np.ndarray], log: Sequence[Sequence[float]], config: ZoConfig) -> list[np.ndarray]:
    """Rebuild trained tensors from their initial values and the update log (in place; returned)."""
    for step, seed, g in log:
        update(tensors, int(seed), coefficient(config, int(step), g))
    return tensors


@dataclasses.dataclass
class Trained:
    """A finished ZO run (its tensors are the backend's): the log that rebuilds them, what it cost."""

    log: list[tuple[int, int, float]]
    plan: privacy.Plan | None
    losses: list[float]
    heldout: list[tuple[int, float]]      # (step, held-out loss) at each evaluation
    best_step: int
    seconds: float


def _batches(n_train: int, config: ZoConfig, plan: privacy.Plan | None, step: int,
             sampling: np.random.Generator) -> list[int]:
    """Without DP: shuffled epochs, a function of (seed, epoch). With DP: a fresh Poisson sample."""
    if plan is not None:
        return list(np.flatnonzero(sampling.random(n_train) < plan.sample_rate))
    size = min(config.batch(), n_train)
    per_epoch = math.ceil(n_train / size)
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([config.seed, epoch]).permutation(n_train)
    return list(order[index * size:(index + 1) * size])


def train(backend: Backend, data: Dataset, config: ZoConfig, *, checkpoint: Path | None = None,
          on_step: Callable[[Progress], None] | None = None, should_stop: Callable[[], bool] | None = None,
          heldout_loss: Callable[[], float] | None = None) -> Trained | None:
    """ZO-SGD on `data.train` through `backend`; resumes from `checkpoint`; None when stopped early.

    With `heldout_loss` the run evaluates every `eval_every` steps, keeps the best tensors and stops after
    `patience` evaluations without improvement; the log is cut at the best step, so it rebuilds exactly
    the returned tensors.
    """
    n_train = len(data.train)
    accounted = schedule_for(config, n_train)
    plan = accounted.plan if accounted else None
    # Poisson sampling and privacy noise must be unpredictable: seeded by the OS, fresh on every resume.
    sampling = np.random.default_rng(secrets.randbits(128))
    noise = np.random.default_rng(secrets.randbits(128))
    state: dict[str, Any] = {"step": 0, "log": [], "losses": [], "heldout": [], "best": None, "bad": 0}
    if checkpoint is not None and checkpoint.is_file():
        state = json.loads(checkpoint.read_text())
        replay(backend.tensors, state["log"], config)
    started, done_at_start = time.perf_counter(), state["step"]
    while state["step"] < config.steps:
        step = state["step"]
        loss, entries = zo_step(backend, _batches(n_train, config, plan, step, sampling), config, step, plan, noise)
        state["step"] += 1
        state["log"].extend(entries)
        state["losses"].append(loss)
        if heldout_loss is not None and config.eval_every and state["step"] % config.eval_every == 0:
            value = heldout_loss()
            state["heldout"].append((state["step"], value))
            if state["best"] is None or value < state["best"][1]:
                state["best"], state["bad"] = (state["step"], value), 0
            else:
                state["bad"] += 1
        stop = should_stop is not None and should_stop()
        early = config.patience and state["bad"] >= config.patience
        if checkpoint is not None and (stop or state["step"] % config.checkpoint_every == 0):
            write_private(checkpoint, json.dumps(state).encode())
        if on_step is not None:
            per_step = (time.perf_counter() - started) / (state["step"] - done_at_start)
            eps = accounted.epsilon_at(state["step"]) if accounted else None
            on_step(Progress(state["step"], config.steps, loss, eps, per_step * (config.steps - state["step"])))
        if stop:
            return None
        if early:
            break
    log = [tuple(e) for e in state["log"]]
    best_step = state["step"]
    if state["best"] is not None and heldout_loss is not None:
        if state["step"] % (config.eval_every or 1) or state["step"] != state["best"][0]:
            # Go back to the best evaluated point: rebuild from the initial tensors and the cut log.
            best_step = state["best"][0]
            log = [e for e in log if e[0] < best_step]
            backend.reset()
            replay(backend.tensors, log, config)
    return Trained(log, plan, state["losses"], state["heldout"], best_step, time.perf_counter() - started)


def with_loss_on(examples: Sequence[Example], config: ZoConfig) -> list[Example]:
    """The training examples with the loss on their target message, or on every token after the first."""
    if config.loss_on == "target":
        return list(examples)
    return [dataclasses.replace(e, loss_from=1) for e in examples]


class LlamaControlVector:
    """A control vector trained in llama.cpp on the quantized model: one n_embd vector per layer from 1
    on (llama.cpp's layout), set in memory before every forward pass. No torch.

    `batched` (the default) scores a step's examples together, one sequence id each, in as few
    `llama_decode` calls as fit (adapters/scoring.py); `batched=False` is Ember 0.1's one call per
    example, kept as the benchmark's baseline. With `config.window` only the top layers' vectors are
    trained (`tensors` is that slice of `vector`), and only those layers run at each step
    (adapters/top_layers.py).
    """

    kind = "control_vector"

    def __init__(self, model_path: Path, examples: Sequence[Example], config: ZoConfig, *,
                 base_sha256: str | None, n_ctx: int = 512, batched: bool = True,
                 heldout: Sequence[Example] = ()):
        """`heldout`: with a window, the other examples `heldout()` will be asked about; their lower
        layers' output is computed with the training examples' before the full model is freed."""
        longest = max(len(e.tokens) for e in [*examples, *heldout]) if examples else 0
        self.evaluator = self.scorer = self.top = None
        self.examples = with_loss_on(examples, config)
        if config.window and not batched:
            raise InvalidInput("a ZO window needs batched scoring")
        if batched:
            from adapters.llama_log import quiet_llama
            from adapters.scoring import CAPACITY, BatchScorer

            # Only the model's owner: the scorer has a context of its own, so this one is the smallest
            # llama.cpp makes, with a batch of 8 (its compute buffer holds a batch's logits).
            self.llm = quiet_llama(model_path=str(model_path), n_ctx=256, n_batch=8, n_ubatch=8,
                                   logits_all=False, n_threads=config.threads, n_threads_batch=config.threads,
                                   seed=0)
            self._shape()
            # n_ctx: room for the longest sequence scored later, held-out examples included.
            capacity = max(CAPACITY, n_ctx, longest + 8)
            if config.window:
                from adapters.top_layers import TopLayers

                try:
                    self.top = TopLayers(self.llm, Path(model_path), config.window, threads=config.threads,
                                         capacity=capacity)
                    # Every sequence the run scores goes through the layers below now, once; then the
                    # full model is freed before the top layers' model is loaded: never both resident.
                    self.top.cache([(e.tokens, e.loss_from) for e in [*self.examples, *heldout]])
                    self.top.release_below()
                    self.llm.close()
                    self.llm = None
                    self.top.load_top()
                except BaseException:
                    self.close()
                    raise
                self.scorer = self.top.scorer
            else:
                self.scorer = BatchScorer(self.llm, threads=config.threads, capacity=capacity)
        else:
            from adapters.gate import Evaluator

            self.evaluator = Evaluator(model_path, n_ctx=max(n_ctx, longest + 8), threads=config.threads,
                                       base_sha256=base_sha256)
            self.llm = self.evaluator.llm
            self._shape()
        self.vector = np.zeros((self.n_layer - 1) * self.n_embd, dtype=np.float32)
        # A view: the ZO step writes the trained layers' part of the vector in place.
        self.tensors = [self.vector[self.top.first * self.n_embd:] if self.top else self.vector]

    def _shape(self) -> None:
        self.n_embd = self.llm.n_embd()
        self.n_layer = int(self.llm.metadata.get(f"{self.llm.metadata['general.architecture']}.block_count"))

    def reset(self) -> None:
        """Back to the initial state (no steering)."""
        self.vector[:] = 0

    def losses(self, indices: Sequence[int], examples: Sequence[Example] | None = None) -> np.ndarray:
        """Mean NLL per example with the current vector (`examples`: other than the training set)."""
        pool = self.examples if examples is None else examples
        chosen = [pool[i] for i in indices]
        if self.top is not None:
            return self.top.losses([(e.tokens, e.loss_from) for e in chosen], self.tensors[0])
        if self.scorer is not None:
            self.scorer.set_control_vector(self.vector, self.n_embd)
            return self.scorer.losses([(e.tokens, e.loss_from) for e in chosen])
        from adapters import runtime

        runtime.set_control_vector(self.llm, self.vector, self.n_embd)
        return np.array([self.evaluator.sequence_loss(e.tokens, e.loss_from) for e in chosen])

    def heldout(self, examples: Sequence[Example]) -> float:
        """Mean held-out loss with the current vector."""
        return float(self.losses(range(len(examples)), examples).mean())

    def directions(self) -> np.ndarray:
        """The trained vector as (n_layer − 1) × n_embd, row i for layer i + 1."""
        return self.vector.reshape(self.n_layer - 1, self.n_embd).copy()

    def close(self) -> None:
        """Free the scoring context and the model."""
        if self.top is not None:
            self.top.close()
        elif self.scorer is not None:
            self.scorer.close()
        elif self.evaluator is not None:
            self.evaluator.close()
            self.llm = None
        if self.llm is not None:
            self.llm.close()
            self.llm = None


class TorchLora:
    """LoRA A/B on the dequantized base in torch, evaluated in no_grad: ZO needs no autograd graph."""

    kind = "lora"

    def __init__(self, model_path: Path, cache_dir: Path, examples: Sequence[Example], config: ZoConfig):
        from adapters import lora

        self.torch = lora.import_torch()
        self.torch.set_grad_enabled(False)
        self.lora_config = lora.LoraConfig(rank=config.rank, alpha=config.alpha, layers=config.layers,
                                           modules=config.modules, epsilon=None, train_a=True,
                                           seed=config.seed, threads=config.threads,
                                           # (L+ - L-) / 2μ needs the losses' float32 digits
                                           dtype="float32")
        self.config = config
        self.prepared = lora.prepare(model_path, cache_dir, with_loss_on(examples, config), self.lora_config)
        self.params = [p for p in self.prepared.net.parameters() if p.requires_grad]
        self.initial = [p.detach().clone() for p in self.params]
        # numpy views share the parameters' memory: the ZO step writes the model directly.
        self.tensors = [p.detach().numpy() for p in self.params]
        self.prepared.net.eval()

    def reset(self) -> None:
        """Back to the LoRA init."""
        for t, p in zip(self.tensors, self.initial):
            np.copyto(t, p.numpy())

    def losses(self, indices: Sequence[int]) -> np.ndarray:
        """Mean NLL per example over its labelled tokens with the current LoRA weights."""
        from adapters.lora import sequence_losses

        idx = self.torch.as_tensor(list(indices), dtype=self.torch.long)
        p = self.prepared
        return sequence_losses(self.torch, p.lm_head, p.net(p.hidden[idx], p.mask[idx]), p.labels[idx]).numpy()

    def weights(self) -> dict[str, tuple[Any, Any]]:
        """(A, B) per adapted module, named as in the full model."""
        from adapters.lora import _lora_weights

        return _lora_weights(self.prepared.net, self.prepared.first)

    def close(self) -> None:
        """Give the base model its layers back."""
        self.prepared.close()
        self.torch.set_grad_enabled(True)


def log_document(config: ZoConfig, trained: Trained) -> str:
    """The update log as stored in the adapter (`ember.zo_log`): enough to rebuild it by `replay`."""
    return json.dumps({"config": dataclasses.asdict(config), "best_step": trained.best_step,
                       "log": [list(e) for e in trained.log]}, separators=(",", ":"))
