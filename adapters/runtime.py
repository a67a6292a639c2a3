"""Load, apply and free adapters on a loaded llama.cpp model, without reloading it (hot-swap).

Two kinds: LoRA adapters (llama.cpp's adapter API) and control vectors (one vector added to the residual
stream after each layer, set in memory). At most one of either is applied at a time.

llama.cpp validates an adapter when it loads it but only says why in its log; Ember reads the file's
metadata first (`adapters.export.read_adapter`) so a wrong file gets a clear one-line error, and the
model keeps whatever adapter it had. Loading takes ~10 ms; applying or removing one takes µs, so a
request can go with or without the adapter at no cost. Every change clears the KV cache (`llm.reset()`).
"""
from __future__ import annotations

import ctypes
import dataclasses
from pathlib import Path
from typing import Any

from adapters.errors import AdapterInvalid, AdapterMismatch
from adapters.export import AdapterInfo, check_compatible, read_adapter


@dataclasses.dataclass
class Loaded:
    """An adapter loaded into llama.cpp for one model (applied or not)."""

    path: Path
    info: AdapterInfo
    handle: Any          # llama_adapter_lora_p (LoRA)
    vector: Any = None   # float32 array, (n_layer − 1) · n_embd, layer 1 first (control vector)


def load(llm: Any, path: Path, *, base_sha256: str | None) -> Loaded:
    """Validate and load an adapter file (LoRA or control vector) for `llm`; nothing is applied yet."""
    import llama_cpp

    path = Path(path)
    info = read_adapter(path)
    check_compatible(info, architecture=llm.metadata.get("general.architecture", ""),
                     base_sha256=base_sha256)
    if info.kind == "control_vector":
        return Loaded(path, info, None, read_control_vector(path, n_embd=llm.n_embd(), n_layer=_n_layer(llm)))
    handle = llama_cpp.llama_adapter_lora_init(llm._model.model, str(path).encode("utf-8"))
    if not handle:
        raise AdapterMismatch(f"llama.cpp refused adapter {path.name}: its tensors do not fit this model "
                              f"({llm.metadata.get('general.name', 'unknown')}); train one for it with "
                              "`ember adapt`")
    return Loaded(path, info, handle)


def apply(llm: Any, loaded: Loaded | None, scale: float = 1.0) -> None:
    """Generate with `loaded` from now on (None: the base model alone); clears the KV cache."""
    import llama_cpp

    set_control_vector(llm, loaded.vector if loaded is not None else None, llm.n_embd(), reset=False)
    if loaded is None or loaded.vector is not None:
        llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, None, 0, None)
    else:
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(loaded.handle)
        scales = (ctypes.c_float * 1)(scale)
        if llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, adapters, 1, scales):
            raise AdapterInvalid(f"llama.cpp could not apply adapter {loaded.path.name}")
    llm.reset()


def free(loaded: Loaded | None) -> None:
    """Release a loaded adapter that is no longer applied."""
    if loaded is not None and loaded.handle is not None:
        import llama_cpp

        llama_cpp.llama_adapter_lora_free(loaded.handle)


def _n_layer(llm: Any) -> int:
    import llama_cpp

    return int(llama_cpp.llama_model_n_layer(llm._model.model))


def set_control_vector(llm: Any, vector: Any, n_embd: int, *, reset: bool = True) -> None:
    """Add `vector` ((n_layer − 1) · n_embd floats, layer 1 first) to the residual stream from now on;
    None removes it. llama.cpp copies the values; every change needs the prompt evaluated afresh."""
    set_context_control_vector(llm._ctx.ctx, vector, n_embd)
    if reset:
        llm.reset()


def set_context_control_vector(ctx: Any, vector: Any, n_embd: int) -> None:
    """`set_control_vector` on one llama.cpp context (a `llama_context_p`); None removes it.
    Raises AdapterInvalid when llama.cpp refuses it."""
    import llama_cpp

    if vector is None:
        failed = llama_cpp.llama_set_adapter_cvec(ctx, None, 0, n_embd, 0, 0)
    else:
        data = vector.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        failed = llama_cpp.llama_set_adapter_cvec(ctx, data, len(vector), n_embd, 1, len(vector) // n_embd)
    if failed:
        raise AdapterInvalid("llama.cpp could not apply the control vector")


def read_control_vector(path: Path, *, n_embd: int, n_layer: int) -> Any:
    """A control-vector GGUF's `direction.<layer>` tensors as llama.cpp's flat layout (layer 1 first)."""
    import gguf
    import numpy as np

    vector = np.zeros((n_layer - 1) * n_embd, dtype=np.float32)
    for tensor in gguf.GGUFReader(str(path)).tensors:
        if not tensor.name.startswith("direction."):
            continue
        layer, values = int(tensor.name.split(".")[1]), np.asarray(tensor.data, dtype=np.float32).ravel()
        if values.size != n_embd or not 1 <= layer < n_layer:
            raise AdapterMismatch(f"control vector {Path(path).name} does not fit this model: "
                                  f"{tensor.name} has {values.size} values (the model's width is {n_embd}, "
                                  f"layers 1–{n_layer - 1}); train one for it with `ember adapt --method zo`")
        vector[(layer - 1) * n_embd:layer * n_embd] += values
    return vector
