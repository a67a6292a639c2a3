"""The router's uncertainty probe, run beside the chat, never in it.

The chat's llama.cpp context holds the conversation's KV cache: evaluating anything else in it throws
that away, and the next reply re-reads the whole history. The probe therefore runs in small contexts of
its own, created on the engine's loaded weights (no second copy of the model): one for the base model
and one with the adapter applied to it alone. Each keeps the tokens of its last probe in its KV cache,
so the next probe evaluates only what differs (the chat template's system prefix is shared).

The two run at once, each on half the engine's threads (one each on two cores): a probe is a few dozen
tokens, too little work to split well, and a decode split over threads that wait for each other at
every step stalled for seconds when other processes had the cores (measured on the busy 2-core box:
two threads one lane after the other, p50 0.2-2.6 s with 22 s stalls; one thread per lane side by side,
0.2-0.4 s and none). The values do not depend on the thread count.

Reading ahead (`read_ahead`): while the user is still typing, the chat feeds the words typed so far into
both lanes, so that when the message is sent only its last word and the template's tail are left to
evaluate. Nothing is stored; a draft that changes only rewinds the lanes to what it still shares.
"""
from __future__ import annotations

import ctypes
import dataclasses
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    from assistant.engine import Engine

# The entropy of the answer's first token: a second greedy token cost one more decode per lane (~25 ms
# of the ~230 ms decision with an adapter, measured by `ember bench engine`) for a feature the router
# fits from the log either way.
PROBE_TOKENS = 1
# The probe's prompt and its greedy tokens fill one 256-token context (llama.cpp pads contexts to
# multiples of 256, so a bigger limit would double the probe's memory).
PROBE_MAX_TOKENS = 256 - PROBE_TOKENS


def entropy(logits: np.ndarray) -> float:
    """Entropy (nats) of the softmax of `logits`."""
    z = logits.astype(np.float64) - logits.max()
    p = np.exp(z)
    p /= p.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@dataclasses.dataclass
class _Lane:
    """One probe context and the tokens its KV cache holds."""

    ctx: Any                   # llama_cpp._internals.LlamaContext
    batch: Any                 # llama_cpp._internals.LlamaBatch, its own: the lanes run at once
    tokens: list[int]
    adapter: Any = None        # the adapters.runtime.Loaded applied to it (None: the base model)


class Prober:
    """Entropy probes for one engine, in contexts of their own on its loaded model."""

    def __init__(self, engine: Engine):
        import llama_cpp
        from llama_cpp import _internals

        llm = engine.llm
        self._model = llm._model
        self._n_vocab = llm.n_vocab()
        self._eos = llm.token_eos()
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)  # the engine's flags
        params.n_ctx = params.n_batch = params.n_ubatch = PROBE_MAX_TOKENS + PROBE_TOKENS
        params.n_seq_max = 1
        params.n_threads = max(1, params.n_threads // 2)
        params.n_threads_batch = max(1, params.n_threads_batch // 2)
        self._new_lane = lambda: _Lane(
            _internals.LlamaContext(model=self._model, params=params, verbose=False),
            _internals.LlamaBatch(n_tokens=params.n_batch, embd=0, n_seq_max=1, verbose=False), [])
        self._lanes: dict[bool, _Lane] = {}
        self._beside = ThreadPoolExecutor(max_workers=1, thread_name_prefix="probe")
        self._lock = threading.Lock()   # one probe or read-ahead at a time on the lanes

    def entropies(self, tokens: Sequence[int], adapter: Any, n: int = PROBE_TOKENS) -> tuple[float, float]:
        """`entropy` of `tokens` with the base model and with `adapter`, both measured at once."""
        self._check(tokens)
        with self._lock:
            return self._both(adapter, self._measure, tokens, n)

    def read_ahead(self, tokens: Sequence[int], adapter: Any) -> int:
        """Evaluate `tokens` (the start of a probe prompt still being typed) in both lanes, keeping what
        they already hold of it; returns how many tokens were evaluated per lane (0: all were held).
        A later `entropies` on a prompt that starts with `tokens` evaluates only the rest."""
        if not tokens:
            return 0
        self._check(tokens)
        with self._lock:
            return max(self._both(adapter, self._prefill, tokens))

    def entropy(self, tokens: Sequence[int], adapter: Any = None, n: int = PROBE_TOKENS) -> float:
        """Mean entropy (nats) of the next-token distribution over the first `n` greedy tokens after
        `tokens`, with `adapter` (an adapters.runtime.Loaded; None: the base model)."""
        self._check(tokens)
        with self._lock:
            return self._measure(self._lane(adapter), tokens, n)

    def held(self, adapter: Any = None) -> list[int]:
        """The tokens the lane of `adapter` (None: the base model's) holds in its KV cache."""
        with self._lock:
            lane = self._lanes.get(adapter is not None)
            return list(lane.tokens) if lane is not None and lane.adapter is adapter else []

    def _both(self, adapter: Any, work: Callable[..., Any], *args: Any) -> tuple[Any, Any]:
        """`work(lane, *args)` on the base lane here and on the adapter's lane beside it, at once."""
        base_lane, adapter_lane = self._lane(None), self._lane(adapter)   # set up here, run apart
        with_adapter = self._beside.submit(work, adapter_lane, *args)
        try:
            base = work(base_lane, *args)
        finally:
            adapted = with_adapter.result()
        return base, adapted

    def _prefill(self, lane: _Lane, tokens: Sequence[int]) -> int:
        tokens = list(tokens)
        keep = _shared(lane.tokens, tokens, len(tokens))
        if keep == len(tokens):   # held already, perhaps with more after it: keep that too
            return 0
        keep = _whole_batches(keep, len(tokens))
        self._forget(lane, keep)
        self._decode(lane, tokens[keep:])
        return len(tokens) - keep

    def _check(self, tokens: Sequence[int]) -> None:
        if self._model.model is None:
            raise RuntimeError("the engine this prober belongs to is closed")
        if not 0 < len(tokens) <= PROBE_MAX_TOKENS:
            raise ValueError(f"a probe takes 1 to {PROBE_MAX_TOKENS} tokens, not {len(tokens)}")

    def _measure(self, lane: _Lane, tokens: Sequence[int], n: int) -> float:
        entropies = []
        feed = self._reuse(lane, list(tokens))
        for _ in range(n):
            logits = self._decode(lane, feed)
            entropies.append(entropy(logits))
            feed = [int(np.argmax(logits))]
            if feed[0] == self._eos:
                break
        return float(np.mean(entropies))

    def _lane(self, adapter: Any) -> _Lane:
        lane = self._lanes.get(adapter is not None)
        if lane is None:
            lane = self._lanes[adapter is not None] = self._new_lane()
        if adapter is not lane.adapter:
            # Another adapter (or a hot-swap): its KV was computed under other weights.
            _apply(lane.ctx, adapter)
            lane.adapter = adapter
            self._forget(lane, 0)
        return lane

    def _reuse(self, lane: _Lane, tokens: list[int]) -> list[int]:
        """Keep the KV of the longest prefix `tokens` shares with the last probe; return what is left to
        evaluate (at least the last token, whose logits the probe needs)."""
        keep = _whole_batches(_shared(lane.tokens, tokens, len(tokens) - 1), len(tokens))
        self._forget(lane, keep)
        return tokens[keep:]

    def _forget(self, lane: _Lane, keep: int) -> None:
        import llama_cpp

        llama_cpp.llama_memory_seq_rm(lane.ctx.memory, 0, keep, -1)
        del lane.tokens[keep:]

    def _decode(self, lane: _Lane, feed: list[int]) -> np.ndarray:
        import llama_cpp

        lane.batch.set_batch(feed, n_past=len(lane.tokens), logits_all=False)
        lane.ctx.decode(lane.batch)
        lane.tokens += feed
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(lane.ctx.ctx, -1), shape=(self._n_vocab,))

    def close(self) -> None:
        """Free the probe contexts (they are also freed with the engine's model)."""
        self._beside.shutdown(wait=True)
        with self._lock:
            for lane in self._lanes.values():
                lane.ctx.close()
                lane.batch.close()
            self._lanes.clear()


def _shared(held: Sequence[int], tokens: Sequence[int], limit: int) -> int:
    """How many leading tokens `held` and `tokens` share, at most `limit`."""
    keep, limit = 0, min(len(held), limit)
    while keep < limit and held[keep] == tokens[keep]:
        keep += 1
    return keep


def _whole_batches(keep: int, total: int) -> int:
    """`keep`, one less when that would leave a single token to evaluate. llama.cpp's CPU matrix kernels
    for a batch of one token are not those of larger batches: on the bundled SmolLM2 (Q4_1) the logits
    after a prompt fed in one batch and after the same prompt whose last token came alone differ by up
    to 0.7. Never feeding one token alone keeps a probe's values independent of what its lane held."""
    return keep - 1 if total - keep == 1 and keep > 0 else keep


def _apply(ctx: Any, loaded: Any) -> None:
    """Apply `loaded` (an adapters.runtime.Loaded, LoRA or control vector; None: none) to one context,
    as adapters.runtime.apply does to the chat's."""
    import llama_cpp

    from adapters.errors import AdapterInvalid

    from adapters.runtime import set_context_control_vector

    set_context_control_vector(ctx.ctx, loaded.vector if loaded is not None else None,
                               llama_cpp.llama_model_n_embd(llama_cpp.llama_get_model(ctx.ctx)))
    if loaded is None or loaded.handle is None:
        llama_cpp.llama_set_adapters_lora(ctx.ctx, None, 0, None)
    else:
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(loaded.handle)
        scales = (ctypes.c_float * 1)(1.0)
        if llama_cpp.llama_set_adapters_lora(ctx.ctx, adapters, 1, scales):
            raise AdapterInvalid(f"llama.cpp could not apply adapter {loaded.path.name} to the router's probe")


_PROBERS: "weakref.WeakKeyDictionary[Engine, Prober]" = weakref.WeakKeyDictionary()


def prober_for(engine: Engine) -> Prober:
    """The engine's prober, created on first use; its contexts are freed with the engine's model."""
    prober = _PROBERS.get(engine)
    if prober is None:
        prober = _PROBERS[engine] = Prober(engine)
    return prober
