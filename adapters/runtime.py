"""Load, apply and free adapters on a loaded llama.cpp model, without reloading it (hot-swap).

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
    handle: Any          # llama_adapter_lora_p


def load(llm: Any, path: Path, *, base_sha256: str | None) -> Loaded:
    """Validate and load a LoRA adapter file for `llm`; nothing is applied yet."""
    import llama_cpp

    path = Path(path)
    info = read_adapter(path)
    if info.kind != "lora":
        raise AdapterInvalid(f"{path.name} is a {info.kind.replace('_', ' ')}, not a LoRA adapter")
    check_compatible(info, architecture=llm.metadata.get("general.architecture", ""),
                     base_sha256=base_sha256)
    handle = llama_cpp.llama_adapter_lora_init(llm._model.model, str(path).encode("utf-8"))
    if not handle:
        raise AdapterMismatch(f"llama.cpp refused adapter {path.name}: its tensors do not fit this model "
                              f"({llm.metadata.get('general.name', 'unknown')}); train one for it with "
                              "`ember adapt`")
    return Loaded(path, info, handle)


def apply(llm: Any, loaded: Loaded | None, scale: float = 1.0) -> None:
    """Generate with `loaded` from now on (None: the base model alone); clears the KV cache."""
    import llama_cpp

    if loaded is None:
        llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, None, 0, None)
    else:
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(loaded.handle)
        scales = (ctypes.c_float * 1)(scale)
        if llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, adapters, 1, scales):
            raise AdapterInvalid(f"llama.cpp could not apply adapter {loaded.path.name}")
    llm.reset()


def free(loaded: Loaded | None) -> None:
    """Release a loaded adapter that is no longer applied."""
    if loaded is not None:
        import llama_cpp

        llama_cpp.llama_adapter_lora_free(loaded.handle)
