"""DP-SGD LoRA training on the frozen, dequantized base (peft + Opacus).

Only the top `layers` decoder layers carry LoRA (EDGE-LLM's adaptive layer tuning, arXiv 2406.15758):
the layers below are frozen and see no adapter, so their output for each example is computed once and
training runs the top layers alone. That makes a CPU step several times cheaper, and keeps the number of
DP-trained parameters, and with it the norm of the privacy noise, small.

DP-SGD (Abadi et al., arXiv 1607.00133): Poisson-sampled batches, per-example gradient clipping to norm
C and Gaussian noise σ·C, all done by Opacus at its seams (PrivacyEngine.make_private); σ is calibrated
from the target (ε, δ) by `adapters.privacy`. Noise and sampling come from torch generators seeded with
63 bits from the OS (`secrets`), fresh for every run and every resume. That is not Opacus' secure_mode
(a CSPRNG, via torchcsprng, which has no build for current torch): the floating-point and PRNG caveats
of Mironov (CCS 2012) apply, as they do to most DP-SGD deployments.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import secrets
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from adapters import architectures, privacy
from adapters.base import import_torch, load_base, write_private
from adapters.dataset import Dataset, Example

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Everything that shapes a LoRA run; saved with the checkpoint and the adapter."""

    # Small on purpose: DP noise grows with √(trainable parameters), so under ε=8 a rank-2 adapter on
    # two layers learns where rank 8 on four layers drowns (measured on the synthetic habit user).
    rank: int = 2
    alpha: float = 16.0
    layers: int = 2                 # adapt the top N decoder layers
    modules: tuple[str, ...] = ("q_proj", "v_proj", "o_proj")
    mlp: bool = False               # also adapt the MLP projections
    train_a: bool | None = None     # None: train A only without DP (FFA-LoRA freezes it under DP)
    lr: float = 1e-2
    batch_size: int = 32
    epochs: float = 8.0             # expected passes over the training set (steps = epochs / q)
    steps: int | None = None        # overrides epochs
    clip: float = 1.0               # C: per-example gradient norm bound
    epsilon: float | None = 8.0     # None: no differential privacy
    delta: float | None = None      # None: min(1/n², 1e-6)
    seed: int = 0
    threads: int = 0
    checkpoint_every: int = 10
    dtype: str = "auto"             # the frozen base's dtype: float32, bfloat16, or auto (bf16 where the CPU has it and the model is large, base.resolve_dtype)


@dataclasses.dataclass
class Progress:
    """One step's report: shown by the CLI's progress bar and, through the database, by the chat."""

    step: int
    steps: int
    loss: float
    epsilon: float | None
    eta_seconds: float


@dataclasses.dataclass
class Trained:
    """A finished run: the LoRA weights by module name, and what it cost."""

    weights: dict[str, tuple[Any, Any]]
    plan: privacy.Plan | None
    losses: list[float]
    seconds: float
    n_head: int
    n_head_kv: int
    n_layers: int


def steps_for(config: LoraConfig, n_train: int) -> int:
    """Optimizer steps: `config.steps`, else enough for `epochs` expected passes."""
    if config.steps is not None:
        return config.steps
    rate = min(1.0, config.batch_size / n_train)
    return max(1, math.ceil(config.epochs / rate))


def plan_for(config: LoraConfig, n_train: int) -> privacy.Plan | None:
    """The DP plan (σ calibrated to ε) for this run, or None without DP."""
    if config.epsilon is None:
        return None
    return privacy.plan(n_train, epsilon=config.epsilon, delta=config.delta,
                        batch_size=config.batch_size, steps=steps_for(config, n_train), clip=config.clip)


def _tensors(torch: Any, examples: list[Example], length: int) -> tuple[Any, Any, Any]:
    """Right-padded token ids, attention mask and labels (-100 where no loss falls)."""
    ids = torch.zeros((len(examples), length), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, ex in enumerate(examples):
        n = len(ex.tokens)
        ids[i, :n] = torch.tensor(ex.tokens)
        mask[i, :n] = 1
        labels[i, ex.loss_from:n] = ids[i, ex.loss_from:n]
    return ids, mask, labels


class _Reached(Exception):
    """Raised by the hook below once the input to the first adapted layer is in hand."""


def _frozen_hidden(torch: Any, model: Any, ids: Any, mask: Any, first: int, batch: int = 8) -> Any:
    """The input to decoder layer `first` for every sequence (the frozen layers below run once).

    Only the layers below `first` run: a hook on layer `first` takes its input and stops the forward
    pass, so neither the layers above nor every layer's hidden states are computed or held. Kept in
    bfloat16 (half the memory: 1,000 examples of 192 tokens take 220 MB; float16 could overflow on the
    massive activations some models carry) and widened per batch.
    """
    out = []
    caught: list[Any] = []

    def take(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        caught.append(args[0] if args else kwargs["hidden_states"])
        raise _Reached

    hook = model.model.layers[first].register_forward_pre_hook(take, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(0, len(ids), batch):
                try:
                    model.model(input_ids=ids[i:i + batch], attention_mask=mask[i:i + batch], use_cache=False)
                except _Reached:
                    pass
                out.append(caught.pop().to(torch.bfloat16))
    finally:
        hook.remove()
    return torch.cat(out)


# Labelled tokens per slice of the output head: 64 × 49,152 float32 logits (SmolLM2's vocabulary) is
# 12.6 MB, where the whole batch's logits, their log-softmax and their gradient were held at once.
HEAD_CHUNK = 64


def _head_weight(lm_head: Any) -> Any | None:
    """The output head's (vocabulary, width) matrix, or None for a head that is not a plain bias-free linear."""
    weight = getattr(lm_head, "weight", None)
    if weight is None or getattr(lm_head, "bias", None) is not None or type(lm_head).__name__ != "Linear":
        return None
    return weight


def _token_losses(torch: Any, weight: Any, x: Any, target: Any, scale: Any | None) -> tuple[Any, Any | None]:
    """Cross-entropy of each row of `x` (N, width) against `target` (N,) under the head `weight` (V, width),
    one slice of HEAD_CHUNK rows at a time; with `scale` (N,), also d(Σ scale·loss)/dx, computed in the
    same slice (the softmax minus the one-hot, through the head), so no slice's logits outlive it.
    Returns (losses (N,) float32, gradient (N, width) in x's dtype or None). No autograd graph is built."""
    losses = torch.empty(len(x), dtype=torch.float32)
    grad = None if scale is None else torch.empty_like(x)
    with torch.no_grad():
        for start in range(0, len(x), HEAD_CHUNK):
            rows = slice(start, start + HEAD_CHUNK)
            logits = (x[rows].to(weight.dtype) @ weight.T).float()
            lse = torch.logsumexp(logits, dim=1)
            losses[rows] = lse - logits.gather(1, target[rows, None])[:, 0]
            if grad is not None:
                probs = torch.exp(logits.sub_(lse[:, None]))
                probs[torch.arange(len(probs)), target[rows]] -= 1.0
                probs.mul_(scale[rows, None])
                grad[rows] = (probs.to(weight.dtype) @ weight).to(x.dtype)
    return losses, grad


def _head_loss_function(torch: Any) -> Any:
    class HeadCrossEntropy(torch.autograd.Function):
        """Σ scale_i · CE(head(x_i), target_i) with the head frozen: its gradient to x is computed in the
        forward pass, slice by slice (the fused linear cross-entropy of Liger-Kernel,
        linkedin/Liger-Kernel src/liger_kernel/ops/fused_linear_cross_entropy.py), so the (N, V) logits,
        their log-softmax and their gradient never exist whole."""

        @staticmethod
        def forward(ctx: Any, x: Any, weight: Any, target: Any, scale: Any) -> Any:
            losses, grad = _token_losses(torch, weight, x, target, scale if ctx.needs_input_grad[0] else None)
            ctx.save_for_backward(grad if grad is not None else x.new_zeros(()))
            return (losses * scale).sum()

        @staticmethod
        def backward(ctx: Any, grad_output: Any) -> tuple[Any, None, None, None]:
            (grad,) = ctx.saved_tensors
            return grad * grad_output.to(grad.dtype), None, None, None

    return HeadCrossEntropy


def _labelled(hidden: Any, labels: Any) -> tuple[Any, Any, Any]:
    """(rows of `hidden` that predict a labelled token, those tokens, the (B, T-1) mask that chose them)."""
    target = labels[:, 1:]
    where = target != -100
    return hidden[:, :-1][where], target[where], where


def sequence_losses(torch: Any, lm_head: Any, hidden: Any, labels: Any) -> Any:
    """Mean next-token loss of each sequence over its labelled tokens, shape (B,) float32 (logits only
    where needed, a slice at a time). Not differentiable: training takes `batch_loss`."""
    x, target, where = _labelled(hidden, labels)
    weight = _head_weight(lm_head)
    if weight is None:
        with torch.no_grad():
            token_loss = torch.nn.functional.cross_entropy(lm_head(x).float(), target, reduction="none")
    else:
        token_loss, _ = _token_losses(torch, weight, x, target, None)
    return _per_sequence(torch, token_loss, where)


def _per_sequence(torch: Any, token_loss: Any, where: Any) -> Any:
    """Each sequence's mean of `token_loss` (one per True of `where`, (B, T-1)) over its own tokens, (B,);
    0 for a sequence with none."""
    rows = where.nonzero()[:, 0]
    total = torch.zeros(len(where), dtype=token_loss.dtype).index_add(0, rows, token_loss)
    return total / where.sum(1).clamp(min=1)


def batch_loss(torch: Any, lm_head: Any, hidden: Any, labels: Any) -> Any:
    """The training loss: the mean over the batch's sequences of each one's mean next-token loss over its
    labelled tokens (a sequence with none counts 0), a differentiable float32 scalar.

    hidden: (B, T, width) from the trainable net; labels: (B, T), -100 where no loss is taken. The frozen
    head's logits are made HEAD_CHUNK rows at a time and its gradient to `hidden` computed with them."""
    x, target, where = _labelled(hidden, labels)
    weight = _head_weight(lm_head)
    if weight is None:   # another head: autograd through its whole logits
        token_loss = torch.nn.functional.cross_entropy(lm_head(x).float(), target, reduction="none")
        return _per_sequence(torch, token_loss, where).mean()
    scale = (1.0 / (where.sum(1).clamp(min=1).float() * len(labels)))[where.nonzero()[:, 0]]
    return _head_loss_function(torch).apply(x, weight.detach(), target, scale)


def _top_layers(torch: Any) -> Any:
    class TopLayers(torch.nn.Module):
        """The adapted top of the model: decoder layers from `first` on, then the final norm."""

        def __init__(self, inner: Any, first: int):
            super().__init__()
            self.inner = inner
            self.inner.layers = torch.nn.ModuleList(list(inner.layers)[first:])

        def forward(self, hidden: Any, mask: Any) -> Any:
            # The base's own dtype (float32, or bfloat16 with LoraConfig.dtype); peft keeps LoRA in float32.
            return self.inner(inputs_embeds=hidden.to(self.inner.norm.weight.dtype), attention_mask=mask,
                              use_cache=False).last_hidden_state

    return TopLayers


@dataclasses.dataclass
class Prepared:
    """The trainable top of the model and the cached inputs of its examples (shared with ZO training)."""

    net: Any              # decoder layers from `first` on + final norm, LoRA attached
    lm_head: Any
    hidden: Any           # input to layer `first` per example (bfloat16)
    mask: Any
    labels: Any
    first: int
    shape: tuple[int, int, int]   # n_head, n_head_kv, n_layers
    restore: Callable[[], None]

    def close(self) -> None:
        """Give the base model its full list of layers back."""
        self.restore()


def prepare(model_path: Path, cache_dir: Path, examples: list[Example], config: LoraConfig) -> Prepared:
    """Load the frozen base, attach LoRA to the top `config.layers` layers, run the rest once per example."""
    torch = import_torch()
    from peft import LoraConfig as PeftConfig, get_peft_model

    # Library chatter that says nothing to the user: peft calls a renamed transformers method, and
    # Opacus' hooks note that the frozen hidden states need no gradient (true, by design).
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)

    base = load_base(model_path, cache_dir, threads=config.threads or None, dtype=config.dtype)
    # Seeded after loading: building the base from the cache draws from the global generator and
    # dequantizing it the first time does not, and the LoRA init must not depend on which happened.
    torch.manual_seed(config.seed)
    n_layers = base.config.num_hidden_layers
    first = max(0, n_layers - config.layers)
    # Logical names (q_proj …) → this architecture's modules (Phi-3: the fused qkv_proj, gate_up_proj).
    modules = architectures.of_model(base).targets(config.modules + (MLP if config.mlp else ()))
    model = get_peft_model(base, PeftConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, target_modules=modules,
        layers_to_transform=list(range(first, n_layers))))
    if not (config.train_a if config.train_a is not None else config.epsilon is None):
        # FFA-LoRA (arXiv 2403.12313): with A frozen at its random init, only B learns; DP noise then
        # covers half the parameters, and the update stays linear in what is noised.
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    length = max(len(e.tokens) for e in examples)
    ids, mask, labels = _tensors(torch, examples, length)
    hidden = _frozen_hidden(torch, base, ids, mask, first)
    full_layers = base.model.layers

    def restore() -> None:
        base.model.layers = full_layers

    net = _top_layers(torch)(base.model, first)
    return Prepared(net, base.lm_head, hidden, mask, labels, first,
                    (base.config.num_attention_heads, base.config.num_key_value_heads, n_layers), restore)


def train(model_path: Path, cache_dir: Path, data: Dataset, config: LoraConfig, *,
          checkpoint: Path | None = None, on_step: Callable[[Progress], None] | None = None,
          should_stop: Callable[[], bool] | None = None,
          on_weights: tuple[int, Callable[[int, dict[str, tuple[Any, Any]]], None]] | None = None,
          init: dict[str, tuple[Any, Any]] | None = None) -> Trained | None:
    """Train LoRA on `data.train`; resume from `checkpoint` if it exists. None when stopped early.

    `init` ({module: (A, B)}, as `Trained.weights` names them) starts from given weights instead of
    peft's init: a household's global adapter (adapters/federated.py).

    `on_weights=(k, f)` hands f the step and the current (A, B) weights every k steps (for learning curves).

    The checkpoint (written atomically every `checkpoint_every` steps and on stop) holds the step, the
    LoRA weights, the optimizer state and the losses, so a killed run continues where it was.
    """
    torch = import_torch()
    prepared = prepare(model_path, cache_dir, data.train, config)
    net, lm_head, hidden, mask, labels = (prepared.net, prepared.lm_head, prepared.hidden, prepared.mask,
                                          prepared.labels)
    if init is not None:
        _load_init(torch, net, prepared.first, init)
    examples = data.train
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    steps = steps_for(config, len(examples))
    plan = plan_for(config, len(examples))
    # The privacy noise and the Poisson sampling must be unpredictable: they draw from generators seeded
    # by the OS, never from `config.seed` (which only fixes the LoRA init and the non-DP data order).
    net, optimizer, loader, sampling = batches(torch, net, optimizer, (hidden, mask, labels),
                                               min(config.batch_size, len(examples)), plan, config.seed)
    state = {"step": 0, "losses": []}
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        _load_trainable(net, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
    started, done_at_start = time.perf_counter(), state["step"]
    per_epoch = len(loader)
    net.train()
    try:
        while state["step"] < steps:
            epoch, done_in_epoch = divmod(state["step"], per_epoch)
            if plan is None:
                # Without DP the order is a function of (seed, epoch), so a resumed run takes exactly the
                # batches an uninterrupted one would. DP batches are fresh Poisson draws every step.
                sampling.manual_seed(config.seed * 100_003 + epoch)
            for index, (batch_hidden, batch_mask, batch_labels) in enumerate(loader):
                if plan is None and index < done_in_epoch:
                    continue
                if state["step"] >= steps:
                    break
                loss = _step(torch, net, optimizer, lm_head, batch_hidden, batch_mask, batch_labels)
                state["step"] += 1
                state["losses"].append(loss)
                stop = should_stop is not None and should_stop()
                # Checkpoint before reporting the step, so a step others have seen is never lost to a kill.
                if checkpoint is not None and (stop or state["step"] % config.checkpoint_every == 0):
                    _save(torch, checkpoint, net, optimizer, state)
                if on_step is not None:
                    elapsed = time.perf_counter() - started
                    per_step = elapsed / (state["step"] - done_at_start)
                    eps = (privacy.epsilon_spent(plan.sigma, plan.sample_rate, state["step"], plan.delta)
                           if plan is not None else None)
                    on_step(Progress(state["step"], steps, loss, eps, per_step * (steps - state["step"])))
                if on_weights is not None and state["step"] % on_weights[0] == 0:
                    on_weights[1](state["step"], _lora_weights(net, prepared.first))
                if stop:
                    return None
        weights = _lora_weights(net, prepared.first)
    finally:
        prepared.close()
    return Trained(weights, plan, state["losses"], time.perf_counter() - started, *prepared.shape)


def _step(torch: Any, net: Any, optimizer: Any, lm_head: Any, hidden: Any, mask: Any, labels: Any) -> float:
    """One optimizer step: mean loss of the batch's sequences, backward, (clip, noise,) update."""
    optimizer.zero_grad(set_to_none=True)
    if len(hidden) == 0:
        # A Poisson batch can be empty; DP-SGD still takes the step (noise only), as the accountant assumes.
        for p in (p for p in net.parameters() if p.requires_grad):
            p.grad_sample = torch.zeros((0, *p.shape))
        optimizer.step()
        return float("nan")
    loss = batch_loss(torch, lm_head, net(hidden, mask), labels)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _trainable(net: Any) -> dict[str, Any]:
    return {name: p for name, p in net.named_parameters() if p.requires_grad}


def _lora(net: Any) -> dict[str, Any]:
    return {name: p for name, p in net.named_parameters() if ".lora_" in name}


def _load_trainable(net: Any, saved: dict[str, Any]) -> None:
    params = _lora(net)
    if set(params) != set(saved):
        raise ValueError("the checkpoint was written for another LoRA configuration")
    with import_torch().no_grad():
        for name, p in params.items():
            p.copy_(saved[name])


def _load_init(torch: Any, net: Any, first: int, init: dict[str, tuple[Any, Any]]) -> None:
    """Copy given (A, B) into the LoRA parameters; every adapted module must be given, in its shape."""
    found = 0
    with torch.no_grad():
        for name, p in _lora(net).items():
            parts = name.split(".")
            at = parts.index("layers")
            module = ".".join(["model", "layers", str(int(parts[at + 1]) + first), *parts[at + 2:-3]])
            if module not in init:
                raise ValueError(f"the starting LoRA has no weights for {module}")
            value = torch.as_tensor(init[module][0 if parts[-3] == "lora_A" else 1], dtype=p.dtype)
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"the starting LoRA's {module} {parts[-3]} is {tuple(value.shape)}, "
                                 f"not {tuple(p.shape)}")
            p.copy_(value)
            found += 1
    if found != 2 * len(init):
        raise ValueError("the starting LoRA adapts modules this configuration does not")


def _save(torch: Any, path: Path, net: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Checkpoint atomically: a kill mid-write leaves the previous checkpoint intact."""
    buffer = io.BytesIO()
    torch.save({**state, "lora": {k: v.detach().clone() for k, v in _lora(net).items()},
                "optimizer": optimizer.state_dict()}, buffer)
    write_private(path, buffer.getvalue())


def _lora_weights(net: Any, first: int) -> dict[str, tuple[Any, Any]]:
    """(A, B) per adapted module, named as in the full model (`model.layers.N.self_attn.q_proj`)."""
    found: dict[str, dict[str, Any]] = {}
    for name, p in _lora(net).items():
        # e.g. "_module.inner.layers.2.self_attn.q_proj.lora_A.default.weight"
        parts = name.split(".")
        at = parts.index("layers")
        layer = int(parts[at + 1]) + first
        module = ".".join(["model", "layers", str(layer), *parts[at + 2:-3]])
        found.setdefault(module, {})[parts[-3]] = p.detach().float().clone()
    return {m: (ab["lora_A"], ab["lora_B"]) for m, ab in sorted(found.items())}


def checkpoint_exists(path: Path) -> bool:
    """Whether a resumable checkpoint is there."""
    return path.is_file() and os.path.getsize(path) > 0


def batches(torch: Any, net: Any, optimizer: Any, tensors: tuple[Any, ...], batch_size: int,
            plan: privacy.Plan | None, seed: int) -> tuple[Any, Any, Any, Any]:
    """(net, optimizer, loader, sampling generator) over `tensors` (equal first dimension) in shuffled
    batches of `batch_size`; with a DP `plan`, made private by Opacus (RDP accountant, Poisson sampling
    at rate q, Gaussian noise σ·C, per-example clip C). With DP the sampling and the noise draw from
    generators seeded by the OS; without, the order follows `seed` (callers re-seed the returned
    generator per epoch so that a resumed run takes the same batches)."""
    sampling = torch.Generator()
    sampling.manual_seed(secrets.randbits(63) if plan is not None else seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*tensors), batch_size=batch_size,
                                         shuffle=True, generator=sampling)
    if plan is None:
        return net, optimizer, loader, sampling
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        # Opacus' secure_mode needs torchcsprng, which has no build for current torch; the noise
        # generator below is seeded from the OS instead (see the module docstring).
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")
    noise = torch.Generator()
    noise.manual_seed(secrets.randbits(63))
    net, optimizer, loader = engine.make_private(
        module=net, optimizer=optimizer, data_loader=loader, noise_multiplier=plan.sigma,
        max_grad_norm=plan.clip, poisson_sampling=True, noise_generator=noise)
    return net, optimizer, loader, sampling
