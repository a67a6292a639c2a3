"""Score many sequences at once in llama.cpp: one sequence id per example, few `llama_decode` calls.

Zeroth-order training (adapters/zo.py) needs, for every step, the loss of each example of a batch under
+μz and again under −μz. Evaluating them one `llama_decode` per sequence (and a fresh context state each
time, with the logits of every position copied out) spent most of a step outside the model. Here a batch
is one decode, or a few when it does not fit:

- every example is its own sequence (`seq_id`) in one context, all of them in one KV cache
  (`kv_unified`);
- the prompt prefix the examples share (the chat template's system turn) is evaluated once, in sequence
  0, and copied to the others (`llama_memory_seq_cp`);
- logits are requested only where a loss is taken (positions `loss_from − 1 … len − 2`);
- a batch whose tokens do not fit the context is split into groups that do, never truncated. A single
  example longer than the context is refused (`ValueError`).

A control vector applies to the whole context, so the +μz and −μz evaluations of a step are two calls,
each with its vector set (`set_control_vector`).

Each example stays to itself: attention is masked per sequence, and with flash attention an example's
loss is the same, bit for bit, whatever the other sequences' tokens are (tests/test_zo.py). How many
tokens share a decode does change the matrix kernels' rounding (llama.cpp picks kernels by batch size):
a loss alone and in a batch of 8 differ by up to ~0.05 nats on the default model, as one-sequence
evaluation and the gate's evaluator do. The +μz and −μz passes of a step run the same batch, so their
difference, the ZO scalar, sees the same kernels.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

# Tokens held at once (all sequences of a group together; a batch of 8 training examples is ~300
# after the shared prefix) and tokens one llama_decode call takes. The logits buffer holds N_BATCH rows
# of n_vocab floats (128 × 49,152 × 4 B = 25 MB on the default model) and the KV cache CAPACITY cells:
# with 512 rows, 2,048 cells and blocks of 64 rows in `_log_probs`, a ZO run peaked at 1.41× inference
# memory; with these it stays within 1.1× (`ember bench zo`).
CAPACITY = 512
N_BATCH = 128
MAX_SEQUENCES = 64


class BatchScorer:
    """Mean negative log-likelihood of sequences, many per decode, in a context of its own on `llm`'s
    loaded model (no second copy of the weights)."""

    def __init__(self, llm: Any, *, threads: int, capacity: int = CAPACITY, embeddings_in: bool = False,
                 observe: "Observer | None" = None, sequences: int = MAX_SEQUENCES):
        """`embeddings_in`: sequences come as hidden states (`losses_from_states`), not tokens.
        `observe`: an `Observer` that copies one named tensor out of every decode (`states`).
        `sequences`: at most this many sequences a decode (llama.cpp keeps a vocabulary row for each)."""
        import llama_cpp
        from llama_cpp import _internals

        self._n_vocab, self._n_embd = llm.n_vocab(), llm.n_embd()
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_ctx = capacity
        params.n_batch = params.n_ubatch = N_BATCH
        params.n_seq_max = self._sequences = sequences
        params.kv_unified = True                 # the sequences share the context's cells
        # Flash attention keeps each sequence's result independent of the others in the context (the
        # other attention path's results moved by up to 0.03 nats with another sequence's cells present),
        # so an example's loss, and its DP-clipped scalar, is a function of that example alone.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        # 0: n_batch. A scorer that only observes takes no logits, and its buffers then need room for
        # the fewest vocabulary rows llama.cpp allows (one per sequence), not a batch's worth.
        params.n_outputs_max = sequences if observe is not None else 0
        params.n_outputs_max_per_seq = 0         # every position of a sequence may need its logits
        params.n_threads = params.n_threads_batch = threads
        self._observe = observe
        if observe is not None:
            params.cb_eval, params.cb_eval_user_data = observe.callback, None
        self._ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
        self.capacity = llama_cpp.llama_n_ctx(self._ctx.ctx)
        self._batch = llama_cpp.llama_batch_init(N_BATCH, self._n_embd if embeddings_in else 0, sequences)
        self.decodes = 0                         # llama_decode calls so far (for benchmarks)

    def set_control_vector(self, vector: np.ndarray | None, n_embd: int) -> None:
        """Add `vector` ((n_layer − 1) · n_embd floats, layer 1 first) to every later evaluation."""
        from adapters.runtime import set_context_control_vector

        set_context_control_vector(self._ctx.ctx, vector, n_embd)

    def losses(self, sequences: Sequence[tuple[Sequence[int], int]]) -> np.ndarray:
        """Mean NLL (nats) of `tokens[loss_from:]` given what precedes, for each (tokens, loss_from);
        shape (len(sequences),). Raises ValueError for a sequence longer than the context or with
        nothing to score."""
        self._check(sequences)
        out = np.empty(len(sequences))
        for group in self._groups(sequences):
            out[group] = self._score([sequences[i] for i in group])
        return out

    def losses_from_states(self, sequences: Sequence[tuple[Sequence[int], int]],
                           states: Sequence[np.ndarray]) -> np.ndarray:
        """`losses` for a model that reads hidden states instead of tokens (`embeddings_in`):
        `states[i]` is float32 (len(tokens), n_embd), the input of the model's first layer at each
        position of sequence i (the tokens give the targets). Same shape, same errors."""
        self._check(sequences)
        for (tokens, _), rows in zip(sequences, states):
            if rows.shape != (len(tokens), self._n_embd):
                raise ValueError(f"states of shape {rows.shape} for {len(tokens)} tokens of width {self._n_embd}")
        out = np.empty(len(sequences))
        for group in self._groups(sequences):
            out[group] = self._score([sequences[i] for i in group], [states[i] for i in group])
        return out

    def states(self, sequences: Sequence[tuple[Sequence[int], int]]) -> list[np.ndarray]:
        """The observed tensor (`observe`) at every position of each sequence, float32 (len(tokens),
        n_embd) each, computed as `losses` computes them (shared prefix decoded once) but with no logits."""
        if self._observe is None:
            raise RuntimeError("this scorer observes no tensor")
        self._check(sequences)
        out: list[np.ndarray] = [np.empty(0)] * len(sequences)
        for group in self._groups(sequences):
            for i, rows in zip(group, self._score([sequences[i] for i in group], capture=True)):
                out[i] = rows
        return out

    def _check(self, sequences: Sequence[tuple[Sequence[int], int]]) -> None:
        for tokens, loss_from in sequences:
            if not 1 <= loss_from < len(tokens):
                raise ValueError(f"nothing to score: loss_from {loss_from} of {len(tokens)} tokens")
            if len(tokens) > self.capacity:
                raise ValueError(f"a sequence of {len(tokens)} tokens does not fit the scorer's "
                                 f"context of {self.capacity}")

    def _groups(self, sequences: Sequence[tuple[Sequence[int], int]]) -> list[list[int]]:
        """Indices of `sequences` in groups whose tokens fit the context together (prefix not shared:
        a bound, not the exact need)."""
        groups: list[list[int]] = [[]]
        used = 0
        for i, (tokens, _) in enumerate(sequences):
            if groups[-1] and (used + len(tokens) > self.capacity or len(groups[-1]) == self._sequences):
                groups.append([])
                used = 0
            groups[-1].append(i)
            used += len(tokens)
        return groups

    def _score(self, group: list[tuple[Sequence[int], int]], states: list[np.ndarray] | None = None,
               capture: bool = False) -> Any:
        """The group's mean NLLs; with `capture`, the observed rows of each sequence instead."""
        import llama_cpp

        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx.ctx), True)
        shared = _shared_prefix([tokens for tokens, _ in group]) if len(group) > 1 else 0
        # Logits are taken from position loss_from − 1: the shared part stops before the first of them.
        shared = min(shared, min(loss_from for _, loss_from in group) - 1)
        prefix = None
        if shared:
            _, prefix = self._decode([(int(t), p, 0, -1) for p, t in enumerate(group[0][0][:shared])],
                                     None if states is None else states[0][:shared], capture)
            memory = llama_cpp.llama_get_memory(self._ctx.ctx)
            for seq in range(1, len(group)):
                llama_cpp.llama_memory_seq_cp(memory, 0, seq, -1, -1)
        entries = []          # (token, position, sequence, the next token when a loss is taken there, else -1)
        for seq, (tokens, loss_from) in enumerate(group):
            entries += [(int(tokens[p]), p, seq, int(tokens[p + 1]) if loss_from - 1 <= p < len(tokens) - 1 else -1)
                        for p in range(shared, len(tokens))]
        rows = None if states is None else np.concatenate([s[shared:] for s in states])
        picked, observed = self._decode(entries, rows, capture)
        if capture:
            ends = np.cumsum([len(tokens) - shared for tokens, _ in group])[:-1]
            return [np.concatenate([prefix, own]) if shared else own for own in np.split(observed, ends)]
        totals = np.zeros(len(group))
        np.add.at(totals, [e[2] for e in entries if e[3] >= 0], -picked)
        return totals / np.array([len(tokens) - loss_from for tokens, loss_from in group])

    def _decode(self, entries: list[tuple[int, int, int, int]], rows: np.ndarray | None = None,
                capture: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Decode `entries` (token, position, sequence, target) in chunks of N_BATCH, with `rows`
        (float32, one per entry) as the input instead of the tokens when given. Returns the
        log-probability of the target after each entry that has one (target ≥ 0), in order, and with
        `capture` the observed tensor's rows, one per entry (no logits are computed then)."""
        import ctypes

        import llama_cpp

        picked: list[np.ndarray] = []
        observed: list[np.ndarray] = []
        batch = self._batch
        for start in range(0, len(entries), N_BATCH):
            chunk = entries[start:start + N_BATCH]
            for i, (token, position, seq, target) in enumerate(chunk):
                if rows is None:
                    batch.token[i] = token
                batch.pos[i] = position
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = target >= 0 and not capture
            if rows is not None:
                block = np.ascontiguousarray(rows[start:start + len(chunk)], dtype=np.float32)
                ctypes.memmove(batch.embd, block.ctypes.data, block.nbytes)
            batch.n_tokens = len(chunk)
            status = llama_cpp.llama_decode(self._ctx.ctx, batch)
            self.decodes += 1
            if status != 0:
                raise RuntimeError(f"llama_decode failed ({status}) on a batch of {len(chunk)} tokens")
            if capture:
                observed.append(self._observe.take(len(chunk)))
                continue
            targets = np.array([e[3] for e in chunk if e[3] >= 0], dtype=np.int64)
            if len(targets):
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self._ctx.ctx),
                                               shape=(len(targets), self._n_vocab))
                picked.append(_log_probs(logits, targets))
        return (np.concatenate(picked) if picked else np.zeros(0),
                np.concatenate(observed) if observed else None)

    def close(self) -> None:
        """Free the context and the batch (the model belongs to the llm it was made from)."""
        import llama_cpp

        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        self._ctx.close()


class Observer:
    """Copies one named tensor (llama.cpp's `l_out-<il>`: the residual stream after layer il, its
    control vector included) out of every decode, through the context's `cb_eval` callback
    (ggml_backend_sched_eval_callback, ggml-backend.h). One per scorer; keep it alive as long as it."""

    def __init__(self, name: str, width: int, *, stop: bool = False):
        """`stop`: end each decode once the tensor is copied, so nothing after it in the graph runs
        (ggml_backend_sched_compute_splits stops a split when the callback answers false after a
        tensor it asked for; llama.cpp then reads no logits when the batch asked for none)."""
        import ctypes

        import llama_cpp

        self.name, self.width, self.stop = name.encode(), width, stop
        self._rows: list[np.ndarray] = []
        self._problem: str | None = None
        ggml = ctypes.CDLL(str(_ggml_base_library(llama_cpp)))
        ggml.ggml_get_name.restype = ctypes.c_char_p
        ggml.ggml_get_name.argtypes = [ctypes.c_void_p]
        ggml.ggml_nbytes.restype = ctypes.c_size_t
        ggml.ggml_nbytes.argtypes = [ctypes.c_void_p]
        ggml.ggml_is_contiguous.restype = ctypes.c_bool
        ggml.ggml_is_contiguous.argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_tensor_get.restype = None
        ggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        self._ggml = ggml

        self.asked = 0                  # graph nodes llama.cpp asked about (how far decodes ran)

        def seen(tensor: int, ask: bool, _user: int) -> bool:
            self.asked += ask
            if ggml.ggml_get_name(tensor) != self.name:
                return not ask          # ask: "do you want this one?"; otherwise: "go on?"
            if ask:
                return True
            if not ggml.ggml_is_contiguous(tensor):
                self._problem = f"{name} is not contiguous"
                return False            # stops the decode; `take` says why
            out = np.empty(ggml.ggml_nbytes(tensor) // 4, dtype=np.float32)
            ggml.ggml_backend_tensor_get(tensor, out.ctypes.data, 0, out.nbytes)
            self._rows.append(out.reshape(-1, self.width))
            return not self.stop

        self.callback = llama_cpp.ggml_backend_sched_eval_callback(seen)

    def take(self, n: int) -> np.ndarray:
        """The rows seen since the last call, which must be `n` (one per token decoded)."""
        if self._problem:
            raise RuntimeError(self._problem)
        rows = np.concatenate(self._rows) if self._rows else np.zeros((0, self.width), np.float32)
        self._rows.clear()
        if len(rows) != n:
            raise RuntimeError(f"saw {len(rows)} rows of {self.name.decode()} for {n} tokens")
        return rows


def _ggml_base_library(llama_cpp: Any) -> Any:
    from pathlib import Path

    folder = Path(llama_cpp.__file__).parent / "lib"
    found = sorted(folder.glob("libggml-base.*"))
    if not found:
        raise RuntimeError(f"no libggml-base library in {folder}")
    return found[0]


def _shared_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix every sequence shares."""
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != first[i] for s in sequences):
            return i
    return n


def _log_probs(logits: np.ndarray, targets: np.ndarray, rows: int = 8) -> np.ndarray:
    """log softmax(logits[i])[targets[i]] for each row, in float64, `rows` rows at a time: a few MB of
    temporaries (blocks of 64 rows, 25 MB each, stayed in the process's heap and raised a ZO run's peak
    memory by ~100 MB)."""
    out = np.empty(len(targets))
    for start in range(0, len(targets), rows):
        block = logits[start:start + rows].astype(np.float64)
        block -= block.max(axis=1, keepdims=True)
        norm = np.log(np.exp(block).sum(axis=1))
        out[start:start + rows] = block[np.arange(len(block)), targets[start:start + rows]] - norm
    return out
