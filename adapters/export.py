"""LoRA weights → a GGUF LoRA adapter, control vectors → a control-vector GGUF, both in llama.cpp's
formats, and reading adapters back to check them.

Format (as llama.cpp's convert_lora_to_gguf.py writes it): `general.type=adapter`,
`general.architecture=<base arch>`, `adapter.type=lora`, `adapter.lora.alpha`; per adapted weight two F32
tensors `blk.N.<name>.weight.lora_a` (numpy shape r × in) and `.lora_b` (out × r). llama.cpp stores Q
and K rows permuted for its rotary embedding and transformers un-permutes them when it loads a GGUF, so
`lora_b` of q_proj/k_proj is permuted back into llama.cpp's row order here, for the architectures whose
converter permutes (names, permutation and fused tensors per architecture: `adapters.architectures`).
Ember adds `ember.*` keys:
the SHA-256 of the base GGUF the adapter was trained on, so another base model is refused.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from adapters import architectures
from adapters.errors import AdapterInvalid, AdapterMismatch

MODULE = re.compile(r"model\.layers\.(\d+)\.(\w+\.\w+)$")


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """What an adapter file says about itself."""

    kind: str                  # lora | control_vector
    architecture: str
    alpha: float | None
    base_sha256: str | None
    base_name: str | None
    n_tensors: int
    layers: tuple[int, ...]


def permute_rows(b: Any, n_head: int) -> Any:
    """HF's row order of a Q/K projection → llama.cpp's (convert_hf_to_gguf.py's `permute`), on B."""
    rows = b.shape[0]
    return b.reshape(n_head, 2, rows // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def tensor_name(module: str, architecture: str = "llama") -> tuple[int, str]:
    """`model.layers.3.self_attn.q_proj` → (3, `blk.3.attn_q.weight`), by the architecture's names."""
    match = MODULE.fullmatch(module)
    if not match:
        raise ValueError(f"cannot export LoRA on {module}: only attention and MLP projections")
    layer = int(match.group(1))
    return layer, f"blk.{layer}.{architectures.get(architecture).tensor(match.group(2))}.weight"


def write_lora_gguf(path: Path, weights: dict[str, tuple[Any, Any]], *, alpha: float, n_head: int,
                    n_head_kv: int, base_sha256: str, base_name: str, architecture: str = "llama",
                    extra: dict[str, Any] | None = None) -> Path:
    """Write `weights` ({module: (A r×in, B out×r)}) as a GGUF LoRA adapter, atomically, mode 0600.

    `architecture` is the base GGUF's `general.architecture`: it names the tensors and says whether Q/K
    rows are permuted. A fused module (Phi-3's `qkv_proj`, `gate_up_proj`) exports whole, as llama.cpp's
    fused tensor. Raises TrainingUnavailable for an architecture without an entry, ValueError for a
    module that cannot carry an exported LoRA.
    """
    import numpy as np

    arch = architectures.get(architecture)

    def tensors(writer: Any) -> None:
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(alpha))
        for module, (a, b) in sorted(weights.items(), key=lambda kv: tensor_name(kv[0], architecture)):
            _, name = tensor_name(module, architecture)
            a = np.ascontiguousarray(_numpy(a), dtype=np.float32)
            b = np.ascontiguousarray(_numpy(b), dtype=np.float32)
            heads = arch.permuted_heads(module, n_head, n_head_kv)
            if heads is not None:
                b = np.ascontiguousarray(permute_rows(b, heads))
            writer.add_tensor(f"{name}.lora_a", a)
            writer.add_tensor(f"{name}.lora_b", b)

    return _write(path, architecture, tensors, base_sha256=base_sha256, base_name=base_name, extra=extra)


def write_control_vector_gguf(path: Path, directions: Any, *, base_sha256: str, base_name: str,
                              model_hint: str = "llama", extra: dict[str, Any] | None = None) -> Path:
    """Write a control vector ((n_layer − 1) × n_embd, row i for layer i + 1) as llama.cpp's control-vector
    GGUF (`general.architecture=controlvector`, F32 tensors `direction.<layer>`), atomically, mode 0600."""
    import numpy as np

    def tensors(writer: Any) -> None:
        writer.add_string("controlvector.model_hint", model_hint)
        writer.add_uint32("controlvector.layer_count", len(directions))
        for i, row in enumerate(_numpy(directions)):
            writer.add_tensor(f"direction.{i + 1}", np.ascontiguousarray(row, dtype=np.float32))

    return _write(path, "controlvector", tensors, base_sha256=base_sha256, base_name=base_name, extra=extra)


def _write(path: Path, architecture: str, body: Any, *, base_sha256: str, base_name: str,
           extra: dict[str, Any] | None) -> Path:
    """A GGUF with Ember's keys and `body(writer)`'s content, written to a temporary name, synced, renamed."""
    import gguf

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), architecture)
    try:
        writer.add_string("ember.base_sha256", base_sha256)
        writer.add_string("ember.base_name", base_name)
        for key, value in (extra or {}).items():
            if isinstance(value, str):
                writer.add_string(f"ember.{key}", value)
            else:
                writer.add_float32(f"ember.{key}", float(value))
        body(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o600)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _numpy(t: Any) -> Any:
    return t.detach().cpu().float().numpy() if hasattr(t, "detach") else t


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    if field.types and field.types[0].name == "STRING":
        return bytes(value).decode("utf-8", "replace")
    return value.tolist()[0] if hasattr(value, "tolist") else value


def read_adapter(path: Path) -> AdapterInfo:
    """Read an adapter's metadata; `AdapterInvalid` (one line) for anything that is not a usable adapter."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise AdapterInvalid(f"adapter file {path} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:   # the gguf package raises ValueError, struct.error, IndexError … on bad bytes
        raise AdapterInvalid(f"{path.name} is not a readable GGUF adapter (corrupt or truncated)") from err
    architecture = _field(reader, "general.architecture") or ""
    names = [t.name for t in reader.tensors]
    layers = tuple(sorted({int(m.group(1)) for n in names if (m := re.match(r"blk\.(\d+)\.", n))}))
    if architecture == "controlvector":
        if not any(n.startswith("direction.") for n in names):
            raise AdapterInvalid(f"{path.name} is a control vector without directions")
        return AdapterInfo("control_vector", architecture, None, _field(reader, "ember.base_sha256"),
                           _field(reader, "ember.base_name"), len(names),
                           tuple(sorted(int(n.split(".")[1]) for n in names if n.startswith("direction."))))
    if _field(reader, "general.type") != "adapter":
        raise AdapterInvalid(f"{path.name} is not an adapter (general.type is "
                             f"{_field(reader, 'general.type') or 'missing'}); it looks like a full model")
    kind = _field(reader, "adapter.type")
    if kind != "lora":
        raise AdapterInvalid(f"{path.name} is a {kind or 'unknown'} adapter; Ember applies LoRA adapters")
    if not names or not all(n.endswith((".lora_a", ".lora_b")) for n in names):
        raise AdapterInvalid(f"{path.name} has no LoRA tensors (or tensors llama.cpp would refuse)")
    alpha = _field(reader, "adapter.lora.alpha")
    return AdapterInfo("lora", architecture, float(alpha) if alpha is not None else None,
                       _field(reader, "ember.base_sha256"), _field(reader, "ember.base_name"), len(names), layers)


def check_compatible(info: AdapterInfo, *, architecture: str, base_sha256: str | None) -> None:
    """`AdapterMismatch` when an adapter was made for another architecture or another base model."""
    if info.kind == "lora" and info.architecture != architecture:
        raise AdapterMismatch(f"adapter is for the {info.architecture or 'unknown'} architecture, the model "
                              f"is {architecture}; train one for this model with `ember adapt`")
    if info.base_sha256 and base_sha256 and info.base_sha256 != base_sha256:
        raise AdapterMismatch(f"adapter was trained on another base model ({info.base_name or 'unknown'}, "
                              f"sha256 {info.base_sha256[:12]}…); train one for this model with `ember adapt`")


def model_architecture(path: Path) -> str:
    """`general.architecture` of a GGUF model (read from its header, no weights loaded)."""
    import gguf

    try:
        return _field(gguf.GGUFReader(str(path)), "general.architecture") or ""
    except Exception as err:
        raise AdapterInvalid(f"cannot read the model header of {Path(path).name}") from err
