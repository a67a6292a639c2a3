"""Copies of the bundled GGUF with changed metadata: a model without a chat template, with a broken one,
with a short training context. Real files that llama.cpp loads, made with the `gguf` package's own copier."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any


def variant(source: Path, target: Path, *, set_strings: dict[str, str] | None = None,
            set_ints: dict[str, int] | None = None, remove: tuple[str, ...] = ()) -> Path:
    """Write `target`: `source` with string/uint32 keys set and `remove` keys dropped."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(source)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(target, arch=arch, endianess=reader.endianess)
    new: dict[str, Any] = {k: MetadataDetails(gguf.GGUFValueType.STRING, v) for k, v in (set_strings or {}).items()}
    new.update({k.replace("{arch}", arch): MetadataDetails(gguf.GGUFValueType.UINT32, v)
                for k, v in (set_ints or {}).items()})
    with contextlib.redirect_stderr(io.StringIO()):   # its progress bar
        copy_with_new_metadata(reader, writer, new, list(remove))
    return target
