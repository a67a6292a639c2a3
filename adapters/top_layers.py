"""Zeroth-order steps on the top layers only, without running the layers below at every step.

A control vector on layers `first`+1 … n−1 leaves layers 0 … `first`−1 untouched, so their output
(the residual stream entering layer `first`, llama.cpp's `l_out-<first−1>`) is a function of the
example alone. It is computed once per example on the full model, copied out through the context's
eval callback (`scoring.Observer`), which then stops the graph (the blocks above do not run), and every loss after that runs only blocks `first` … n−1: a GGUF
holding just those, written by llama.cpp's own `llama_model_quantize` (`only_copy`, `prune_layers`:
the same quantized bytes, blocks renumbered from 0), which reads the stored states as input embeddings
(`llama_batch.embd`). It is the frozen-layer cache Ember's torch trainers use, inside llama.cpp.
Perturbing a subset of the parameters is also what Sparse MeZO (arXiv 2402.15751) does for a less
noisy estimate; here the subset is the top layers' vectors.

Memory stays at inference level: the states of every sequence a run will score (its training and
held-out examples) are computed up front (`cache`), then the full model is freed (`release_below`, and
its owner closes it) before the small model is loaded (`load_top`), so the two are never resident
together. The states take n_embd float32 values a token (2.3 KB on SmolLM2-135M), the prefix every
example shares (the chat template's system turn) held once.
"""
from __future__ import annotations

import ctypes
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from adapters.errors import InvalidInput


def write_top_layers(source: Path, target: Path, first: int, *, threads: int = 1) -> Path:
    """Copy `source` without its blocks 0 … first−1 (the rest renumbered from 0, block_count set) to
    `target`, tensors byte for byte. Raises InvalidInput when llama.cpp refuses."""
    import llama_cpp

    from adapters import llama_log

    llama_log.install(verbose=llama_log.current().verbose if llama_log.current() else False)
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.only_copy = True
    prune = (ctypes.c_int32 * (first + 1))(*range(first), -1)
    params.prune_layers = ctypes.cast(prune, ctypes.POINTER(ctypes.c_int32))
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise InvalidInput(f"llama.cpp could not copy the top layers of {Path(source).name}: "
                           f"{llama_log.current().last_problem() if llama_log.current() else 'see ember --verbose'}")
    target.chmod(0o600)
    return target


def release_mapping(path: Path) -> int:
    """madvise(MADV_DONTNEED) every read-only mapping of `path` in this process, so that only the pages
    read afterwards count in its resident memory; returns the bytes released. Linux; elsewhere 0."""
    import mmap
    import os

    if not hasattr(mmap, "MADV_DONTNEED") or not os.path.exists("/proc/self/maps"):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    target, released = str(Path(path).resolve()), 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == target and "w" not in fields[1]:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if libc.madvise(start, end - start, mmap.MADV_DONTNEED) == 0:
                    released += end - start
    return released


class TopLayers:
    """Losses of sequences with a control vector on the top `window` layers of `llm`'s model: the
    layers below run once per distinct sequence, the top ones every time.

    Use: `cache(sequences)` while `llm` is loaded, `release_below()`, close `llm`, `load_top()`; then
    `losses` for any cached sequence. (Without `release_below`, `losses` computes missing states itself
    and loads the small model on first use, with both models resident.)"""

    def __init__(self, llm: Any, model_path: Path, window: int, *, threads: int, capacity: int,
                 stop_below: bool = True):
        """`stop_below`: end each decode of the pass below at `l_out-<first−1>` (False: run the whole
        graph, as before; kept to test that the states are the same)."""
        from adapters.scoring import BatchScorer, Observer

        import llama_cpp

        n_layer = int(llama_cpp.llama_model_n_layer(llm._model.model))
        self.n_embd = llm.n_embd()
        if not 1 <= window <= n_layer - 2:
            raise InvalidInput(f"the ZO window must be 1 … {n_layer - 2} layers of this model's {n_layer}, "
                               f"not {window}")
        self.first = n_layer - 1 - window        # block 0 of the small model; its own vector stays zero
        self._model_path, self._threads, self._capacity = Path(model_path), threads, capacity
        # The full model's file is mapped and read in whole at load (MAP_POPULATE). From now on it only
        # runs blocks below `first`, with no logits: let the kernel take its pages back, and the ones
        # these blocks read come back on first use (from the page cache: nothing is read twice).
        release_mapping(Path(model_path))
        # The graph stops once that tensor is copied: blocks first … n−1 and the output head never run
        # in this pass (on the default model 22 of 30 blocks run instead of all 30).
        self._observer = Observer(f"l_out-{self.first - 1}", self.n_embd, stop=stop_below)
        self._below: Any = BatchScorer(llm, threads=threads, capacity=capacity, observe=self._observer,
                                       sequences=8)
        self._folder: Path | None = None
        self._llm: Any = None
        self.scorer: Any = None
        # Per sequence: (n, rows) = its states after the first n positions, which are `_prefix`'s (the
        # system turn every example shares, held once); n = 0 when it does not share them bit for bit.
        self._states: dict[tuple[int, ...], tuple[int, np.ndarray]] = {}
        self._prefix: tuple[tuple[int, ...], np.ndarray] | None = None
        self.below_decodes = 0

    def cache(self, sequences: Sequence[tuple[Sequence[int], int]]) -> None:
        """Compute and keep the lower layers' output for each (tokens, loss_from) not yet held.
        Raises InvalidInput once the lower layers are released."""
        missing: dict[tuple[int, ...], int] = {}
        for tokens, loss_from in sequences:
            key = tuple(int(t) for t in tokens)
            if key not in self._states:
                missing[key] = loss_from
        if not missing:
            return
        if self._below is None:
            raise InvalidInput(f"{len(missing)} sequences were not cached before the full model was freed; "
                               "pass them when the ZO backend is made")
        from adapters.scoring import _shared_prefix

        before = self._below.decodes
        # As the losses are computed: the shared prefix once, then one sequence id each.
        computed = self._below.states(list(missing.items()))
        self.below_decodes += self._below.decodes - before
        keys = list(missing)
        if self._prefix is None and len(keys) > 1:
            shared = _shared_prefix(keys)
            if shared:
                self._prefix = (keys[0][:shared], computed[0][:shared].copy())
        for key, rows in zip(keys, computed):
            self._states[key] = self._compact(key, rows)

    def _compact(self, key: tuple[int, ...], rows: np.ndarray) -> tuple[int, np.ndarray]:
        if self._prefix is not None:
            tokens, shared = self._prefix
            n = len(tokens)
            if key[:n] == tokens and np.array_equal(rows[:n], shared):
                return n, rows[n:].copy()
        return 0, rows

    def _rows(self, key: tuple[int, ...]) -> np.ndarray:
        n, own = self._states[key]
        return np.concatenate([self._prefix[1], own]) if n else own

    def release_below(self) -> None:
        """Free the context that runs the lower layers: after this the full model may be closed, and
        only cached sequences can be scored."""
        if self._below is not None:
            self._below.close()
            self._below = None

    def load_top(self) -> None:
        """Write the top blocks' GGUF (a temporary 0700 folder) and load it, once."""
        if self.scorer is not None:
            return
        from adapters.llama_log import quiet_llama
        from adapters.scoring import BatchScorer

        self._folder = Path(tempfile.mkdtemp(prefix="ember-zo-top-"))          # 0700
        try:
            path = write_top_layers(self._model_path, self._folder / "top.gguf", self.first, threads=self._threads)
            self._llm = quiet_llama(model_path=str(path), n_ctx=256, n_batch=8, n_ubatch=8, logits_all=False,
                                    n_threads=self._threads, n_threads_batch=self._threads, seed=0)
            self.scorer = BatchScorer(self._llm, threads=self._threads, capacity=self._capacity, embeddings_in=True)
        except BaseException:
            self.close()
            raise

    def losses(self, sequences: Sequence[tuple[Sequence[int], int]], vector: np.ndarray) -> np.ndarray:
        """Mean NLL per (tokens, loss_from) with `vector` (window · n_embd floats, layer `first`+1
        first) added after the top layers; shape (len(sequences),)."""
        self.cache(sequences)
        self.load_top()
        keys = [tuple(int(t) for t in tokens) for tokens, _ in sequences]
        self.scorer.set_control_vector(vector, self.n_embd)
        return self.scorer.losses_from_states(sequences, [self._rows(k) for k in keys])

    @property
    def cached_tokens(self) -> int:
        """Positions whose state is held (each n_embd float32; the shared prefix once)."""
        return sum(len(rows) for _, rows in self._states.values()) + (len(self._prefix[0]) if self._prefix else 0)

    def close(self) -> None:
        """Free both contexts, the small model and its file."""
        if self.scorer is not None:
            self.scorer.close()
            self.scorer = None
        if self._llm is not None:
            self._llm.close()
            self._llm = None
        self.release_below()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
