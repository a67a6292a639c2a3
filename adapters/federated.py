"""What a device exchanges in household learning, and how it is checked and applied (no Flower here:
`assistant/federation/` moves these arrays in Flower's messages).

Two kinds of update, each a dict of float32 numpy arrays (a Flower `ArrayRecord`):

- **FedAvg over LoRA** with A frozen (FFA-LoRA, arXiv 2403.12313): every device draws the same A from a
  public seed and trains only B, so averaging the B's is exactly averaging the adapters. Only the B
  tensors travel, named as llama.cpp names them (`blk.N.attn_q.weight.lora_b`, out × r, llama.cpp's row
  order: averaging commutes with the row permutation, so it is undone only where torch trains).
- **FedKSeed over zeroth-order** (arXiv 2312.06353): every direction z is drawn from a public pool of K
  seeds and the learning rate is constant within a round, so a round's update is K scalars, the sum of the
  projected gradients taken along each pool seed: `pool_sums` (float32, K). Replaying the sums moves θ
  where replaying every step would (`replay_sums`).

Everything a device receives is checked before use (`check_update`): names, shapes, finite values, size.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from adapters.errors import AdapterMismatch, InvalidInput

LORA_B = ".lora_b"
POOL_KEY = "pool_sums"
# One update must fit in this many bytes (a rank-2 LoRA on two layers of SmolLM2 is 21 KB; K=4,096
# FedKSeed sums are 16 KB); anything larger is refused before it is parsed further.
MAX_UPDATE_BYTES = 64 << 20


class MalformedUpdate(InvalidInput):
    """An update with the wrong names or shapes, values that are not finite, or too many bytes."""


@functools.lru_cache(maxsize=4)
def _metadata(model_path: str, size: int, mtime: int) -> dict[str, str]:
    from adapters.llama_log import quiet_llama

    llm = quiet_llama(model_path=model_path, vocab_only=True)
    try:
        return dict(llm.metadata)
    finally:
        llm.close()


def model_shape(model_path: Path) -> dict[str, int]:
    """n_embd, n_layer, n_head, n_head_kv, head_dim and n_ff of a GGUF model, from its header (llama.cpp
    reads it without the weights: ~0.1 s, where gguf's reader parses every field for ~30 s)."""
    stat = Path(model_path).stat()
    meta = _metadata(str(model_path), stat.st_size, stat.st_mtime_ns)
    arch = meta["general.architecture"]

    def value(key: str, default: int | None = None) -> int:
        found = meta.get(f"{arch}.{key}")
        if found is None and default is None:
            raise InvalidInput(f"{Path(model_path).name} does not say its {key}")
        return int(found) if found is not None else int(default)

    n_embd, n_head = value("embedding_length"), value("attention.head_count")
    return {"n_embd": n_embd, "n_layer": value("block_count"), "n_head": n_head,
            "n_head_kv": value("attention.head_count_kv", n_head),
            "head_dim": value("attention.key_length", n_embd // n_head), "n_ff": value("feed_forward_length")}


def lora_targets(model_path: Path, *, rank: int, layers: int, modules: Sequence[str]) -> dict[str, tuple[int, int]]:
    """{llama.cpp weight name: (out, in)} of the top `layers` layers' `modules` of a llama-style model:
    what a federated LoRA of this shape adapts."""
    from adapters import architectures

    arch = architectures.get("llama")
    m = model_shape(model_path)
    q, kv = m["n_head"] * m["head_dim"], m["n_head_kv"] * m["head_dim"]
    sizes = {"q_proj": (q, m["n_embd"]), "k_proj": (kv, m["n_embd"]), "v_proj": (kv, m["n_embd"]),
             "o_proj": (m["n_embd"], q), "gate_proj": (m["n_ff"], m["n_embd"]), "up_proj": (m["n_ff"], m["n_embd"]),
             "down_proj": (m["n_embd"], m["n_ff"])}
    out: dict[str, tuple[int, int]] = {}
    for layer in range(max(0, m["n_layer"] - layers), m["n_layer"]):
        for module in modules:
            short = arch.tensor(f"self_attn.{module}" if f"self_attn.{module}" in arch.tensors else f"mlp.{module}")
            out[f"blk.{layer}.{short}.weight"] = sizes[module]
    return out


def shared_a(targets: Mapping[str, tuple[int, int]], *, rank: int, seed: int) -> dict[str, np.ndarray]:
    """The frozen A of every target (r × in), the same on every device: Kaiming-uniform bounds as peft's
    init (U(±1/√in)), drawn from the public `seed` per tensor name."""
    out = {}
    for name, (_, n_in) in sorted(targets.items()):
        rng = np.random.default_rng(np.random.SeedSequence([seed, *name.encode()]))
        bound = 1.0 / math.sqrt(n_in)
        out[name] = rng.uniform(-bound, bound, size=(rank, n_in)).astype(np.float32)
    return out


def zero_b(targets: Mapping[str, tuple[int, int]], *, rank: int) -> dict[str, np.ndarray]:
    """The first round's global update: every B at zero (the adapter does nothing yet)."""
    return {f"{name}{LORA_B}": np.zeros((n_out, rank), dtype=np.float32) for name, (n_out, _) in sorted(targets.items())}


def check_update(arrays: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], *,
                 max_bytes: int = MAX_UPDATE_BYTES) -> dict[str, np.ndarray]:
    """The update as float32 arrays, or `MalformedUpdate` (one line) when a name is missing or unknown, a
    shape differs, a value is NaN or infinite, or the whole is larger than `max_bytes`."""
    names, wanted = set(arrays), set(expected)
    if names != wanted:
        extra, missing = sorted(names - wanted), sorted(wanted - names)
        raise MalformedUpdate(f"update has {'unknown tensor ' + extra[0] if extra else 'no ' + missing[0]}"
                              f" ({len(extra)} unknown, {len(missing)} missing); refused")
    total = sum(int(np.asarray(a).nbytes) for a in arrays.values())
    if total > max_bytes:
        raise MalformedUpdate(f"update is {total:,} bytes, more than the {max_bytes:,} allowed; refused")
    out = {}
    for name in sorted(expected):
        value = np.asarray(arrays[name])
        if tuple(value.shape) != tuple(expected[name]):
            raise MalformedUpdate(f"update tensor {name} has shape {tuple(value.shape)}, expected "
                                  f"{tuple(expected[name])}; refused")
        if not np.issubdtype(value.dtype, np.floating) or not np.isfinite(value).all():
            raise MalformedUpdate(f"update tensor {name} holds NaN, infinite or non-float values; refused")
        out[name] = value.astype(np.float32, copy=False)
    return out


def check_base(mine: str, theirs: str | None, name: str | None = None) -> None:
    """`AdapterMismatch` when the household's base model is not this device's (by SHA-256)."""
    if not theirs or theirs != mine:
        raise AdapterMismatch(f"this device runs another base model ({(theirs or 'none')[:12]}… "
                              f"{name or ''} vs {mine[:12]}…); federate only devices with the same GGUF")


def unpermute_rows(b: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order of a Q/K projection → HF's: the inverse of `export.permute_rows`."""
    rows = b.shape[0]
    return b.reshape(n_head, rows // n_head // 2, 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def init_weights(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], *, n_head: int,
                 n_head_kv: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{HF module name: (A, B)} for the LoRA trainer to start from, from llama.cpp-named A and B."""
    from adapters import architectures

    short_to_module = {v: k for k, v in architectures.get("llama").tensors.items()}
    out = {}
    for name, a_value in a.items():
        _, layer, short, _ = name.split(".")
        b_value = np.asarray(b[f"{name}{LORA_B}"])
        if short == "attn_q":
            b_value = unpermute_rows(b_value, n_head)
        elif short == "attn_k":
            b_value = unpermute_rows(b_value, n_head_kv)
        out[f"model.layers.{layer}.{short_to_module[short]}"] = (np.asarray(a_value), b_value)
    return out


def read_lora_b(path: Path) -> dict[str, np.ndarray]:
    """The B tensors of a GGUF LoRA adapter as llama.cpp stores them ({name.lora_b: out × r})."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: np.array(t.data, dtype=np.float32).reshape(int(t.shape[1]), int(t.shape[0]))
            for t in reader.tensors if t.name.endswith(LORA_B)}


# --- FedKSeed ----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def seed_pool(pool_seed: int, size: int) -> tuple[int, ...]:
    """K public seeds for the household's directions (FedKSeed's finite seed pool, arXiv 2312.06353)."""
    if size <= 0:
        raise InvalidInput(f"the seed pool needs at least one seed, not {size}")
    return tuple(int(s) for s in np.random.SeedSequence([pool_seed, 0xFED]).generate_state(size, np.uint64))


def pool_sums(log: Sequence[Sequence[float]], pool: Sequence[int]) -> np.ndarray:
    """{seed: Σ scalar} of an update log, as a float32 vector indexed like `pool` (float64 sums, so the
    order of the log does not change the result beyond float32 rounding)."""
    index = {seed: i for i, seed in enumerate(pool)}
    sums = np.zeros(len(pool), dtype=np.float64)
    for _step, seed, g in log:
        if int(seed) not in index:
            raise MalformedUpdate(f"update log uses seed {int(seed)}, which is not in the household's pool")
        sums[index[int(seed)]] += float(g)
    return sums.astype(np.float32)


def replay_sums(tensors: list[np.ndarray], sums: np.ndarray, pool: Sequence[int], *, lr: float,
                perturbations: int = 1) -> list[np.ndarray]:
    """θ ← θ − η·s_k·z_k/n for every pool seed k (in place; returned): the round's whole update, exact
    up to float32 rounding because η is constant within the round (zo.replay does the same step by step)."""
    from adapters import zo

    for seed, s in zip(pool, sums):
        if s != 0.0:
            zo.update(tensors, int(seed), np.float32(np.float32(lr) * np.float32(s) / np.float32(perturbations)))
    return tensors


def update_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of the tensors' payload (without the message's framing)."""
    return sum(int(np.asarray(a).nbytes) for a in arrays.values())


def save_start(path: Path, *, lora: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
               sums: np.ndarray | None = None) -> Path:
    """Write where a local run starts (LoRA (A, B) per module, or FedKSeed pool sums) as .npz, 0600."""
    import io

    from adapters.base import write_private

    arrays = {f"{m}|{k}": v for m, (a, b) in (lora or {}).items() for k, v in (("A", a), ("B", b))}
    if sums is not None:
        arrays[POOL_KEY] = np.asarray(sums, dtype=np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_private(path, buffer.getvalue())
    return path


def load_start(path: Path) -> dict[str, Any]:
    """`save_start`'s file back: {"lora": {module: (A, B)}} and/or {"sums": K floats}."""
    with np.load(path) as found:
        lora: dict[str, list[Any]] = {}
        out: dict[str, Any] = {}
        for key in found.files:
            if key == POOL_KEY:
                out["sums"] = found[key]
            else:
                module, part = key.rsplit("|", 1)
                lora.setdefault(module, [None, None])[0 if part == "A" else 1] = found[key]
    if lora:
        out["lora"] = {m: (ab[0], ab[1]) for m, ab in lora.items()}
    return out
