"""The engine's self-check: a tiny decode in a child process, so that a native crash is one clear line.

llama.cpp is native code: a bad build, a CPU feature it mishandles (AMX on recent Xeons: a SIGSEGV in
the first `llama_decode`) or a GGUF that trips it kills the whole process, with no Python exception
to catch. So before a model is used, a child process (`python -m assistant.selfcheck`) loads it the
way the engine does and decodes a few tokens; if the child dies, the parent says what failed and what
to do. A pass is cached under the cache directory, keyed by the model file and the llama.cpp build, so
the check runs again only when either changes; a cached `ensure()` costs a few stats and one small read.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from assistant.errors import EngineCrashed, ModelInvalid
from storage.private import private_dirs

CACHE_NAME = "selfcheck.json"
KEEP_PASSES = 8             # one per model (and build) recently used
TIMEOUT_SECONDS = 300.0     # a 135M model takes ~0.5 s; a 7B one on a slow disk far longer
N_CTX = 256
PROMPT = b"The capital of France is"
SAMPLE = 2
# Test-only: makes the child fail on purpose right before its decode ("segv", "abort", "fail", "hang"),
# so that the crash path can be exercised on any machine.
FAULT_ENV = "EMBER_SELFCHECK_FAULT"


@dataclasses.dataclass
class Result:
    """What one run of the check found (`ok`), and what the child said about the build and model."""

    ok: bool
    seconds: float
    stage: str = "start"               # how far the child got: start, import, load, decode, done
    signal: str | None = None          # e.g. SIGSEGV, when the child was killed by one
    returncode: int | None = None
    error: str | None = None           # the child's own one-line error, when it failed without crashing
    system_info: str | None = None     # llama_print_system_info() of the build
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    sampled: list[int] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)   # llama.cpp's warnings and errors
    log: list[str] = dataclasses.field(default_factory=list)   # the child's last lines of stderr
    checked: str | None = None         # when (ISO-8601, UTC)
    cached: bool = False

    def as_json(self) -> dict[str, Any]:
        """The result as a JSON-ready dict."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- cache key and cache file


def _stat(path: str) -> dict[str, Any]:
    st = os.stat(path)
    return {"path": path, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _llama_package() -> Path | None:
    """llama-cpp-python's package directory, found without importing it (that loads llama.cpp)."""
    module = sys.modules.get("llama_cpp")
    origin = getattr(module, "__file__", None) if module is not None else None
    if origin is None:
        spec = importlib.util.find_spec("llama_cpp")
        origin = spec.origin if spec is not None else None
    return Path(origin).parent if origin else None


def llama_lib_dir() -> Path | None:
    """Where llama-cpp-python loads llama.cpp's shared libraries from."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")   # llama-cpp-python honours it too
    if override:
        return Path(override)
    package = _llama_package()
    return package / "lib" if package is not None else None


def llama_cpp_version(package: Path | None = None) -> str | None:
    """llama-cpp-python's version, read from its `__init__.py` (importing it loads the library)."""
    module = sys.modules.get("llama_cpp")
    if module is not None and getattr(module, "__version__", None):
        return module.__version__
    package = package or _llama_package()
    if package is None:
        return None
    found = re.search(r'__version__\s*=\s*["\']([^"\']+)', (package / "__init__.py").read_text(encoding="utf-8"))
    return found.group(1) if found else None


def fingerprint(model_path: Path) -> dict[str, Any]:
    """What a cached pass depends on: the model file, llama-cpp-python's version, its native libraries."""
    package = _llama_package()
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    lib_dir = override or (str(package / "lib") if package is not None else None)
    libs = []
    if lib_dir is not None and os.path.isdir(lib_dir):
        libs = [_stat(entry.path) for entry in sorted(os.scandir(lib_dir), key=lambda e: e.name)
                if entry.is_file() and (".so" in entry.name or entry.name.endswith((".dylib", ".dll")))]
    return {"model": _stat(os.path.realpath(model_path)), "llama_cpp": llama_cpp_version(package),
            "libs": libs}


def _read_cache(cache_dir: Path) -> list[dict[str, Any]]:
    try:
        passes = json.loads((cache_dir / CACHE_NAME).read_text(encoding="utf-8")).get("passes", [])
    except (OSError, ValueError, AttributeError):
        return []   # no cache, or one we cannot read: the check simply runs again
    return passes if isinstance(passes, list) else []


def cached(model_path: Path, cache_dir: Path) -> Result | None:
    """The recorded pass for this model and build, if there is one."""
    key = fingerprint(model_path)
    for entry in _read_cache(cache_dir):
        if isinstance(entry, dict) and entry.get("key") == key:
            fields = {f.name for f in dataclasses.fields(Result)}
            result = Result(**{k: v for k, v in entry.get("result", {}).items() if k in fields})
            result.cached = True
            return result
    return None


def record(model_path: Path, cache_dir: Path, result: Result) -> None:
    """Remember a pass (atomically, 0600): the next `ensure()` for this model and build is instant."""
    if not result.ok:
        raise ValueError("only a passing self-check is recorded")
    key = fingerprint(model_path)
    private_dirs(cache_dir)
    entry = {"key": key, "result": {**result.as_json(), "cached": False}}
    passes = [e for e in _read_cache(cache_dir) if isinstance(e, dict) and e.get("key") != key
              and e.get("key", {}).get("model", {}).get("path") != key["model"]["path"]]
    passes = [entry, *passes][:KEEP_PASSES]
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{CACHE_NAME}.", suffix=".tmp")   # 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"passes": passes}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, cache_dir / CACHE_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- running the child


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _last_native_line(stderr: str) -> str | None:
    """The line of the child's stderr most likely to say why it died: a ggml/llama.cpp assertion or
    abort ("binary-ops.cpp:135: binary_op: unsupported types ..."), else an error line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        found = re.search(r"([\w.+-]+\.(?:c|cc|cpp|h|m)):(\d+): (.+)", line)
        if found:
            return _one_line(f"{found.group(1)}:{found.group(2)}: {found.group(3)}")
    for pattern in (r"GGML_ASSERT|GGML_ABORT|terminate called|what\(\)", r"\berror\b|failed"):
        for line in reversed(lines):
            if re.search(pattern, line, re.IGNORECASE) and not line.startswith(("Traceback", "File ")):
                return _one_line(line)
    return None


def _llama_error(result: Result) -> str | None:
    """llama.cpp's own reason for refusing a model ("check_tensor_dims: tensor ... has wrong shape")."""
    errors = [w.split(": ", 1)[1] for w in result.warnings if w.startswith("error: ")]
    for line in errors:   # the first error is the cause; the later ones say "failed to load model"
        return _one_line(line.rsplit("error loading model: ", 1)[-1])
    return None


def _last_report(stdout: bytes | None) -> dict[str, Any]:
    # The child reports before each step, so its last line says how far it got.
    for line in reversed((stdout or b"").decode("utf-8", "replace").splitlines()):
        try:
            report = json.loads(line)
        except ValueError:
            continue
        if isinstance(report, dict):
            return report
    return {}


def run(model_path: Path, threads: int, *, timeout: float = TIMEOUT_SECONDS) -> Result:
    """Load `model_path` and decode a few tokens in a child process; never raises for what the child does."""
    started = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # OpenMP's default spin-wait turns a 0.2 s decode on 2 threads into 8-14 s when another process
    # holds a core (measured on 2 cores); sleeping waits change timing only, never the kernels checked.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("GGML_NO_BACKTRACE", "1")   # ggml's crash handler would attach gdb to the dying child
    env.pop("PYTHONFAULTHANDLER", None)   # a Python stack dump of the child says nothing about llama.cpp
    command = [sys.executable, "-m", "assistant.selfcheck", str(model_path), str(max(1, threads))]
    try:
        child = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                               env=env)
        stdout, stderr, returncode = child.stdout, child.stderr, child.returncode
    except subprocess.TimeoutExpired as err:   # subprocess.run has killed the child
        stdout, stderr, returncode = err.stdout, err.stderr, None
    report = _last_report(stdout)
    log = (stderr or b"").decode("utf-8", "replace").splitlines()
    fields = {"stage", "error", "system_info", "model", "sampled", "warnings"}
    result = Result(ok=returncode == 0 and report.get("ok") is True, seconds=time.perf_counter() - started,
                    returncode=returncode, checked=_now(), log=log[-40:],
                    **{k: v for k, v in report.items() if k in fields})
    if returncode is None:
        result.error = f"no answer in {timeout:.0f} s"
    elif returncode < 0:
        try:
            result.signal = signal.Signals(-returncode).name
        except ValueError:
            result.signal = f"signal {-returncode}"
    elif not result.ok and not result.error:
        result.error = _last_native_line("\n".join(log)) or f"exit status {returncode}"
    return result


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def failure(model_path: Path, result: Result) -> Exception:
    """The one-line error for a failed check: what failed, and what to do."""
    name = Path(model_path).name
    doing = {"start": "starting", "import": "loading its library", "load": f"loading {name}",
             "decode": f"decoding with {name}"}.get(result.stage, f"checking {name}")
    advice = ("rebuild llama.cpp with `make clean setup`, try another --model, "
              "and run `ember doctor` for a report")
    if result.signal:
        hint = _last_native_line("\n".join(result.log))
        return EngineCrashed(f"llama.cpp crashed ({result.signal}) {doing}"
                             + (f" ({hint})" if hint else "") + f"; {advice}")
    if result.returncode is None:
        return EngineCrashed(f"llama.cpp hung {doing} in its self-check ({result.error}); {advice}")
    if result.stage == "template":
        return ModelInvalid(f"the chat template in {name} cannot be used ({_one_line(result.error or '')}); "
                            "pass another --model")
    if result.stage == "load":
        reason = _llama_error(result) or _one_line(result.error or "no reason given")
        return ModelInvalid(f"llama.cpp could not load {name} ({reason}); it is truncated, corrupt or "
                            "unsupported: pass another --model")
    return EngineCrashed(f"llama.cpp failed {doing} ({_one_line(result.error or 'no reason given')}); "
                         f"{advice}")


def ensure(model_path: Path, cache_dir: Path | None, threads: int) -> None:
    """Raise `EngineCrashed` (or `ModelInvalid`) unless this model decodes with this llama.cpp build.

    A pass is recorded under `cache_dir`; the child runs again only when the model file or the llama.cpp
    build changes (~0.4 ms when cached; 1-2.5 s when not, on 2 cores). With `cache_dir` None it always runs.
    """
    if cache_dir is not None and cached(model_path, cache_dir) is not None:
        return
    result = run(model_path, threads)
    if not result.ok:
        raise failure(model_path, result)
    if cache_dir is not None:
        try:
            record(model_path, cache_dir, result)
        except OSError:
            pass   # the check passed; an unwritable cache only means it runs again next time


# ---------------------------------------------------------------- the child


def _no_core_dumps() -> None:
    """A crash here is expected and reported by the parent: leave no core file behind."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    if sys.platform.startswith("linux"):
        # RLIMIT_CORE does not bind a core_pattern pipe (systemd-coredump, apport); non-dumpable does.
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)   # PR_SET_DUMPABLE, 0


def _fault(stage: str) -> None:
    """Fail on purpose (tests only), the way a native crash would."""
    how = os.environ.get(FAULT_ENV, "")
    if how == "segv":
        import ctypes

        ctypes.string_at(0)   # a real invalid read: SIGSEGV
    elif how == "abort":
        os.abort()            # what GGML_ASSERT does
    elif how == "fail":
        raise RuntimeError("llama_decode returned -1")
    elif how == "hang":
        time.sleep(3600)


def model_facts(llm: Any) -> dict[str, Any]:
    """What llama.cpp makes of a loaded model: size, training context, chat template, stop tokens."""
    import llama_cpp

    model, meta = llm._model, llm.metadata
    vocab = model.vocab

    def token(token_id: int) -> dict[str, Any] | None:
        return None if token_id < 0 else {"id": token_id, "text": model.token_get_text(token_id)}

    template = meta.get("tokenizer.chat_template")
    template_error = None
    if template:
        import jinja2   # what llama-cpp-python renders templates with

        try:
            jinja2.Environment().parse(template)
        except jinja2.TemplateSyntaxError as err:
            template_error = f"line {err.lineno}: {err.message}"
    # llama.cpp stops generating at any end-of-generation token, not only at eos.
    eog = [i for i in range(model.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)]
    return {"desc": model.desc(), "name": meta.get("general.name"), "architecture": meta.get("general.architecture"),
            "file_type": meta.get("general.file_type"), "parameters": model.n_params(), "bytes": model.size(),
            "n_ctx_train": model.n_ctx_train(), "n_vocab": model.n_vocab(),
            "chat_template": {"found": bool(template), "chars": len(template or ""), "error": template_error},
            "bos": token(model.token_bos()), "eos": token(model.token_eos()), "eot": token(model.token_eot()),
            "eog": [token(i) for i in eog[:16]]}


def child_main(model_path: str, threads: int, out: Any, report: dict[str, Any]) -> int:
    """Load the model like the engine does, decode a short prompt, greedily sample a few tokens."""
    log = None

    def say(**changes: Any) -> None:
        report.update(changes)
        if log is not None:
            report["warnings"] = log.recent(20, min_level="warn")
        out.write(json.dumps(report) + "\n")
        out.flush()

    say(stage="import")
    import llama_cpp
    import numpy as np

    from adapters import llama_log

    # llama.cpp's log goes to our stderr, which the parent captures: after a crash it tells why.
    log = llama_log.install(verbose=True)
    say(stage="load", system_info=llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip())
    try:
        # Loaded as the engine loads it (default model params: mmap, extra buffer types), so the same
        # kernels run; quiet_llama keeps llama-cpp-python from pointing our stderr at /dev/null.
        llm = llama_log.quiet_llama(model_path=model_path, n_ctx=N_CTX, n_threads=threads,
                                    n_threads_batch=threads, seed=0)
    except (ValueError, RuntimeError) as err:
        say(error=str(err))
        return 3
    except Exception as err:   # noqa: BLE001 - llama-cpp-python compiles the GGUF's chat template in Llama()
        import jinja2

        if not isinstance(err, jinja2.TemplateError):
            raise
        say(stage="template", error=f"{type(err).__name__}: {err}")
        return 3
    say(stage="decode", model=model_facts(llm))
    try:
        _fault("decode")
        tokens = llm.tokenize(PROMPT, add_bos=True, special=False)
        llm.eval(tokens)           # one batch: the prompt path (matrix-matrix kernels)
        sampled: list[int] = []
        for _ in range(SAMPLE):    # then single tokens: the generation path (matrix-vector kernels)
            logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
            if not np.isfinite(logits).all():
                raise RuntimeError("the model's output is not finite (NaN or infinity)")
            sampled.append(int(np.argmax(logits)))
            llm.eval([sampled[-1]])
    except RuntimeError as err:
        say(error=str(err))
        return 4
    say(ok=True, stage="done", sampled=sampled)
    llm.close()
    return 0


def main(argv: list[str]) -> int:
    """`python -m assistant.selfcheck MODEL THREADS`: one JSON report a line on stdout, the last one final."""
    _no_core_dumps()
    # Our report goes to the original stdout; anything native code prints goes to stderr with the log.
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    report: dict[str, Any] = {"ok": False, "stage": "start"}
    try:
        return child_main(argv[0], int(argv[1]), out, report)
    except Exception as err:   # noqa: BLE001 - reported to the parent, which makes it one line
        out.write(json.dumps({**report, "ok": False, "error": f"{type(err).__name__}: {err}"}) + "\n")
        out.flush()
        return 5


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
