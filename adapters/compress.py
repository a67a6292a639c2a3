"""Layer-wise unified compression (LUC): per-block quantisation types from each block's sensitivity.

EDGE-LLM (Yu et al., arXiv 2406.15758; GATECH-EIC/Edge-LLM `pruning/pruning_schedular.py`) scores each
layer by the output error when that layer alone is compressed, and gives the sensitive layers more bits
and less pruning under a total budget. Here, for llama.cpp:

- sensitivity: for each block i and candidate type t, block i's seven matrices are quantised to t and
  back (the `gguf` package's numpy quantisers) while every other block keeps the reference weights; the
  score is KL(reference ‖ candidate) of the final next-token distributions, averaged over calibration
  tokens, with the candidate's NLL of the next token beside it (`measure`);
- policy: every block starts at its cheapest type, then the upgrade with the most KL removed per byte
  added is taken while it fits (`--size`) or until the summed KL is under `--max-kl` (greedy
  multiple-choice knapsack over each block's lower convex hull); upstream's pruning schedule instead sets
  each layer's ratio ∝ 1 − min-max-scaled error;
- pruning: only whole blocks (`prune_layers`), the least sensitive to being dropped. llama.cpp has no
  sparse kernels, so unstructured or N:M sparsity would store zeros and run exactly as fast: not offered;
- writing: llama.cpp's own quantiser (`llama_model_quantize`, per-tensor `tt_overrides`,
  `allow_requantize` for a quantised source), to a temporary file renamed into place only when complete.

The reference is the source file's own weights dequantised: for the bundled SmolLM2, whose only shipped
file is Q4_1, that is the Q4_1 model itself, so no type can beat it on KL and Q4_1 reproduces it exactly.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from adapters.errors import BudgetUnmet, InvalidInput, UnsupportedLayout
from adapters.reference import MATRICES, Reference, is_matrix, open_reader, read_layout, roundtrip

CANDIDATES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16")
# llama_ftype of a file whose matrices are mostly this type (llama.h); only quantised ones may carry overrides.
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9}
MB = 1_000_000
SPARSITY_NOTE = ("Unstructured and N:M sparsity buy nothing in llama.cpp: ggml has no sparse kernels, so "
                 "zeroed weights are stored and multiplied like any other; only whole blocks are pruned.")


def tensor_bytes(shape: Sequence[int], type_name: str) -> int:
    """Bytes of a (rows, n_per_row) matrix stored as `type_name` (ggml block size and type size)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    rows, n = shape
    if n % block:
        raise UnsupportedLayout(f"rows of {n} values do not split into {type_name} blocks of {block}")
    return rows * (n // block) * size


@dataclasses.dataclass
class Sensitivity:
    """Per block and candidate type: KL to the reference (nats/token), NLL (nats/token) and bytes."""

    source: str
    n_layer: int
    types: list[str]
    tokens: int
    calibration: str                  # where the calibration text came from: log or builtin
    reference_nll: float
    blocks: list[dict[str, dict[str, float]]]     # blocks[i][type] = {kl, nll, bytes}
    source_types: list[str]           # each block's stored type (its largest matrix's)
    drop: list[float] | None          # KL when block i is dropped whole, if measured
    fixed_bytes: int                  # the file minus its blocks (embeddings, output norm, metadata)
    norm_bytes: int                   # one block's norms (gone with the block when it is pruned)
    seconds: float

    def as_json(self) -> dict[str, Any]:
        """The measurement, JSON-ready."""
        return dataclasses.asdict(self)


def _log_softmax(torch: Any, logits: Any) -> Any:
    return torch.log_softmax(logits.double(), dim=-1)


def _nll(logp: Any, targets: Any) -> float:
    """Mean NLL of `targets` (T−1,) under `logp` (T, vocab); a target of −1 is not a prediction."""
    keep = targets >= 0
    return float(-logp[:-1][keep].gather(1, targets[keep][:, None]).mean())


def _scores(torch: Any, ref_logp: Any, logits: Any, targets: Any) -> tuple[float, float]:
    logp = _log_softmax(torch, logits)
    kl = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
    return max(kl, 0.0), _nll(logp, targets)


def measure(model_path: Path, tokens: Sequence[int], *, types: Sequence[str] = CANDIDATES, drop: bool = False,
            threads: int = 0, calibration: str = "builtin",
            progress: Callable[[int, int], None] | None = None, reference: Reference | None = None,
            lengths: Sequence[int] | None = None) -> Sensitivity:
    """Each block's sensitivity to each candidate type on `tokens` (T ≥ 2 token ids), in torch.

    `reference`: the model already loaded (else it is loaded here). `lengths`: `tokens` packs that many
    sequences, each read in a fresh context (`Reference.logits`); the NLL then leaves out each
    sequence's first token, which nothing before it in its context predicts. Raises `UnsupportedLayout` for a model whose blocks are not the llama or qwen2 layout.
    """
    if len(tokens) < 2:
        raise InvalidInput("calibration text is too short: it needs at least 2 tokens")
    started = time.monotonic()
    ref = reference or Reference(model_path, threads=threads)
    torch, lay = ref.torch, ref.layout
    ref_logp = _log_softmax(torch, ref.logits(tokens, lengths))
    targets = torch.tensor(list(tokens[1:]))
    if lengths is not None:   # predictions within a sequence only: not its last token's
        ends = torch.tensor(list(lengths)).cumsum(0)[:-1] - 1
        targets[ends] = -1
    ref_nll = _nll(ref_logp, targets)
    blocks, drops, source_types = [], [] if drop else None, []
    for i in range(lay.n_layer):
        weights = ref.block_weights(i)
        source_types.append(lay.types[f"blk.{i}.ffn_down.weight"])
        row: dict[str, dict[str, float]] = {}
        for t in types:
            size = sum(tensor_bytes(w.shape, t) for w in weights.values())
            changed = {m: roundtrip(w, t) for m, w in weights.items()}
            if all((changed[m] == w).all() for m, w in weights.items()):
                kl, nll = 0.0, ref_nll      # the type holds this block exactly: nothing to replay
            else:
                kl, nll = _scores(torch, ref_logp, ref.replay(i, changed), targets)
            row[t] = {"kl": kl, "nll": nll, "bytes": size}
        blocks.append(row)
        if drops is not None:
            drops.append(_scores(torch, ref_logp, ref.replay(i, skip=True), targets)[0])
        if progress:
            progress(i + 1, lay.n_layer)
    reader = open_reader(model_path)
    block_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith("blk."))
    norm_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith("blk.0.") and not is_matrix(t.name))
    return Sensitivity(source=str(model_path), n_layer=lay.n_layer, types=list(types), tokens=len(tokens),
                       calibration=calibration, reference_nll=ref_nll, blocks=blocks, source_types=source_types,
                       drop=drops, fixed_bytes=os.path.getsize(model_path) - block_bytes,
                       norm_bytes=norm_bytes, seconds=round(time.monotonic() - started, 2))


@dataclasses.dataclass
class Policy:
    """A type per kept block, the dropped blocks, and what the sensitivity predicts for the result."""

    types: dict[int, str]             # original block index -> type
    pruned: list[int]
    bytes: int                        # predicted file size
    kl: float                         # summed per-block KL (an additive estimate)

    def as_json(self) -> dict[str, Any]:
        """The policy, JSON-ready (block indices as strings)."""
        return {"types": {str(k): v for k, v in sorted(self.types.items())}, "pruned": self.pruned,
                "bytes": self.bytes, "predicted_kl": round(self.kl, 6)}

    def counts(self) -> dict[str, int]:
        """How many blocks take each type."""
        out: dict[str, int] = {}
        for t in self.types.values():
            out[t] = out.get(t, 0) + 1
        return dict(sorted(out.items()))


def choose_pruned(sens: Sensitivity, n: int) -> list[int]:
    """The `n` blocks whose removal changes the output least (needs `measure(..., drop=True)`)."""
    if n <= 0:
        return []
    if sens.drop is None:
        raise InvalidInput("pruning needs the drop sensitivity; measure with drop=True")
    if n >= sens.n_layer:
        raise BudgetUnmet(f"cannot prune {n} of {sens.n_layer} blocks; at least one must stay")
    return sorted(sorted(range(sens.n_layer), key=lambda i: sens.drop[i])[:n])


def smallest(model_path: Path, types: Sequence[str], *, pruned: int = 0) -> int:
    """The fewest bytes `model_path` can be written in with `types` and `pruned` blocks dropped (no
    measuring needed: sizes follow from the shapes)."""
    reader, lay = read_layout(model_path)
    per_block = [0] * lay.n_layer
    norms = [0] * lay.n_layer
    fixed = os.path.getsize(model_path)
    for t in reader.tensors:
        parts = t.name.split(".")
        if parts[0] != "blk":
            continue
        i = int(parts[1])
        fixed -= int(t.n_bytes)
        if is_matrix(t.name):
            shape = (int(t.shape[1]), int(t.shape[0]))
            per_block[i] += min(tensor_bytes(shape, ty) for ty in types)
        else:
            norms[i] += int(t.n_bytes)
    cost = sorted(p + n for p, n in zip(per_block, norms))
    return fixed + sum(cost[:lay.n_layer - pruned]) if pruned < lay.n_layer else fixed


def _hull(options: dict[str, dict[str, float]]) -> list[tuple[str, int, float]]:
    """A block's (type, bytes, kl) options that are worth their bytes: more bytes must mean less KL."""
    ranked = sorted(((t, int(o["bytes"]), o["kl"]) for t, o in options.items()), key=lambda x: (x[1], x[2]))
    kept: list[tuple[str, int, float]] = []
    for option in ranked:
        if kept and option[2] >= kept[-1][2]:
            continue
        kept.append(option)
    return kept


def assign(sens: Sensitivity, *, size_bytes: int | None = None, max_kl: float | None = None,
           pruned: Sequence[int] = ()) -> Policy:
    """Bits to the sensitive blocks under a size (bytes) or KL (nats/token, summed estimate) budget.

    Greedy: start each kept block at its cheapest type; repeatedly take the upgrade with the most KL
    removed per byte added. Raises `BudgetUnmet` when no assignment fits.
    """
    if (size_bytes is None) == (max_kl is None):
        raise InvalidInput("give exactly one budget: --size MB or --max-kl X")
    kept = [i for i in range(sens.n_layer) if i not in set(pruned)]
    hulls = {i: _hull(sens.blocks[i]) for i in kept}
    level = {i: 0 for i in kept}
    fixed = sens.fixed_bytes + sens.norm_bytes * len(kept)
    total = fixed + sum(hulls[i][0][1] for i in kept)
    kl = sum(hulls[i][0][2] for i in kept)
    if size_bytes is not None and total > size_bytes:
        raise BudgetUnmet(f"--size {size_bytes / MB:.1f} MB cannot be met: the smallest this model gets with "
                          f"{', '.join(sens.types)} is {total / MB:.1f} MB"
                          + ("" if pruned else "; --prune-layers N drops whole blocks"))
    while True:
        if max_kl is not None and kl <= max_kl:
            break
        best = None
        for i in kept:
            hull, at = hulls[i], level[i]
            for j in range(at + 1, len(hull)):
                extra, gain = hull[j][1] - hull[at][1], hull[at][2] - hull[j][2]
                if size_bytes is not None and total + extra > size_bytes:
                    continue
                ratio = gain / max(extra, 1)
                if best is None or ratio > best[0]:
                    best = (ratio, i, j, extra, gain)
        if best is None:
            break
        _, i, j, extra, _gain = best
        level[i], total = j, total + extra
        kl = sum(hulls[b][level[b]][2] for b in kept)    # summed afresh: no drift from subtracting gains
    if max_kl is not None and kl > max_kl:
        raise BudgetUnmet(f"--max-kl {max_kl:g} cannot be met: the best of {', '.join(sens.types)} in every block "
                          f"still changes the output by ~{kl:.4g} nats/token on the calibration text")
    return Policy(types={i: hulls[i][level[i]][0] for i in kept}, pruned=sorted(pruned), bytes=total, kl=kl)


def uniform(sens: Sensitivity, type_name: str) -> Policy:
    """Every block at one type (a baseline)."""
    types = {i: type_name for i in range(sens.n_layer)}
    return Policy(types, [], sens.fixed_bytes + sens.norm_bytes * sens.n_layer
                  + sum(int(sens.blocks[i][type_name]["bytes"]) for i in types),
                  sum(sens.blocks[i][type_name]["kl"] for i in types))


def random_policy(sens: Sensitivity, size_bytes: int, *, seed: int) -> Policy:
    """A random mix of the candidate types as close under `size_bytes` as random upgrades get (a baseline)."""
    rng = random.Random(seed)
    cheapest = min(sens.types, key=lambda t: sens.blocks[0][t]["bytes"])
    types = {i: cheapest for i in range(sens.n_layer)}
    total = uniform(sens, cheapest).bytes
    for _ in range(20 * sens.n_layer):
        i, t = rng.randrange(sens.n_layer), rng.choice(sens.types)
        extra = sens.blocks[i][t]["bytes"] - sens.blocks[i][types[i]]["bytes"]
        if extra > 0 and total + extra <= size_bytes:
            types[i], total = t, total + int(extra)
    return Policy(types, [], total, sum(sens.blocks[i][t]["kl"] for i, t in types.items()))


# ---------------------------------------------------------------- writing through llama.cpp


def write(source: Path, target: Path, policy: Policy, *, source_types: dict[str, str], threads: int) -> None:
    """Quantise `source` into `target` with llama.cpp, one type per block (`tt_overrides`), dropping
    `policy.pruned`; embeddings and output head keep their stored type. Raises `UnsupportedLayout` when
    llama.cpp refuses (its last log line says why)."""
    import gguf
    import llama_cpp

    from adapters import llama_log

    log = llama_log.install(verbose=llama_log.current().verbose if llama_log.current() else False)
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    counts: dict[str, int] = {}
    for t in policy.types.values():
        if t in FTYPES:
            counts[t] = counts.get(t, 0) + 1
    params.ftype = FTYPES[max(counts, key=counts.get)] if counts else FTYPES["Q8_0"]
    params.allow_requantize = True
    for field, name in (("token_embedding_type", "token_embd.weight"), ("output_tensor_type", "output.weight")):
        if name in source_types:
            setattr(params, field, int(gguf.GGMLQuantizationType[source_types[name]]))
    # llama.cpp renumbers the kept blocks before it matches the patterns: name them by their new index.
    kept = sorted(policy.types)
    overrides = (llama_cpp.llama_model_tensor_override * (len(kept) + 1))()
    patterns = []
    for new, old in enumerate(kept):
        patterns.append(f"^blk\\.{new}\\.({'|'.join(MATRICES)})\\.weight$".encode())
        overrides[new].pattern = patterns[-1]
        overrides[new].type = int(gguf.GGMLQuantizationType[policy.types[old]])
    overrides[len(kept)].pattern = None
    params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    prune = (ctypes.c_int32 * (len(policy.pruned) + 1))(*sorted(policy.pruned), -1)
    if policy.pruned:
        params.prune_layers = ctypes.cast(prune, ctypes.POINTER(ctypes.c_int32))
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if rc != 0:
        raise UnsupportedLayout(f"llama.cpp's quantiser refused {Path(source).name}: "
                                f"{log.last_problem() or 'see ember --verbose'}")
    check_written(target, policy)


def check_written(path: Path, policy: Policy) -> None:
    """Each kept block's matrices in `path` are of the policy's type (llama.cpp may fall back silently)."""
    reader = open_reader(path)
    kept = sorted(policy.types)
    for t in reader.tensors:
        parts = t.name.split(".")
        if is_matrix(t.name):
            want = policy.types[kept[int(parts[1])]]
            if t.tensor_type.name != want:
                raise UnsupportedLayout(f"llama.cpp wrote {t.name} as {t.tensor_type.name}, not {want} "
                                        "(a row length the type cannot hold)")


def source_types(path: Path) -> dict[str, str]:
    """Stored type of every tensor of a GGUF."""
    return read_layout(path)[1].types


def summary(policy: Policy) -> str:
    """`Q4_0×12 Q5_1×18, pruned 3, 7` for people."""
    text = " ".join(f"{t}×{n}" for t, n in policy.counts().items())
    return text + (f", pruned {', '.join(map(str, policy.pruned))}" if policy.pruned else "")


def kl_nll(logits_ref: Any, logits: Any, tokens: Sequence[int]) -> tuple[float, float]:
    """KL(ref ‖ model) per token and the model's NLL of the next token, from two (T, vocab) numpy arrays."""
    import numpy as np

    def log_softmax(x: Any) -> Any:
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    a, b = log_softmax(logits_ref), log_softmax(logits)
    kl = float((np.exp(a) * (a - b)).sum(-1).mean())
    nll = float(-b[np.arange(len(tokens) - 1), np.asarray(tokens[1:])].mean())
    return max(kl, 0.0), nll


def perplexity(nll: float) -> float:
    """exp(NLL)."""
    return math.exp(nll)


def dumps(value: Any) -> bytes:
    """JSON bytes for a sidecar file."""
    return json.dumps(value, indent=2, sort_keys=True).encode()
