"""A llama-architecture GGUF as a torch forward pass, from its own tensors, for compression sensitivity.

The weights are the GGUF's, dequantised by the `gguf` package in numpy, in llama.cpp's own layout: for
`llama` Q and K rows stay in the order llama.cpp stores them, so rotary embedding rotates adjacent pairs
(llama.cpp's NORM rope mode) instead of transformers' halves; `qwen2` is stored unpermuted and rotates
halves (NEOX mode, `llama_model_rope_type` in llama.cpp's llama-model.cpp), and carries biases on Q, K
and V (`llm_build_qwen2`), which are added as llama.cpp adds them and never quantised. No transformers model is built (that load takes ~30-60 s
here); the layout is checked tensor by tensor, and a model this code cannot run exactly is refused with
`UnsupportedLayout` rather than approximated.

Shapes: weights are (out, in) float32 tensors; `logits(tokens)` takes T token ids and returns (T, vocab).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from adapters.errors import UnsupportedLayout

# Every block of a supported model holds exactly these tensors (llama.cpp's names, without `blk.N.`).
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
NORMS = ("attn_norm", "ffn_norm")
# Biases a block may carry (llama.cpp's llama and qwen2 graphs add them when present); they stay F32.
BIASES = ("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias")
ARCHITECTURES = ("llama", "qwen2")
# llama.cpp's rope type per architecture: NORM rotates adjacent pairs, NEOX the two halves of a head.
ROPE_NEOX = ("qwen2",)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


@dataclasses.dataclass
class Layout:
    """What the forward pass needs to know about the model, read from its GGUF metadata."""

    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    rope_base: float
    rms_eps: float
    tied: bool                      # the output head is token_embd (no output.weight)
    types: dict[str, str]           # tensor name -> ggml type name, as stored


def open_reader(path: Path) -> Any:
    """A `gguf.GGUFReader` of the file, shared while the file is unchanged (parsing the tokenizer's
    ~100,000 metadata strings takes seconds)."""
    stat = os.stat(path)
    return _reader(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _reader(path: str, _size: int, _mtime_ns: int) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as err:
        raise UnsupportedLayout(f"{Path(path).name} is not a GGUF file gguf can read ({err})") from err


def read_layout(path: Path) -> tuple[Any, Layout]:
    """The GGUF's reader and layout; `UnsupportedLayout` when its blocks are not the llama layout."""
    reader = open_reader(path)
    arch = _field(reader, "general.architecture", "unknown")
    if arch not in ARCHITECTURES:
        raise UnsupportedLayout(f"{Path(path).name} is a {arch} model; ember compress supports "
                                f"{' and '.join(ARCHITECTURES)} blocks (attention, gated FFN, RMS norms, "
                                "optional Q/K/V/output biases)")
    n_layer = int(_field(reader, f"{arch}.block_count", 0))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    for i in range(n_layer):
        have = {name.split(".", 2)[2].removesuffix(".weight") for name in types if name.startswith(f"blk.{i}.")}
        want = set(MATRICES) | set(NORMS)
        extra, missing = sorted(have - want - set(BIASES)), sorted(want - have)
        if extra or missing:
            raise UnsupportedLayout(f"block {i} of {Path(path).name} has an unsupported layout "
                                    f"(extra: {', '.join(extra) or 'none'}; missing: {', '.join(missing) or 'none'}); "
                                    f"ember compress supports {' and '.join(ARCHITECTURES)} blocks with "
                                    f"{', '.join(MATRICES)}, {', '.join(NORMS)} and optional biases "
                                    f"({', '.join(BIASES)})")
    for name, kind in types.items():
        if is_matrix(name):
            if kind not in ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K",
                            "Q2_K", "Q3_K"):
                raise UnsupportedLayout(f"tensor {name} is stored as {kind}, which gguf cannot dequantise")
    layout = Layout(
        architecture=arch, n_layer=n_layer, n_embd=int(_field(reader, f"{arch}.embedding_length")),
        n_head=int(_field(reader, f"{arch}.attention.head_count")),
        n_head_kv=int(_field(reader, f"{arch}.attention.head_count_kv", _field(reader, f"{arch}.attention.head_count"))),
        rope_base=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        tied="output.weight" not in types, types=types)
    if n_layer < 2 or "token_embd.weight" not in types or "output_norm.weight" not in types:
        raise UnsupportedLayout(f"{Path(path).name} lacks token_embd, output_norm or blocks; it is not a "
                                "model ember compress can read")
    return reader, layout


def is_matrix(name: str) -> bool:
    """True for a block's quantisable weight matrix (`blk.N.attn_q.weight`), not its norms or biases."""
    parts = name.split(".")
    return len(parts) == 4 and parts[0] == "blk" and parts[2] in MATRICES and parts[3] == "weight"


def dequantize(tensor: Any) -> np.ndarray:
    """A GGUF tensor as float32 (rows, n_per_row), dequantised by the gguf package."""
    import gguf

    data = np.ascontiguousarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    return data if data.flags.writeable else data.copy()   # F32 tensors come memory-mapped, read-only


def roundtrip(weight: np.ndarray, type_name: str) -> np.ndarray:
    """`weight` quantised to `type_name` and back (the gguf package's numpy port of ggml's quantisers)."""
    import gguf

    kind = gguf.GGMLQuantizationType[type_name]
    return gguf.quants.dequantize(gguf.quants.quantize(weight, kind), kind).astype(np.float32, copy=False)


class Reference:
    """The model's forward pass in torch, with every block's input kept so one block can be swapped and
    the pass replayed from there (`replay`)."""

    def __init__(self, path: Path, *, threads: int = 0):
        from adapters.base import import_torch

        torch = import_torch()
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        reader, self.layout = read_layout(path)
        tensors = {t.name: t for t in reader.tensors}
        self.weights: dict[str, Any] = {name: torch.from_numpy(dequantize(t)) for name, t in tensors.items()}
        self.output = self.weights["token_embd.weight" if self.layout.tied else "output.weight"]
        head = self.layout.n_embd // self.layout.n_head
        inv = 1.0 / (self.layout.rope_base ** (torch.arange(0, head, 2, dtype=torch.float64) / head))
        self._inv_freq = inv
        self._inputs: list[Any] = []
        self._positions: Any = None       # each token's position in its sequence (None: 0 … T−1)
        self._mask: Any = None            # (T, T) allowed attention across packed sequences (None: causal)

    def block_weights(self, i: int) -> dict[str, np.ndarray]:
        """Block i's matrices (llama.cpp names without `blk.i.` and `.weight`), as numpy views."""
        return {m: self.weights[f"blk.{i}.{m}.weight"].numpy() for m in MATRICES}

    def _norm(self, x: Any, weight: Any) -> Any:
        return x * self.torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.layout.rms_eps) * weight

    def _rope(self, x: Any) -> Any:
        # llama.cpp NORM mode: dimensions (2i, 2i+1) rotate together by position·base^(-2i/head);
        # NEOX mode: dimensions (i, i + head/2) do
        torch = self.torch
        positions = self._positions if self._positions is not None else torch.arange(x.shape[0], dtype=torch.float64)
        angles = positions[:, None] * self._inv_freq[None, :]
        cos, sin = angles.cos().float()[:, None, :], angles.sin().float()[:, None, :]
        if self.layout.architecture in ROPE_NEOX:
            half = x.shape[-1] // 2
            first, second = x[..., :half], x[..., half:]
            return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)

    def block(self, i: int, x: Any, matrices: dict[str, Any] | None = None) -> Any:
        """Block i on hidden states x (T, n_embd); `matrices` replaces some of its weights."""
        torch, lay = self.torch, self.layout
        w = {m: self.weights[f"blk.{i}.{m}.weight"] for m in MATRICES}
        w.update(matrices or {})
        T, head = x.shape[0], lay.n_embd // lay.n_head
        h = self._norm(x, self.weights[f"blk.{i}.attn_norm.weight"])
        q = self._rope(self._linear(i, "attn_q", h, w).view(T, lay.n_head, head))
        k = self._rope(self._linear(i, "attn_k", h, w).view(T, lay.n_head_kv, head))
        v = self._linear(i, "attn_v", h, w).view(T, lay.n_head_kv, head)
        group = lay.n_head // lay.n_head_kv
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        attn = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=self._mask,
            is_causal=self._mask is None)
        x = x + self._linear(i, "attn_output", attn.transpose(0, 1).reshape(T, lay.n_embd), w)
        h = self._norm(x, self.weights[f"blk.{i}.ffn_norm.weight"])
        return x + (torch.nn.functional.silu(h @ w["ffn_gate"].T) * (h @ w["ffn_up"].T)) @ w["ffn_down"].T

    def _linear(self, i: int, matrix: str, x: Any, w: dict[str, Any]) -> Any:
        out = x @ w[matrix].T
        bias = self.weights.get(f"blk.{i}.{matrix}.bias")
        return out if bias is None else out + bias

    def head(self, x: Any) -> Any:
        """Final norm and output head: (T, n_embd) -> (T, vocab) logits."""
        return self._norm(x, self.weights["output_norm.weight"]) @ self.output.T

    def logits(self, tokens: Sequence[int], lengths: Sequence[int] | None = None) -> Any:
        """The reference pass over `tokens` (T,) -> (T, vocab) logits, keeping each block's input for
        `replay`. `lengths`: `tokens` is that many sequences packed end to end (summing to T), each read
        as in a fresh context (positions from 0, attention within itself)."""
        torch = self.torch
        if lengths is None or len(lengths) == 1:
            self._positions = self._mask = None
        else:
            if sum(lengths) != len(tokens) or min(lengths) < 1:
                raise ValueError(f"sequence lengths {list(lengths)} do not pack {len(tokens)} tokens")
            segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(list(lengths)))
            self._positions = torch.cat([torch.arange(n, dtype=torch.float64) for n in lengths])
            causal = torch.ones(len(tokens), len(tokens), dtype=torch.bool).tril()
            self._mask = (segment[:, None] == segment[None, :]) & causal
        with torch.no_grad():
            x = self.weights["token_embd.weight"][torch.tensor(list(tokens))]
            self._inputs = []
            for i in range(self.layout.n_layer):
                self._inputs.append(x)
                x = self.block(i, x)
            return self.head(x)

    def replay(self, i: int, matrices: dict[str, Any] | None = None, *, skip: bool = False) -> Any:
        """Logits with block i's weights replaced (or the block dropped, `skip`), from its kept input."""
        if not self._inputs:
            raise RuntimeError("call logits() before replay()")
        with self.torch.no_grad():
            x = self._inputs[i]
            if not skip:
                x = self.block(i, x, {k: self.torch.from_numpy(v) for k, v in (matrices or {}).items()})
            for j in range(i + 1, self.layout.n_layer):
                x = self.block(j, x)
            return self.head(x)
