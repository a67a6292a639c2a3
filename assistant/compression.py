"""`ember compress`: measure, choose, write and register a layer-wise compressed model (LUC).

A compressed model lives in `<home>/models/NAME.gguf`, with `NAME.json` beside it (source, policy,
sensitivity, what was measured). It is registered by existing: the GGUF is quantised into a hidden
temporary file and renamed into place only after llama.cpp finished and every tensor's type was
checked, so a killed run leaves no model `--model NAME` could open; the next run deletes the leftovers
of dead runs. `--model NAME` (chat, ask, doctor, ...) resolves to the file (`Settings.model_path`).

Calibration text: the user's own messages when they hold enough tokens (they never leave the device),
else a shipped public-domain text (the Declaration of Independence). One part of it is measured for
sensitivity, a later part is held out to check the written model in llama.cpp.
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

from adapters import compress
from adapters.base import file_sha256, write_private
from adapters.errors import InvalidInput
from assistant.config import Settings
from storage.private import private_dirs

BUILTIN_TEXT = Path(compress.__file__).parent / "data" / "declaration.txt"
BUILTIN_NAME = "builtin: the Declaration of Independence (1776, public domain)"
PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.partial\.gguf$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclasses.dataclass(frozen=True)
class Request:
    """What the user asked `ember compress` for."""

    size_mb: float | None = None
    max_kl: float | None = None
    prune_layers: int = 0
    calibration: str = "auto"          # auto, log, builtin, or a text file's path
    tokens: int = 256                  # calibration tokens for sensitivity
    heldout_tokens: int = 256          # tokens to check the written model on
    types: tuple[str, ...] = compress.CANDIDATES
    name: str | None = None
    dry_run: bool = False


def models_dir(settings: Settings) -> Path:
    """Where compressed models are registered."""
    return settings.models_dir


def registered(settings: Settings) -> list[dict[str, Any]]:
    """Every registered compressed model: name, path, bytes and its sidecar's record."""
    import json

    folder = models_dir(settings)
    out = []
    for path in sorted(folder.glob("*.gguf")) if folder.is_dir() else []:
        if path.name.startswith("."):
            continue
        record: dict[str, Any] = {}
        try:
            record = json.loads(path.with_suffix(".json").read_text())
        except (OSError, ValueError):
            pass
        out.append({"name": path.stem, "path": str(path), "bytes": path.stat().st_size,
                    "source": record.get("source"), "policy": record.get("policy"),
                    "measured": record.get("measured"), "created": record.get("created")})
    return out


def clean_partials(folder: Path) -> list[Path]:
    """Delete the temporary files of compressions whose process is gone (killed mid-write)."""
    from storage.conversations import process_alive

    removed = []
    for path in folder.glob(".*.partial.gguf") if folder.is_dir() else []:
        match = PARTIAL.match(path.name)
        if match and not process_alive(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _tokenizer(model_path: Path) -> Any:
    from adapters.llama_log import quiet_llama

    return quiet_llama(model_path=str(model_path), vocab_only=True)


def calibration(settings: Settings, request: Request, vocab: Any, db: Any = None) -> tuple[list[int], list[int], str]:
    """(calibration tokens, held-out tokens, where they came from); each starts with BOS."""
    need = request.tokens + request.heldout_tokens
    choice = request.calibration

    def split(text: str) -> list[int]:
        return vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    if choice in ("auto", "log"):
        tokens: list[int] = []
        if db is not None:
            from storage.conversations import user_texts
            from storage.feedback import excluded_conversations

            texts = user_texts(db, max_chars=need * 8, exclude=excluded_conversations(db))
            tokens = split("\n\n".join(reversed(texts))) if texts else []
        if len(tokens) >= need:
            source = f"log: your own {len(tokens)} tokens of messages (they stay on this device)"
        elif choice == "log":
            raise InvalidInput(f"your log holds {len(tokens)} tokens of your own messages; --calibration log needs "
                               f"{need} (--tokens + --heldout-tokens); use --calibration builtin or a text file")
        else:
            tokens, source = split(BUILTIN_TEXT.read_text(encoding="utf-8")), BUILTIN_NAME
    elif choice == "builtin":
        tokens, source = split(BUILTIN_TEXT.read_text(encoding="utf-8")), BUILTIN_NAME
    else:
        path = Path(choice).expanduser()
        try:
            tokens, source = split(path.read_text(encoding="utf-8")), f"file: {path}"
        except (OSError, UnicodeDecodeError) as err:
            raise InvalidInput(f"cannot read calibration text {path}: {err}") from err
    if len(tokens) < need:
        raise InvalidInput(f"calibration text has {len(tokens)} tokens; {need} are needed "
                           "(lower --tokens or --heldout-tokens)")
    bos = [vocab.token_bos()] if vocab.token_bos() >= 0 else []
    calib = bos + tokens[:request.tokens - len(bos)]
    held = bos + tokens[request.tokens:request.tokens + request.heldout_tokens - len(bos)]
    return calib, held, source


def plan(settings: Settings, request: Request, sens: compress.Sensitivity) -> compress.Policy:
    """The policy for this request from a measured sensitivity."""
    pruned = compress.choose_pruned(sens, request.prune_layers)
    size = int(request.size_mb * compress.MB) if request.size_mb is not None else None
    return compress.assign(sens, size_bytes=size, max_kl=request.max_kl, pruned=pruned)


def logits(model_path: Path, tokens: list[int], threads: int) -> Any:
    """llama.cpp's logits (T, vocab) for `tokens` in one fresh context."""
    import numpy as np

    from adapters.llama_log import quiet_llama

    llm = quiet_llama(model_path=str(model_path), n_ctx=max(64, len(tokens)), n_batch=max(64, len(tokens)),
                      logits_all=True, n_threads=threads, n_threads_batch=threads, seed=0)
    try:
        llm.reset()
        llm.eval(tokens)
        return np.array(llm.scores[:len(tokens)], dtype=np.float32)
    finally:
        llm.close()


def run(settings: Settings, request: Request, *, db: Any = None,
        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure, choose, write, check and register; returns the --json document. Raises `BudgetUnmet`,
    `UnsupportedLayout` or `InvalidInput` before anything is written."""
    say = progress or (lambda _text: None)
    if request.size_mb is None and request.max_kl is None:
        raise InvalidInput("give a budget: --size MB (file size) or --max-kl X (nats/token)")
    if request.size_mb is not None and request.max_kl is not None:
        raise InvalidInput("give one budget, --size or --max-kl, not both")
    if request.name is not None and not NAME.match(request.name):
        raise InvalidInput(f"model name {request.name!r} must be letters, digits, '.', '_' or '-'")
    source = settings.model_path
    directory = None
    if source.is_dir():
        from adapters import convert

        if not convert.is_model_directory(source):
            raise InvalidInput(f"{source} is a directory without a config.json; ember compress reads a GGUF file "
                               "or a Hugging Face model directory")
        directory, source = source, converted(settings, source, say)
    if not source.is_file():
        from assistant.errors import ModelNotFound

        raise ModelNotFound(f"model file {source} does not exist; pass a .gguf file or a registered name")
    compress.read_layout(source)          # an unsupported layout fails here, before any work
    if request.size_mb is not None:       # so does a size no policy can reach (sizes follow from shapes)
        least = compress.smallest(source, request.types, pruned=request.prune_layers)
        if least > request.size_mb * compress.MB:
            raise compress.BudgetUnmet(
                f"--size {request.size_mb:g} MB cannot be met: the smallest {source.name} gets with "
                f"{', '.join(request.types)}" + (f" and {request.prune_layers} blocks pruned" if request.prune_layers
                                                 else "") + f" is {least / compress.MB:.1f} MB"
                + ("" if request.prune_layers else "; --prune-layers N drops whole blocks"))
    folder = models_dir(settings)
    started = time.monotonic()
    vocab = _tokenizer(source)
    calib, held, origin = calibration(settings, request, vocab, db)
    vocab.close()
    say(f"calibration: {origin}; {len(calib)} tokens measured, {len(held)} held out")

    def step(done: int, total: int) -> None:
        say(f"sensitivity: block {done}/{total}")

    sens = compress.measure(source, calib, types=request.types, drop=request.prune_layers > 0,
                            threads=settings.threads, calibration=origin.split(":")[0], progress=step)
    policy = plan(settings, request, sens)
    name = request.name or f"{directory.name if directory else source.stem}.luc-{policy.bytes / compress.MB:.0f}MB"
    target = folder / f"{name}.gguf"
    document: dict[str, Any] = {
        "name": name, "path": str(target), "source": str(directory or source), "calibration": origin,
        "converted": str(source) if directory else None,
        "reference": f"{source.name} dequantised (its stored types: "
                     f"{', '.join(sorted(set(sens.source_types)))}); nothing better than the source is known here",
        "policy": policy.as_json(), "summary": compress.summary(policy),
        "predicted_bytes": policy.bytes, "sensitivity": sens.as_json(), "dry_run": request.dry_run,
        "note": compress.SPARSITY_NOTE}
    if request.dry_run:
        document["seconds"] = round(time.monotonic() - started, 2)
        return document
    if target.exists():
        raise InvalidInput(f"a model named {name} is registered already ({target}); pass --name")
    private_dirs(folder)
    os.chmod(folder, 0o700)
    clean_partials(folder)
    partial = folder / f".{name}.{os.getpid()}.partial.gguf"
    try:
        say(f"writing {name} through llama.cpp's quantiser: {compress.summary(policy)}")
        compress.write(source, partial, policy, source_types=sens_types(source), threads=settings.threads)
        os.chmod(partial, 0o600)
        say("checking it in llama.cpp on the held-out tokens")
        ref, new = logits(source, held, settings.threads), logits(partial, held, settings.threads)
        kl, nll = compress.kl_nll(ref, new, held)
        _, ref_nll = compress.kl_nll(ref, ref, held)
        document["measured"] = {"bytes": partial.stat().st_size, "heldout_tokens": len(held), "kl": round(kl, 6),
                                "nll": round(nll, 4), "perplexity": round(compress.perplexity(nll), 3),
                                "reference_nll": round(ref_nll, 4),
                                "reference_perplexity": round(compress.perplexity(ref_nll), 3)}
        if request.max_kl is not None and kl > request.max_kl:
            # per-block KLs are measured one block at a time; changed together they compound
            suggestion = request.max_kl * max(policy.kl, 1e-9) / kl
            raise compress.BudgetUnmet(
                f"--max-kl {request.max_kl:g} was not met: the written model's KL on held-out tokens is {kl:.3g} "
                f"nats/token (the per-block estimate was {policy.kl:.3g}; errors of blocks compound); nothing was "
                f"registered; try --max-kl {suggestion:.2g}")
        document["source_sha256"] = file_sha256(source, settings.cache_dir)
        document["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        record = {k: v for k, v in document.items() if k != "sensitivity"}
        record["sensitivity"] = {"tokens": sens.tokens, "types": sens.types, "reference_nll": sens.reference_nll,
                                 "blocks": sens.blocks, "drop": sens.drop}
        write_private(target.with_suffix(".json"), compress.dumps(record))
        os.replace(partial, target)       # the model is registered from this moment, complete
    finally:
        partial.unlink(missing_ok=True)
    document["seconds"] = round(time.monotonic() - started, 2)
    return document


def converted(settings: Settings, directory: Path, say: Callable[[str], None]) -> Path:
    """The F16 GGUF of a Hugging Face model directory, converted once into the cache (keyed by the
    directory's files: names, sizes, times) and reused."""
    import hashlib

    from adapters import convert

    convert.check(directory)          # an unsupported directory fails here, before anything is said or written
    stamp = hashlib.sha256()
    for f in sorted(directory.iterdir()):
        if f.is_file():
            st = f.stat()
            stamp.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    target = settings.cache_dir / "converted" / f"{directory.name}-{stamp.hexdigest()[:12]}.F16.gguf"
    if not target.is_file():
        say(f"converting {directory} to an F16 GGUF (once; kept in {target.parent})")
        convert.convert(directory, target)
    return target


def sens_types(path: Path) -> dict[str, str]:
    """Stored type of each tensor (to keep embeddings and output head as they are)."""
    return compress.source_types(path)
