"""llama.cpp's own log lines never reach the user's terminal, except when asked for (issue 15 §4)."""
from __future__ import annotations

import subprocess
import sys

import pytest

# A context larger than the model's training context (8192) makes llama.cpp warn
# "n_ctx_seq (16384) > n_ctx_train (8192) -- possible training context overflow": the line that
# appeared in the middle of `ember ask` output.
LOAD = """
import sys
from adapters import llama_log
log = llama_log.install(verbose={verbose})
llm = llama_log.quiet_llama(model_path={model!r}, n_ctx=16384, n_threads=1, seed=0)
for _ in llm.create_completion("Hi", max_tokens=2, stream=True):
    pass
llm.close()
print("kept:", log.last_problem())
"""


def run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("quiet_load", [True, False])
def test_llama_cpp_warnings_are_kept_not_printed(model_path, quiet_load):
    script = LOAD.format(verbose=False, model=str(model_path))
    if not quiet_load:   # llama-cpp-python's own verbose=False: its callback printed WARN lines as errors
        script = script.replace("llama_log.quiet_llama(", "__import__('llama_cpp').Llama(verbose=False, ")
    result = run(script)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "kept: llama_context: n_ctx_seq (16384) > n_ctx_train (8192)" in result.stdout


def test_verbose_shows_llama_cpp_s_log(model_path):
    result = run(LOAD.format(verbose=True, model=str(model_path)))
    assert result.returncode == 0, result.stderr
    assert "n_ctx_seq (16384) > n_ctx_train (8192)" in result.stderr
    assert "Qcur-" not in result.stderr   # debug lines (graph dumps) are never shown


def test_lines_join_pieces_and_keep_problems_apart_from_chatter():
    from adapters.llama_log import LlamaLog

    log = LlamaLog(keep=8)
    log.feed(2, "llama_model_loader: loading")
    log.feed(5, " model ...\n")            # a continuation of the line above, at its level
    log.feed(4, "error: bad tensor\n")
    for i in range(20):                    # chatter that would push the error out of a single ring
        log.feed(2, f"info line {i}\n")
    log.feed(1, "debug line\n")
    assert log.recent(1) == ["info: info line 19"]
    assert log.last_problem() == "error: bad tensor"
    assert log.recent(5, min_level="error") == ["error: error: bad tensor"]
    assert not any("debug line" in line for line in log.recent(100))


def test_ember_ask_prints_no_llama_cpp_log(ember):
    """`ember ask` on a context larger than the model was trained for: only the answer on stdout, and
    no llama.cpp line on stderr."""
    result = ember("ask", "hi", "--max-tokens", "2", "--route", "base", env={"EMBER_N_CTX": "16384"})
    assert result.returncode == 0, result.err
    for line in result.err.splitlines():
        assert not line.startswith(("llama", "ggml", "load", "print_info")) and "n_ctx" not in line, line
