"""The chat model's own GGUF, dequantized into torch for training, cached so it happens once.

transformers reads the GGUF (`gguf_file=`) and dequantizes it; `save_pretrained` refuses such a model,
so the weights are cached with safetensors (the tied `lm_head.weight` dropped) next to the config,
keyed by the GGUF's SHA-256. Later runs rebuild the model from the config and load the cached weights.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from adapters.errors import TrainingUnavailable
from storage.private import private_dirs

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
    private_dirs(path.parent)
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


def gguf_parameters(path: Path) -> int:
    """The number of parameters of a GGUF model, as llama.cpp counts them (`llama_model_n_params`).

    The model is memory-mapped, never read into memory: ~0.1 s where the `gguf` package's reader takes
    ~10 s on SmolLM2 (it parses the whole vocabulary). Counted once per file version (path, size, mtime)
    in a process: an adapt run asks for its size and for its dtype, and the daemon on every check.
    Raises ValueError for a file llama.cpp cannot load."""
    try:
        stat = Path(path).stat()
    except OSError:
        raise ValueError(f"llama.cpp cannot load {path}") from None
    return _count_parameters(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _count_parameters(path: str, _size: int, _mtime_ns: int) -> int:
    import llama_cpp

    from adapters import llama_log

    llama_log.install(verbose=llama_log.current().verbose if llama_log.current() else False)
    params = llama_cpp.llama_model_default_params()
    params.use_mmap = True
    params.n_gpu_layers = 0
    params.vocab_only = False
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ValueError(f"llama.cpp cannot load {path}")
    try:
        return int(llama_cpp.llama_model_n_params(model))
    finally:
        llama_cpp.llama_model_free(model)


def import_torch() -> Any:
    """torch, imported lazily (2 s) with a clear error when it is missing."""
    try:
        import torch
    except ImportError as err:
        raise TrainingUnavailable("torch is not installed; install it (`pip install torch==2.13.0`) or "
                                  "use --method zo with the llama.cpp backend") from err
    return torch


DTYPES = ("float32", "bfloat16", "auto")


def bf16_supported(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bf16 natively (the `avx512_bf16` or `amx_bf16` flag; Arm's `bf16`), so
    a bf16 base halves training memory without emulated arithmetic. False where the flags cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = {f for line in text.splitlines() if line.startswith(("flags", "Features"))
             for f in line.split(":", 1)[1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


# `auto` holds the frozen base in bf16 from this many parameters up, where the CPU computes bf16. Measured
# by `ember bench train_memory` (DP LoRA, 2026-11-30 15:55 UTC, README "Any model learns"): from 40 M
# parameters bf16 wins both memory and time (SmolLM2-135M: 1,227 -> 927 MB, 0.84 -> 0.43 s/step); below it
# converting the activations costs more than the small matrices save (width 256: 1.7x the time per step).
BF16_MIN_PARAMS = 40_000_000


def resolve_dtype(dtype: str, params: int | None = None) -> str:
    """`float32` or `bfloat16` for a requested training dtype. `auto` is bfloat16 where `bf16_supported()`
    and the model has at least `BF16_MIN_PARAMS` parameters (`params`; None: not known, taken as large).
    ValueError for another name."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if dtype == "auto":
        large = params is None or params >= BF16_MIN_PARAMS
        return "bfloat16" if large and bf16_supported() else "float32"
    return dtype


def load_base(model_path: Path, cache_dir: Path, *, threads: int | None = None, dtype: str = "float32") -> Any:
    """The GGUF's model in torch (frozen, eval mode; `dtype` float32, bfloat16 or auto: see `resolve_dtype`), dequantized once
    and then cached (the cache holds float32; a bf16 load converts it, halving the weights' memory).

    Any architecture in `adapters.architectures` whose GGUF transformers reads (F32/F16/BF16, Q8_0,
    K-quants); TrainingUnavailable (one line) for another."""
    torch = import_torch()
    dtype = resolve_dtype(dtype, gguf_parameters(model_path) if dtype == "auto" else None)
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
    if dtype != "float32" and (folder / dtype / "model.safetensors").is_file():
        model = None           # loaded from the copy in this dtype below
    elif weights.is_file() and config_file.is_file():
        # from_pretrained builds on the meta device and maps the safetensors file: no random init to
        # overwrite and no second copy of the weights (building from the config and then loading the
        # file peaked at 2.7x the model's size, above inference itself).
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype), local_files_only=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32)
        architectures.of_model(model)   # transformers' reading of it must be one Ember knows, too
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
        private_dirs(folder)
        tmp = folder / f".model.{os.getpid()}.tmp"
        save_file(state, str(tmp))
        os.chmod(tmp, 0o600)
        os.replace(tmp, weights)
        write_private(config_file, model.config.to_json_string().encode())
        if dtype != "float32":
            model = model.to(getattr(torch, dtype))
    if dtype != "float32":
        # A copy of the cache in this dtype, beside it: loading bf16 from the float32 file maps all of it
        # and peaked as high as a float32 load (1,191 vs 1,179 MB for SmolLM2-135M's LoRA run).
        half = folder / dtype
        if not ((half / "model.safetensors").is_file() and (half / "config.json").is_file()):
            state = {k: v.contiguous() for k, v in model.state_dict().items()
                     if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
            half.mkdir(exist_ok=True, mode=0o700)
            tmp = half / f".model.{os.getpid()}.tmp"
            save_file(state, str(tmp))
            os.chmod(tmp, 0o600)
            os.replace(tmp, half / "model.safetensors")
            write_private(half / "config.json", model.config.to_json_string().encode())
            del state
        else:
            del model
        model = AutoModelForCausalLM.from_pretrained(str(half), dtype=getattr(torch, dtype), local_files_only=True)
    model.requires_grad_(False)
    model.eval()
    return model
