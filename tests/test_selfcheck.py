"""The engine's self-check: a native crash in llama.cpp becomes one line, never a core dump, and the
AMX path that crashes on recent Xeons cannot be taken in our build.

Crashes are made on purpose with EMBER_SELFCHECK_FAULT (the child calls os.abort() or reads address 0
right before its decode), or with GGUF files patched so that llama.cpp refuses or aborts on them.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from assistant import selfcheck
from assistant.errors import EngineCrashed, ModelInvalid
from tests.conftest import assert_clean_error

THREADS = 1


@pytest.fixture(autouse=True)
def own_cache(monkeypatch):
    """These tests look at the self-check's cache in the data dir: no session-wide EMBER_CACHE."""
    monkeypatch.delenv("EMBER_CACHE", raising=False)


def patched(src: Path, dst: Path, old: bytes, new: bytes) -> Path:
    """A copy of `src` with one same-length byte string of its header replaced."""
    assert len(old) == len(new)
    head = src.read_bytes()[: 16 << 20]
    at = head.find(old)
    assert at > 0, old
    shutil.copy(src, dst)
    with dst.open("r+b") as f:
        f.seek(at)
        f.write(new)
    return dst


def with_tensor_type(src: Path, dst: Path, name: str, ggml_type: int) -> Path:
    """A copy of `src` where tensor `name` claims another ggml type (its data left as it is)."""
    head = src.read_bytes()[: 16 << 20]
    key = struct.pack("<Q", len(name)) + name.encode()
    at = head.find(key) + len(key)
    n_dims = struct.unpack_from("<I", head, at)[0]
    type_at = at + 4 + 8 * n_dims
    start = at - len(key)   # the name is part of the bytes replaced: the shape and type alone are not unique
    return patched(src, dst, head[start:type_at + 4], head[start:type_at] + struct.pack("<I", ggml_type))


def with_uint32(src: Path, dst: Path, key: str, value: int) -> Path:
    """A copy of `src` whose uint32 metadata `key` holds `value`."""
    head = src.read_bytes()[: 16 << 20]
    field = struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", 4)   # 4: GGUF uint32
    at = head.find(field) + len(field)
    return patched(src, dst, head[at - len(field):at + 4], field + struct.pack("<I", value))


@pytest.fixture
def model_copy(tmp_path, model_path) -> Path:
    """The bundled model under another path, so that the test can change it."""
    return Path(shutil.copy(model_path, tmp_path / "model.gguf"))


@pytest.fixture
def fault(monkeypatch):
    """Make the self-check's child crash on purpose (the variable is read by the child only)."""
    return lambda how: monkeypatch.setenv(selfcheck.FAULT_ENV, how)


def no_temp_files(directory: Path) -> bool:
    return not directory.exists() or not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_a_pass_is_cached_per_model_file_and_rerun_when_it_changes(tmp_path, model_copy, fault):
    cache = tmp_path / "home" / "cache"
    selfcheck.ensure(model_copy, cache, THREADS)
    assert (cache / selfcheck.CACHE_NAME).stat().st_mode & 0o777 == 0o600
    assert cache.stat().st_mode & 0o777 == 0o700 and cache.parent.stat().st_mode & 0o777 == 0o700
    assert no_temp_files(cache)
    # Cached: no child runs, so even a child that would crash is not reached.
    fault("segv")
    selfcheck.ensure(model_copy, cache, THREADS)
    # The model file changes: the check runs again (and now meets the crash).
    os.utime(model_copy, ns=(1_000_000_000, 1_000_000_000))
    with pytest.raises(EngineCrashed):
        selfcheck.ensure(model_copy, cache, THREADS)


def test_the_cache_key_follows_the_llama_cpp_build(model_path):
    key = selfcheck.fingerprint(model_path)
    assert key["llama_cpp"] and key["model"]["bytes"] == model_path.stat().st_size
    names = {Path(lib["path"]).name for lib in key["libs"]}
    assert any(name.startswith("libllama") for name in names), names
    assert any(name.startswith("libggml-cpu") for name in names), names   # where the CPU kernels live


@pytest.mark.parametrize("how, signal_name", [("segv", "SIGSEGV"), ("abort", "SIGABRT")])
def test_a_native_crash_is_one_line_naming_the_signal_and_what_to_do(tmp_path, model_path, fault, how,
                                                                    signal_name):
    cache = tmp_path / "cache"
    fault(how)
    with pytest.raises(EngineCrashed) as raised:
        selfcheck.ensure(model_path, cache, THREADS)
    message = str(raised.value)
    assert "\n" not in message
    assert f"crashed ({signal_name}) decoding with {model_path.name}" in message
    assert "make clean setup" in message and "ember doctor" in message
    assert not (cache / selfcheck.CACHE_NAME).exists()   # a crash is never recorded as a pass


def test_a_decode_that_fails_without_crashing_is_one_line(model_path, fault):
    fault("fail")
    with pytest.raises(EngineCrashed, match=r"^llama.cpp failed decoding with .*llama_decode returned -1"):
        selfcheck.ensure(model_path, None, THREADS)


def test_a_hung_child_is_stopped_and_reported(model_path, fault):
    fault("hang")
    result = selfcheck.run(model_path, THREADS, timeout=10)   # loading takes ~0.3 s; then it hangs
    assert not result.ok and result.returncode is None and result.stage == "decode"
    assert "hung decoding with" in str(selfcheck.failure(model_path, result))


def test_a_gguf_that_aborts_llama_cpp_is_one_line(tmp_path, model_path):
    # output_norm.weight relabelled F32 -> F16: llama.cpp loads it, then ggml aborts in the first decode
    # ("binary_op: unsupported types"), a real native crash caused by a file.
    bad = with_tensor_type(model_path, tmp_path / "aborts.gguf", "output_norm.weight", 1)
    with pytest.raises(EngineCrashed) as raised:
        selfcheck.ensure(bad, tmp_path / "cache", THREADS)
    message = str(raised.value)
    assert "\n" not in message and "crashed (SIGABRT) decoding with aborts.gguf" in message
    assert "unsupported types" in message   # ggml's own reason, from the child's captured stderr


def test_a_gguf_llama_cpp_refuses_is_one_line_with_its_reason(tmp_path, model_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(model_path.read_bytes()[:5_000_000])
    with pytest.raises(ModelInvalid, match=r"could not load truncated.gguf \(tensor .* not within the file"):
        selfcheck.ensure(truncated, tmp_path / "cache", THREADS)
    no_heads = with_uint32(model_path, tmp_path / "heads.gguf", "llama.attention.head_count", 0)
    with pytest.raises(ModelInvalid, match=r"could not load heads.gguf \(check_tensor_dims: tensor "
                                           r"'blk.0.attn_q.weight' has wrong shape"):
        selfcheck.ensure(no_heads, tmp_path / "cache", THREADS)


def test_a_chat_template_with_a_syntax_error_is_one_line(tmp_path, model_path):
    bad = patched(model_path, tmp_path / "template.gguf", b"{% endfor %}", b"{% endfxr %}")
    with pytest.raises(ModelInvalid) as raised:
        selfcheck.ensure(bad, tmp_path / "cache", THREADS)
    assert "\n" not in str(raised.value)
    assert str(raised.value).startswith("the chat template in template.gguf cannot be used (TemplateSyntaxError")


def test_the_child_leaves_no_core_file(tmp_path, model_path):
    """With core dumps allowed and the kernel writing `core` files to the working directory, the
    crashed child still leaves none (it turns them off for itself)."""
    script = (f"from assistant import selfcheck; r = selfcheck.run({str(model_path)!r}, 1); "
              "print(r.signal)")
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, **{selfcheck.FAULT_ENV: "segv"}),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (hard, hard)))
    assert result.stdout.strip() == "SIGSEGV", result.stderr
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("core")]


def _messages(home: Path) -> list[tuple]:
    with sqlite3.connect(f"file:{home / 'ember.db'}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT role, content, status FROM messages ORDER BY id").fetchall()


@pytest.mark.parametrize("how, signal_name", [("segv", "SIGSEGV"), ("abort", "SIGABRT")])
def test_ember_ask_reports_an_engine_crash_as_one_line_and_keeps_the_question(home, tmp_path, how,
                                                                              signal_name):
    """The reproduction of issue 15 §1 (`ember ask` exited 139), with the crash made on purpose."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    result = subprocess.run(
        [sys.executable, "-m", "assistant", "ask", "What is the capital of France?", "--max-tokens", "4"],
        cwd=tmp_path, capture_output=True, timeout=180,
        env=dict(os.environ, EMBER_HOME=str(home), **{selfcheck.FAULT_ENV: how}),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (hard, hard)))
    result.out, result.err = result.stdout.decode(), result.stderr.decode()
    assert_clean_error(result, contains=f"crashed ({signal_name})")
    assert result.returncode > 0   # an exit status, not a death by signal (139 = SIGSEGV)
    assert "core dumped" not in result.err + result.out
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("core")]
    cache = home / "cache"
    assert no_temp_files(cache) and not (cache / selfcheck.CACHE_NAME).exists()
    # Log first: the question was committed before the engine was checked; no half reply was left.
    assert _messages(home) == [("user", "What is the capital of France?", "complete")]


def test_ember_ask_works_after_a_pass_and_the_pass_is_recorded(ember, home):
    result = ember("ask", "hi", "--max-tokens", "2", "--route", "base")
    assert result.returncode == 0, result.err
    passes = json.loads((home / "cache" / selfcheck.CACHE_NAME).read_text())["passes"]
    assert passes and passes[0]["result"]["ok"] is True


def test_our_build_cannot_take_the_amx_path():
    """llama.cpp's AMX kernels segfault on the first decode (issue 15 §1): they must not be compiled in.

    The Makefile builds llama.cpp natively but with -mno-amx-*, so __AMX_INT8__ is never defined and
    ggml-cpu leaves its AMX buffer type out; every other native feature stays.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        pytest.skip(f"AMX is an x86 feature; this is {platform.machine()}")
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    features = [part.split("=")[0].strip() for part in info.replace("CPU :", "|").split("|")
                if part.strip().endswith("= 1")]
    cpu_has_amx = "amx_int8" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    print(f"llama.cpp build features: {' '.join(features)}; this CPU has AMX: {cpu_has_amx}")
    assert "AMX_INT8 = 1" not in info, (
        "llama.cpp was built with AMX, which crashes on this CPU class: rebuild with `make clean setup`")
    assert not any(f.startswith("AMX") for f in features)
