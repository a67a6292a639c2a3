"""The chat model's own GGUF, dequantized into torch for training, cached so it happens once.

transformers reads the GGUF (`gguf_file=`) and dequantizes it; `save_pretrained` refuses such a model,
so the weights are cached with safetensors (the tied `lm_head.weight` dropped) next to the config,
keyed by the GGUF's SHA-256. Later runs rebuild the model from the config and load the cached weights.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from adapters.errors import TrainingUnavailable

HASH_CHUNK = 1 << 20
# transformers' GGUF loader draws a tqdm bar that ignores its own progress-bar switch; tqdm reads this
# variable when it is first imported (by peft or transformers, before any loading starts). Ember shows
# its own progress.
os.environ.setdefault("TQDM_DISABLE", "1")


def file_sha256(path: Path, cache_dir: Path | None = None) -> str:
    """SHA-256 of a file; remembered in `cache_dir` by (path, size, mtime) so a large model is read once."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    memo = cache_dir / "hashes.json" if cache_dir is not None else None
    known: dict[str, str] = {}
    if memo is not None and memo.is_file():
        try:
            known = json.loads(memo.read_text())
        except (OSError, ValueError):
            known = {}
        if key in known:
            return known[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    if memo is not None:
        known[key] = value
        write_private(memo, json.dumps(known).encode())
    return value


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file, fsync, rename), mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def import_torch() -> Any:
    """torch, imported lazily (2 s) with a clear error when it is missing."""
    try:
        import torch
    except ImportError as err:
        raise TrainingUnavailable("torch is not installed; install it (`pip install torch==2.13.0`) or "
                                  "use --method zo with the llama.cpp backend") from err
    return torch


def load_base(model_path: Path, cache_dir: Path, *, threads: int | None = None) -> Any:
    """The GGUF's model in torch (float32, frozen, eval mode), dequantized once and then cached.

    Any architecture in `adapters.architectures` whose GGUF transformers reads (F32/F16/BF16, Q8_0,
    K-quants); TrainingUnavailable (one line) for another."""
    torch = import_torch()
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
    model_path = Path(model_path).resolve()
    from adapters import architectures

    architectures.of_gguf(model_path)     # one line, before a long load, for an architecture Ember cannot train
    folder = cache_dir / "base" / file_sha256(model_path, cache_dir)[:16]
    weights, config_file = folder / "model.safetensors", folder / "config.json"
    if weights.is_file() and config_file.is_file():
        # from_pretrained builds on the meta device and maps the safetensors file: no random init to
        # overwrite and no second copy of the weights (building from the config and then loading the
        # file peaked at 2.7x the model's size, above inference itself).
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32)
        architectures.of_model(model)   # transformers' reading of it must be one Ember knows, too
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = folder / f".model.{os.getpid()}.tmp"
        save_file(state, str(tmp))
        os.chmod(tmp, 0o600)
        os.replace(tmp, weights)
        write_private(config_file, model.config.to_json_string().encode())
    model.requires_grad_(False)
    model.eval()
    return model
