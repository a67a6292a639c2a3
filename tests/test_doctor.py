"""`ember doctor`: a report for a bug report, gathered without changing anything (issue 15 §1)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from assistant import selfcheck
from tests.conftest import assert_clean_error
from tests.test_selfcheck import patched


@pytest.fixture(autouse=True)
def own_cache(monkeypatch):
    """These tests look at the self-check's cache in the data dir: no session-wide EMBER_CACHE."""
    monkeypatch.delenv("EMBER_CACHE", raising=False)


def doctor_json(ember, *args, env=None) -> dict:
    result = ember("doctor", "--json", *args, env=env)
    assert result.returncode == 0, result.err
    return json.loads(result.out)


def test_doctor_reports_build_cpu_self_check_model_embedder_data_and_versions(ember, home, model_path):
    report = doctor_json(ember)
    build, cpu, check, model = report["llama_cpp"], report["cpu"], report["self_check"], report["model"]
    assert build["version"] == report["packages"]["llama_cpp_python"]
    assert build["system_info"].startswith("CPU :") and build["amx"] is False
    if platform.machine() in ("x86_64", "AMD64"):
        assert "AVX2" in build["features"] and "avx2" in cpu["features"]
    assert check["ok"] is True and check["sampled"] and check["cached"] is False
    assert model["path"] == str(model_path) and model["architecture"] == "llama"
    assert model["quantization"] == "Q4_1" and model["parameters"] > 100_000_000
    assert model["n_ctx_train"] == 8192 and model["chat_template"] == {"found": True, "chars": 368, "error": None}
    assert model["eos"] == {"id": 2, "text": "<|im_end|>"}
    assert {"id": 2, "text": "<|im_end|>"} in model["eog"]
    embedder = report["embedder"]
    assert embedder["package_version"] and embedder["archive"].endswith("model.zip") and embedder["error"] is None
    assert embedder["libraries"]["onnxruntime"]
    assert report["data"] == {**report["data"], "path": str(home), "exists": False}
    assert report["resources"]["disk"]["free"] > 0 and report["resources"]["memory"]["total"] > 0
    assert report["ember"]["python"] == platform.python_version()


def test_doctor_text_report_is_readable(ember):
    result = ember("doctor")
    assert result.returncode == 0, result.err
    labels = [line.split()[0] for line in result.out.splitlines() if line and not line.startswith(" ")]
    for label in ("ember", "llama.cpp", "cpu", "self-check", "model", "template", "embedder", "data",
                  "disk", "memory", "packages"):
        assert label in labels, result.out
    assert "AMX off" in result.out and "self-check  passed" in result.out
    assert result.err == ""


def test_doctor_creates_no_data_dir_and_imports_no_torch(home):
    # -X importtime lists every module the process imports, on stderr.
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "assistant", "doctor", "--json"],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, EMBER_HOME=str(home)))
    assert run.returncode == 0, run.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "llama_cpp" in imported or "json" in imported   # the listing is there
    assert "torch" not in imported and "sentence_transformers" not in imported
    assert not home.exists()


def test_doctor_changes_nothing_in_an_existing_data_dir(ember, home, db):
    db["messages"].count   # the database exists, with its -wal and -shm while open
    db.close()
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in home.rglob("*") if p.is_file()}
    report = doctor_json(ember)
    after = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in home.rglob("*") if p.is_file()}
    # Only the self-check's cache is written (a pass, so the next `ember ask` need not check again).
    assert {p: v for p, v in after.items() if p.parent.name != "cache"} == before
    assert [p.name for p in after if p.parent.name == "cache"] == [selfcheck.CACHE_NAME]
    assert report["data"]["dir"]["mode"] == "0700" and report["data"]["files"]["ember.db"]["mode"] == "0600"
    assert report["data"]["not_private"] == []


def test_doctor_flags_files_others_can_read(ember, home, db):
    db.close()
    home.chmod(0o755)
    (home / "ember.db").chmod(0o644)
    data = doctor_json(ember)["data"]
    assert data["dir"] == {**data["dir"], "mode": "0755", "private": False}
    assert "ember.db (0644)" in data["not_private"]
    text = ember("doctor").out
    assert "NOT PRIVATE" in text and "readable by others: ember.db (0644)" in text


def test_doctor_uses_a_cached_pass_but_self_check_always_runs_again(ember, home):
    home.mkdir(mode=0o700)
    first = ember("doctor", "--self-check")
    assert first.returncode == 0, first.err
    assert first.out.startswith("self-check passed: llama.cpp decoded 2 tokens with ")
    assert "embedder exported at " in first.out or "embedder found at " in first.out
    # Set-up's check leaves an embedder every data directory of this installation finds.
    assert doctor_json(ember)["embedder"]["onnx_export"]
    crash = {selfcheck.FAULT_ENV: "segv"}
    report = doctor_json(ember, env=crash)   # the cached pass: no child, so no crash
    assert report["self_check"]["ok"] is True and report["self_check"]["cached"] is True
    again = ember("doctor", "--self-check", env=crash)   # forced: the child runs, and crashes
    assert_clean_error(again, contains="llama.cpp crashed (SIGSEGV) decoding with")
    assert "core dumped" not in again.err


def test_doctor_self_check_failure_is_one_line_and_records_nothing(ember, home):
    home.mkdir(mode=0o700)
    result = ember("doctor", "--self-check", env={selfcheck.FAULT_ENV: "abort"})
    assert_clean_error(result, contains="crashed (SIGABRT)")
    assert "make clean setup" in result.err
    assert not (home / "cache" / selfcheck.CACHE_NAME).exists()


def test_doctor_reports_a_failed_self_check_and_exits_non_zero(ember):
    result = ember("doctor", "--json", env={selfcheck.FAULT_ENV: "segv"})
    assert result.returncode == 1
    check = json.loads(result.out)["self_check"]
    assert check["ok"] is False and check["signal"] == "SIGSEGV" and check["stage"] == "decode"
    assert check["message"].startswith("llama.cpp crashed (SIGSEGV) decoding with")


def test_doctor_on_a_model_without_chat_template_says_chatml_is_used(ember, tmp_path, model_path):
    bare = patched(model_path, tmp_path / "bare.gguf", b"tokenizer.chat_template", b"tokenizer.chat_templatX")
    report = doctor_json(ember, "--model", str(bare))
    assert report["model"]["chat_template"]["found"] is False
    assert "ChatML" in report["model"]["chat_template"]["used"]
    assert "NONE in the GGUF: falling back to ChatML" in ember("doctor", "--model", str(bare)).out


def test_doctor_on_a_broken_model_still_reports(ember, tmp_path, model_path):
    bad = patched(model_path, tmp_path / "template.gguf", b"{% endfor %}", b"{% endfxr %}")
    result = ember("doctor", "--json", "--model", str(bad))
    assert result.returncode == 1
    report = json.loads(result.out)
    assert report["self_check"]["message"].startswith("the chat template in template.gguf cannot be used")
    # llama.cpp could not describe the model, so the GGUF header does.
    assert report["model"]["source"] == "GGUF header"
    assert report["model"]["chat_template"]["error"].startswith("line 5: Encountered unknown tag 'endfxr'")
    assert report["model"]["eos"] == {"id": 2, "text": "<|im_end|>"}


@pytest.mark.parametrize("args", [("--model", "/nonexistent/model.gguf"), ("--self-check", "--model", "/nonexistent.gguf")])
def test_doctor_with_a_missing_model(ember, args):
    result = ember("doctor", *args)
    if "--self-check" in args:
        assert_clean_error(result, contains="does not exist")
    else:   # the report is still printed; the exit says that Ember cannot work as it is
        assert result.returncode == 1, result.err
        assert "does not exist" in result.out and "self-check  skipped" in result.out
