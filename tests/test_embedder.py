"""The onnxruntime embedder gives sentence-transformers' vectors (so stored embeddings stay valid),
and its one-time export runs in a child process, once, atomically."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from assistant.embedder import Embedder, EmbedderUnavailable, _export_in_child, find_export, model_dir

TEXTS = [
    "", " ", "\n\t", "?", "!!!...???", "—", "a", "Hello world", "  leading and trailing spaces  ",
    "When is Ana's birthday?", "My sister Ana was born on 3 May.",
    "Ça va? Où est la bibliothèque? Ünïcödé façade naïve", "日本語のテキストです。東京は大きい。",
    "مرحبا بالعالم", "emoji 🎉🔥 test 👩‍👩‍👧", "\u200b\u00a0zero width and no-break spaces",
    "def f(x):\n    return x ** 2  # code, with\ttabs", "1234567890 3.14159 -42 1e-9", "A" * 1000,
    "word " * 400,                                                    # far past 256 tokens
    "The quick brown fox jumps over the lazy dog. " * 60,
    " ".join(f"note{i} about the garden, the car and the dentist" for i in range(40)),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """sentence-transformers itself, on the same weights: the vectors Ember has always stored."""
    from sentence_transformers import SentenceTransformer

    path = model_dir(tmp_path_factory.mktemp("st-cache"))
    return SentenceTransformer(str(path), device="cpu")


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return 1.0 - (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_vectors_equal_sentence_transformers_within_1e_4_cosine(embedder, reference):
    expected = reference.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    one_by_one = np.stack([embedder.encode_query(text) for text in TEXTS])
    assert one_by_one.shape == (len(TEXTS), Embedder.dim) and one_by_one.dtype == np.float32
    assert cosine_distance(one_by_one, expected).max() < 1e-4
    assert np.allclose(np.linalg.norm(one_by_one, axis=1), 1.0, atol=1e-5)

    # bulk: sorted by length, small batches on two threads, back in the caller's order
    parallel = Embedder.from_export(embedder.path, threads=2)
    bulk = parallel.encode(TEXTS * 3, batch_size=4)
    assert cosine_distance(bulk, np.concatenate([expected] * 3)).max() < 1e-4
    assert parallel.encode([]).shape == (0, Embedder.dim)


def test_long_texts_are_cut_at_the_models_256_tokens_not_the_tokenizer_files_128(embedder, reference):
    head = "word " * 200       # ~200 tokens: past tokenizer.json's 128, within max_seq_length 256
    differ_within = [head + "apples and pears", head + "the dentist on Tuesday"]
    past = "word " * 300
    differ_past = [past + "apples and pears", past + "the dentist on Tuesday"]
    within = embedder.encode(differ_within)
    assert cosine_distance(within[:1], within[1:])[0] > 1e-4     # the words after 128 tokens count
    cut = embedder.encode(differ_past)
    assert cosine_distance(cut[:1], cut[1:])[0] < 1e-6           # the words after 256 do not
    expected = reference.encode(differ_within + differ_past, normalize_embeddings=True)
    assert cosine_distance(np.concatenate([within, cut]), expected).max() < 1e-4


def test_the_lazy_export_runs_once_in_a_child_and_this_process_never_imports_torch(tmp_path):
    cache = tmp_path / "cache"
    script = ("import json, sys, time\n"
              "from pathlib import Path\n"
              "from assistant.embedder import Embedder, ensure_export\n"
              "cache = Path(sys.argv[1])\n"
              "first = ensure_export(cache, shared=None)\n"
              "t = time.perf_counter(); again = ensure_export(cache, shared=None)\n"
              "seconds = time.perf_counter() - t\n"
              "vector = Embedder.from_export(first).encode_query('hello')\n"
              "print(json.dumps({'path': str(first), 'again': str(again), 'seconds': seconds,\n"
              "                  'norm': float((vector ** 2).sum()),\n"
              "                  'heavy': [m for m in ('torch', 'transformers', 'sentence_transformers')\n"
              "                            if m in sys.modules]}))\n")
    # two at once: one exports, the other waits for it instead of exporting too
    children = [subprocess.Popen([sys.executable, "-c", script, str(cache)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
    reports = []
    for child in children:
        out, err = child.communicate(timeout=900)
        assert child.returncode == 0, err
        reports.append(json.loads(out))
    for report in reports:
        assert report["heavy"] == [] and abs(report["norm"] - 1.0) < 1e-4
        assert report["path"] == report["again"] == reports[0]["path"]
    export = cache / reports[0]["path"].rsplit("/", 1)[-1]
    assert sorted(p.name for p in export.iterdir()) == ["embedder.json", "model.onnx", "model.onnx.data",
                                                         "tokenizer.json"]
    assert json.loads((export / "embedder.json").read_text())["max_seq_length"] == 256
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in export.iterdir())
    assert export.stat().st_mode & 0o777 == 0o700
    # nothing half-written is left beside it
    assert sorted(p.name for p in cache.iterdir()) == [".onnx-export.lock", export.name]
    assert find_export(cache, shared=None) == export


def test_a_failed_export_is_one_clear_line_and_leaves_nothing(tmp_path):
    bad = tmp_path / "model.zip"
    bad.write_bytes(b"not a zip file")
    target = tmp_path / "out" / "export"
    with pytest.raises(EmbedderUnavailable) as failure:
        _export_in_child(bad, target)
    message = str(failure.value)
    assert message.startswith("exporting the embedding model to ONNX failed: ") and "\n" not in message
    assert "zip" in message.lower()
    assert not target.exists() and list((tmp_path / "out").iterdir()) == []


def test_an_export_without_its_completion_mark_is_not_used(tmp_path):
    from assistant.embedder import export_name, model_archive

    half = tmp_path / export_name(model_archive())
    half.mkdir()
    (half / "model.onnx").write_bytes(b"half")
    assert find_export(tmp_path, shared=None) is None


def test_processes_starting_at_once_on_a_fresh_home_all_find_the_cache_writable(tmp_path):
    # several ember processes started together each make the missing cache directories; the ones
    # that lose the race to make a directory must still see it as writable (CI hit this once)
    from multiprocessing import get_context

    ctx = get_context("fork")
    start = ctx.Barrier(12)
    results = ctx.Queue()
    root = tmp_path / "home" / "data" / "cache"

    def child():
        from assistant.embedder import _writable
        start.wait()
        results.put(_writable(root))

    children = [ctx.Process(target=child) for _ in range(12)]
    for c in children:
        c.start()
    for c in children:
        c.join(60)
    assert sorted(results.get(timeout=5) for _ in children) == [True] * 12
    assert all(d.stat().st_mode & 0o777 == 0o700 for d in (root, root.parent, root.parent.parent))
