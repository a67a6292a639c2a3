"""Adaptive layer tuning with early exits (EDGE-LLM, Yu et al., arXiv 2406.15758; upstream
GATECH-EIC/Edge-LLM `utils/trainer_wrappers.py`), on the frozen dequantized base, with DP-SGD.

Exits sit every `stride` decoder layers (and at the last layer). Exit e scores its layer's output with the
model's own frozen final norm and tied output head, times a small trainable per-exit norm gain (576
floats; the last exit's gain stays 1, since llama.cpp applies the plain final norm there). Training moves
a window shallow → deep: the window is the layers from the previous exit up to exit e, LoRA is trained
there with the loss at exit e, the layers below are frozen and run once per example per window (their
output cached in bfloat16), and the layers above are not run at all. Adapters trained in earlier windows
stay applied and frozen: the exported GGUF holds every window's LoRA, which llama.cpp applies in one pass.

The schedule. Upstream gives every window an equal block of steps (the last block takes the remainder)
and one lr (`final_share=None, shallow_lr_scale=1`). Upstream's windows never compose, though: its
evaluation restarts the LoRA stream from the base stream after each exit (`LlamaModel.forward` in
`models/edge_llama_modelling.py`), while here a shallow window's LoRA sits under every deeper layer, and
the chat reads the last exit only. So by default the last window takes `final_share` of the steps and the
windows that end at an intermediate exit train at `shallow_lr_scale` × lr (`ember bench layers` measures
both schedules: README, "Adaptive layers").

DP: every step, whatever its window, is one Poisson-sampled, clipped and noised step (Opacus), so the run
is `steps` compositions of the same subsampled Gaussian mechanism and is calibrated and accounted exactly
like `adapters.lora`. A checkpoint holds the step, every LoRA and gain, and the current window's
optimizer state: a killed run resumes in the window it was in.

Voting across exits (upstream `main.py`): `exit_log_probs` gives each exit's next-token log-distribution,
`vote` combines them by max confidence (the per-token element-wise max of the exits' softmax,
renormalised) or by average.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from adapters import lora, privacy
from adapters.base import import_torch, load_base, write_private
from adapters.dataset import Dataset, Example
from adapters.errors import InvalidInput


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig(lora.LoraConfig):
    """A LoRA run whose trained window moves across the decoder; `layers` is not used."""

    stride: int = 6                 # an exit every `stride` layers (and at the last one)
    exit_gain: bool = True          # train a per-exit gain on the frozen final norm (intermediate exits)
    dtype: str = "float32"          # the base is loaded in float32 (bf16 not measured for the windows' caches)
    final_share: float | None = 0.75  # the last window's share of the steps (the chat's exit); None: equal blocks
    shallow_lr_scale: float = 0.1   # the LoRA lr of windows ending at an intermediate exit, × lr (upstream: 1)


@dataclasses.dataclass(frozen=True)
class Window:
    """Layers `first`…`exit` (inclusive) trained for `steps` steps with the loss at exit `exit`."""

    first: int
    exit: int
    steps: int


@dataclasses.dataclass
class AdaptiveTrained(lora.Trained):
    """A finished adaptive run: every window's LoRA, each intermediate exit's norm gain."""

    gains: dict[int, list[float]] = dataclasses.field(default_factory=dict)
    windows: list[Window] = dataclasses.field(default_factory=list)


def exits(n_layers: int, stride: int) -> list[int]:
    """Exit layers: every `stride`-th (0-based: stride−1, 2·stride−1, …) and always the last."""
    if stride < 1 or stride > n_layers:
        raise InvalidInput(f"the exit stride must be between 1 and {n_layers} layers, not {stride}")
    found = list(range(stride - 1, n_layers, stride))
    return found if found and found[-1] == n_layers - 1 else found + [n_layers - 1]


def windows(n_layers: int, stride: int, steps: int, final_share: float | None = None) -> list[Window]:
    """The windows in training order, shallow → deep. With `final_share` None, equal blocks of steps (the
    remainder to the last window, as upstream); with a share in (0, 1], the last window takes that share of
    `steps` (rounded half up, at least one step) and the others split the rest equally (the remainder again last).
    Raises InvalidInput for a share outside (0, 1]."""
    ends = exits(n_layers, stride)
    starts = [0] + [e + 1 for e in ends[:-1]]
    if final_share is None or len(ends) == 1:
        last = steps - (steps // len(ends)) * (len(ends) - 1)
    elif not 0 < final_share <= 1:
        raise InvalidInput(f"the last window's share of the steps must be above 0 and at most 1, not {final_share}")
    else:
        last = min(steps, max(1, int(steps * final_share + 0.5)))
    per, rest = divmod(steps - last, max(len(ends) - 1, 1))
    return [Window(s, e, per if i < len(ends) - 1 else last + rest) for i, (s, e) in enumerate(zip(starts, ends))]


def window_at(plan: Sequence[Window], step: int) -> int:
    """Index of the window that takes step number `step` (0-based); len(plan) when all are done."""
    done = 0
    for i, w in enumerate(plan):
        done += w.steps
        if step < done:
            return i
    return len(plan)


@functools.cache
def _modules() -> tuple[Any, Any]:
    """(ExitGain, WindowNet) classes, built once torch is imported (and ExitGain's Opacus grad sampler)."""
    torch = import_torch()

    class ExitGain(torch.nn.Module):
        """A per-channel gain on the frozen final norm's output: exit logits = head(norm(h) · g)."""

        def __init__(self, width: int):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(width))

        def forward(self, x: Any) -> Any:
            return x * self.weight

    class WindowNet(torch.nn.Module):
        """Decoder layers `first`…`exit` of the (LoRA-carrying) base, then the frozen final norm and the
        exit's gain: the hidden state the tied head scores at exit `exit`."""

        def __init__(self, inner: Any, first: int, exit_: int, gain: Any | None):
            super().__init__()
            self.inner = inner
            self.inner.layers = torch.nn.ModuleList(list(inner.layers)[first:exit_ + 1])
            self.gain = gain

        def forward(self, hidden: Any, mask: Any) -> Any:
            out = self.inner(inputs_embeds=hidden.float(), attention_mask=mask, use_cache=False).last_hidden_state
            return self.gain(out) if self.gain is not None else out

    try:
        from opacus.grad_sample.utils import register_grad_sampler
    except ImportError:   # Opacus is needed under DP only
        return ExitGain, WindowNet

    @register_grad_sampler(ExitGain)
    def _gain_grad_sample(layer: Any, activations: list[Any], backprops: Any) -> dict[Any, Any]:
        # d loss / d g_c for each example: the sum over its tokens of activation_c · backprop_c.
        x = activations[0]
        return {layer.weight: (x * backprops).reshape(x.shape[0], -1, x.shape[-1]).sum(1)}

    return ExitGain, WindowNet


class Model:
    """The base with LoRA on every window's layers and one gain per intermediate exit."""

    def __init__(self, model_path: Path, cache_dir: Path, config: AdaptiveConfig):
        torch = import_torch()
        from peft import LoraConfig as PeftConfig, get_peft_model

        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        self.config = config
        self.base = load_base(model_path, cache_dir, threads=config.threads or None)
        torch.manual_seed(config.seed)   # after loading: see adapters.lora.prepare
        cfg = self.base.config
        self.n_layers = cfg.num_hidden_layers
        self.exits = exits(self.n_layers, config.stride)
        modules = list(config.modules + (lora.MLP if config.mlp else ()))
        self.peft = get_peft_model(self.base, PeftConfig(
            r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, target_modules=modules,
            layers_to_transform=list(range(self.n_layers))))
        gain_cls, _ = _modules()
        self.gains = {e: gain_cls(cfg.hidden_size) for e in self.exits[:-1]} if config.exit_gain else {}
        for g in self.gains.values():
            g.requires_grad_(False)
        self.shape = (cfg.num_attention_heads, cfg.num_key_value_heads, self.n_layers)
        self.full_layers = self.base.model.layers
        self.peft.requires_grad_(False)

    def lora_params(self) -> dict[str, Any]:
        """Every LoRA parameter by its name in the full model (`model.layers.N.….lora_B.default.weight`),
        whichever window's layers the base holds at the moment."""
        return {f"model.layers.{i}.{name}": p for i, layer in enumerate(self.full_layers)
                for name, p in layer.named_parameters() if ".lora_" in name}

    def train_window(self, window: Window) -> list[Any]:
        """Make `window`'s LoRA (and its exit's gain) the only trainable parameters; returns them."""
        train_a = self.config.train_a if self.config.train_a is not None else self.config.epsilon is None
        trainable = []
        for name, p in self.lora_params().items():
            layer = _layer_of(name)
            wanted = window.first <= layer <= window.exit and ("lora_B" in name or train_a)
            p.requires_grad_(wanted)
            if wanted:
                trainable.append(p)
        for e, g in self.gains.items():
            g.requires_grad_(e == window.exit)
            if e == window.exit:
                trainable.append(g.weight)
        return trainable

    def net(self, window: Window) -> Any:
        """The window's layers + final norm + exit gain (give the layers back with `restore`)."""
        _, window_cls = _modules()
        self.restore()
        return window_cls(self.base.model, window.first, window.exit, self.gains.get(window.exit))

    def restore(self) -> None:
        """Give the base model its full list of layers back."""
        self.base.model.layers = self.full_layers

    def weights(self) -> dict[str, tuple[Any, Any]]:
        """(A, B) per adapted module, named as in the full model; modules whose B is still zero left out."""
        found: dict[str, dict[str, Any]] = {}
        for name, p in self.lora_params().items():
            parts = name.split(".")
            module = ".".join(parts[:-3])
            found.setdefault(module, {})[parts[-3]] = p.detach().float().clone()
        return {m: (ab["lora_A"], ab["lora_B"]) for m, ab in sorted(found.items()) if bool(ab["lora_B"].any())}

    def gain_values(self) -> dict[int, list[float]]:
        """Each intermediate exit's gain, as plain floats (stored in the adapter file)."""
        return {e: [round(float(v), 6) for v in g.weight.detach()] for e, g in self.gains.items()}

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the model."""
        return {"lora": {k: v.detach().clone() for k, v in self.lora_params().items()},
                "gains": {e: g.weight.detach().clone() for e, g in self.gains.items()}}

    def load_state(self, saved: dict[str, Any]) -> None:
        """Put a checkpoint's LoRA and gains back."""
        torch = import_torch()
        params = self.lora_params()
        if set(params) != set(saved["lora"]) or set(self.gains) != set(saved["gains"]):
            raise ValueError("the checkpoint was written for another adaptive LoRA configuration")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved["lora"][name])
            for e, g in self.gains.items():
                g.weight.copy_(saved["gains"][e])


def _layer_of(name: str) -> int:
    return int(name.split(".")[2])


def train(model_path: Path, cache_dir: Path, data: Dataset, config: AdaptiveConfig, *,
          checkpoint: Path | None = None, on_step: Callable[[lora.Progress], None] | None = None,
          should_stop: Callable[[], bool] | None = None,
          on_window: Callable[[int, Window], None] | None = None,
          on_weights: tuple[int, Callable[[int, dict[str, tuple[Any, Any]]], None]] | None = None,
          ) -> AdaptiveTrained | None:
    """Train LoRA window by window on `data.train`; resume from `checkpoint` if it exists; None when stopped.

    `on_window(i, window)` is called when window i starts (or resumes); `on_weights=(k, f)` hands f the step
    and every LoRA's (A, B) every k steps. Raises InvalidInput for a stride the model cannot take.
    """
    torch = import_torch()
    examples = data.train
    model = Model(model_path, cache_dir, config)
    steps = lora.steps_for(config, len(examples))
    plan = lora.plan_for(config, len(examples))
    schedule = windows(model.n_layers, config.stride, steps, config.final_share)
    ids, mask, labels = lora._tensors(torch, examples, max(len(e.tokens) for e in examples))
    state: dict[str, Any] = {"step": 0, "losses": [], "window": -1, "optimizer": None}
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state(state)
    # The input to the window's first layer: computed once for window 0 (the embeddings), then carried
    # through each finished window's frozen layers, and kept in the checkpoint so a resumed run goes on
    # from exactly the cache it had.
    hidden, cached_for = state.get("hidden"), state.get("hidden_window", 0)
    started, done_at_start = time.perf_counter(), state["step"]
    lm_head = model.base.lm_head
    try:
        while state["step"] < steps:
            index = window_at(schedule, state["step"])
            window = schedule[index]
            if hidden is None:
                model.restore()
                hidden, cached_for = lora._frozen_hidden(torch, model.base, ids, mask, window.first), index
            while cached_for < index:
                hidden = _advance(torch, model, schedule[cached_for], hidden, mask)
                cached_for += 1
            state["hidden"], state["hidden_window"] = hidden, cached_for
            if on_window is not None:
                on_window(index, window)
            stopped = _run_window(torch, model, window, index, schedule, hidden, mask, labels, lm_head, plan,
                                  config, state, steps, checkpoint, on_step, should_stop, on_weights,
                                  started, done_at_start)
            if stopped:
                return None
        weights, gains = model.weights(), model.gain_values()
    finally:
        model.restore()
    return AdaptiveTrained(weights, plan, state["losses"], time.perf_counter() - started, *model.shape,
                           gains=gains, windows=schedule)


def _advance(torch: Any, model: Model, window: Window, hidden: Any, mask: Any, batch: int = 8) -> Any:
    """The cached input to `window` carried through its (now frozen) layers: the next window's input."""
    _, window_cls = _modules()
    net = window_cls(model.base.model, window.first, window.exit, None)
    caught: list[Any] = []

    def take(_module: Any, args: tuple[Any, ...]) -> None:
        caught.append(args[0])
        raise lora._Reached

    hook = model.base.model.norm.register_forward_pre_hook(take)
    out = []
    try:
        with torch.no_grad():
            for i in range(0, len(hidden), batch):
                try:
                    net(hidden[i:i + batch], mask[i:i + batch])
                except lora._Reached:
                    pass
                out.append(caught.pop().to(torch.bfloat16))
    finally:
        hook.remove()
        model.restore()
    return torch.cat(out)


def _run_window(torch: Any, model: Model, window: Window, index: int, schedule: list[Window], hidden: Any,
                mask: Any, labels: Any, lm_head: Any, plan: privacy.Plan | None, config: AdaptiveConfig,
                state: dict[str, Any], steps: int, checkpoint: Path | None, on_step: Any, should_stop: Any,
                on_weights: Any, started: float, done_at_start: int) -> bool:
    """Train one window from wherever `state` is in it to its end; True when stopped early."""
    params = model.train_window(window)
    net = model.net(window)
    optimizer = torch.optim.AdamW(_param_groups(model, window, params, config, last=index == len(schedule) - 1),
                                  lr=config.lr, weight_decay=0.0)
    window_start = sum(w.steps for w in schedule[:index])
    net, optimizer, loader, sampling = lora.batches(torch, net, optimizer, (hidden, mask, labels),
                                                    min(config.batch_size, len(hidden)), plan, config.seed)
    if state.get("window") == index and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    per_epoch = len(loader)
    window_end = window_start + window.steps
    net.train()
    try:
        while state["step"] < window_end:
            epoch, done_in_epoch = divmod(state["step"] - window_start, per_epoch)
            if plan is None:
                # As adapters.lora: the order is a function of (seed, window, epoch), so a resumed run
                # takes exactly the batches an uninterrupted one would.
                sampling.manual_seed(config.seed * 100_003 + index * 1_009 + epoch)
            for at, (batch_hidden, batch_mask, batch_labels) in enumerate(loader):
                if plan is None and at < done_in_epoch:
                    continue
                if state["step"] >= window_end:
                    break
                loss = lora._step(torch, net, optimizer, lm_head, batch_hidden, batch_mask, batch_labels)
                state["step"] += 1
                state["losses"].append(loss)
                state["window"] = index
                stop = should_stop is not None and should_stop()
                if checkpoint is not None and (stop or state["step"] % config.checkpoint_every == 0
                                               or state["step"] == window_end):
                    _save(torch, checkpoint, model, optimizer, state)
                if on_step is not None:
                    per_step = (time.perf_counter() - started) / (state["step"] - done_at_start)
                    eps = (privacy.epsilon_spent(plan.sigma, plan.sample_rate, state["step"], plan.delta)
                           if plan is not None else None)
                    on_step(lora.Progress(state["step"], steps, loss, eps, per_step * (steps - state["step"])))
                if on_weights is not None and state["step"] % on_weights[0] == 0:
                    on_weights[1](state["step"], model.weights())
                if stop:
                    return True
    finally:
        if hasattr(net, "remove_hooks"):
            net.remove_hooks()   # Opacus' hooks stay on the window's layers otherwise
        model.restore()
        for p in params:
            p.requires_grad_(False)
            if hasattr(p, "grad_sample"):
                p.grad_sample = None
    return False


def _param_groups(model: Model, window: Window, params: list[Any], config: AdaptiveConfig, *,
                  last: bool) -> list[dict[str, Any]]:
    """The optimizer's groups: the window's LoRA at lr (× `shallow_lr_scale` unless it is the last window),
    its exit's gain (if any) at lr."""
    gain = model.gains.get(window.exit)      # in `params` whenever the exit has one (`train_window`)
    groups = [{"params": [p for p in params if gain is None or p is not gain.weight],
               "lr": config.lr * (1.0 if last else config.shallow_lr_scale)}]
    return groups + ([{"params": [gain.weight], "lr": config.lr}] if gain is not None else [])


def _save(torch: Any, path: Path, model: Model, optimizer: Any, state: dict[str, Any]) -> None:
    """Checkpoint atomically: a kill mid-write leaves the previous checkpoint intact."""
    buffer = io.BytesIO()
    torch.save({"step": state["step"], "losses": state["losses"], "window": state["window"],
                "optimizer": optimizer.state_dict(), "hidden": state["hidden"],
                "hidden_window": state["hidden_window"], **model.state()}, buffer)
    write_private(path, buffer.getvalue())


def gains_document(trained: AdaptiveTrained, config: AdaptiveConfig) -> str:
    """The exits and their gains as one JSON string (stored in the adapter file as `ember.exits`)."""
    return json.dumps({"stride": config.stride, "exits": [w.exit for w in trained.windows],
                       "gains": {str(e): g for e, g in trained.gains.items()}})


# ---- voting across exits (evaluation in torch) ----

def exit_log_probs(model: Any, ids: Any, mask: Any, exit_layers: Sequence[int],
                   gains: dict[int, Any] | None = None, positions: Any | None = None) -> Any:
    """Next-token log-probabilities at each exit: tensor (exits, batch, tokens, vocab), float32, or
    (exits, n, vocab) at the n True places of the boolean (batch, tokens) `positions` only.

    Exit e = log_softmax(head(final_norm(h_e) · g_e)), h_e the output of decoder layer e (forward hooks,
    as upstream); the last layer's exit is the model's own output.
    """
    torch = import_torch()
    inner = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    head = model.get_base_model().lm_head if hasattr(model, "get_base_model") else model.lm_head
    caught: dict[int, Any] = {}
    hooks = [inner.layers[e].register_forward_hook(
        lambda _m, _a, out, e=e: caught.__setitem__(e, out[0] if isinstance(out, tuple) else out))
        for e in exit_layers]
    try:
        with torch.no_grad():
            inner(input_ids=ids, attention_mask=mask, use_cache=False)
            out = []
            for e in exit_layers:
                h = inner.norm(caught[e] if positions is None else caught[e][positions])
                if gains and e in gains:
                    h = h * torch.as_tensor(gains[e], dtype=h.dtype)
                out.append(torch.log_softmax(head(h).float(), dim=-1))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(out)


def vote(log_probs: Any, how: str, weights: Sequence[float] | None = None) -> Any:
    """Combine exits' log-distributions (exits, …, vocab) into one: `max` (per token, the element-wise
    max of the exits' probabilities, renormalised: EDGE-LLM's voting), `mean`, or `weighted` (the mixture
    Σ_e w_e·p_e with `weights` from `bank_weights`). Returns log-probs."""
    torch = import_torch()
    if how == "max":
        best = log_probs.max(dim=0).values
        return best - torch.logsumexp(best, dim=-1, keepdim=True)
    if how == "mean":
        return torch.logsumexp(log_probs, dim=0) - torch.log(torch.tensor(float(log_probs.shape[0])))
    if how == "weighted":
        if weights is None or len(weights) != log_probs.shape[0]:
            raise ValueError("a weighted vote needs one weight per exit")
        w = torch.tensor([max(float(x), 1e-12) for x in weights], dtype=log_probs.dtype).log()
        return torch.logsumexp(log_probs + w.reshape(-1, *([1] * (log_probs.dim() - 1))), dim=0)
    raise ValueError(f"unknown vote {how!r}: max, mean or weighted")


def mixture_weights(gold_log_probs: Any, iterations: int = 200) -> list[float]:
    """Per-exit weights w (summing to 1) that maximise the likelihood of the mixture Σ_e w_e·p_e(gold) on
    a bank of tokens: `gold_log_probs` is (exits, tokens), each exit's log-probability of the true next
    token. EM for interpolation weights (Jelinek & Mercer 1980; Dempster, Laird & Rubin 1977): each
    iteration's likelihood is at least the last one's."""
    torch = import_torch()
    lp = gold_log_probs.double()
    w = torch.full((lp.shape[0],), 1.0 / lp.shape[0], dtype=torch.float64)
    for _ in range(iterations):
        joint = lp + w.log()[:, None]                          # log w_e p_e(gold), (exits, tokens)
        w = (joint - torch.logsumexp(joint, dim=0, keepdim=True)).exp().mean(dim=1)   # mean responsibility
    return [float(x) for x in w]


def gold_log_probs(model: Any, examples: list[Example], exit_layers: Sequence[int],
                   gains: dict[int, Any] | None = None, batch: int = 4) -> Any:
    """Each exit's log-probability of the true next token at every loss-carrying place of `examples`:
    tensor (exits, tokens), float32 (the bank `mixture_weights` is fitted on)."""
    torch = import_torch()
    out = [lp.gather(2, gold[None, :, None].expand(lp.shape[0], -1, 1))[..., 0]
           for lp, gold in _exit_batches(model, examples, exit_layers, gains, batch)]
    return torch.cat(out, dim=1)


def _exit_batches(model: Any, examples: list[Example], exit_layers: Sequence[int], gains: dict[int, Any] | None,
                  batch: int) -> Iterator[tuple[Any, Any]]:
    """(log-probabilities (exits, tokens, vocab), true next tokens (tokens,)) at the loss-carrying places of
    `examples`, `batch` examples at a time."""
    torch = import_torch()
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        ids, mask, labels = lora._tensors(torch, chunk, max(len(e.tokens) for e in chunk))
        target = labels[:, 1:]
        where = target != -100
        predicts = torch.zeros_like(labels, dtype=torch.bool)
        predicts[:, :-1] = where                      # the places whose next token carries loss
        yield exit_log_probs(model, ids, mask, exit_layers, gains, positions=predicts), target[where]


def voting_scores(model: Any, examples: list[Example], exit_layers: Sequence[int],
                  gains: dict[int, Any] | None = None, batch: int = 4,
                  weights: Sequence[float] | None = None) -> dict[str, dict[str, float]]:
    """Next-token accuracy and mean NLL over the loss-carrying tokens of `examples`, for each exit alone,
    max-confidence voting, average voting and, given `weights` (one per exit, from `mixture_weights` on a
    bank of other examples), the weighted mixture `vote_bank`: {name: {"accuracy", "nll", "tokens"}}."""
    totals: dict[str, list[float]] = {}
    for lp, gold in _exit_batches(model, examples, exit_layers, gains, batch):
        picked = {f"exit_{e}": lp[k] for k, e in enumerate(exit_layers)}
        picked["vote_max"] = vote(lp, "max")
        picked["vote_mean"] = vote(lp, "mean")
        if weights is not None:
            picked["vote_bank"] = vote(lp, "weighted", weights)
        for name, rows in picked.items():
            nll = -rows.gather(1, gold[:, None])[:, 0]
            hit = (rows.argmax(-1) == gold).float()
            t = totals.setdefault(name, [0.0, 0.0, 0.0])
            t[0] += float(hit.sum())
            t[1] += float(nll.sum())
            t[2] += float(len(gold))
    return {name: {"accuracy": round(h / n, 4), "nll": round(s / n, 4), "tokens": int(n)}
            for name, (h, s, n) in totals.items()}
