"""`ember adapt --layers adaptive` as a user runs it: the exit stride (`--exit-stride`, `adapt_exit_stride`)
places the exits and windows, a bad stride is one line before anything is touched, and a real process
killed with SIGKILL inside a window leaves nothing registered and resumes in that window, ending where an
uninterrupted run ends."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import gguf
import numpy as np
import pytest

from adapters import dataset, export, layerwise
from adapters.base import file_sha256
from assistant import adaptation
from assistant.config import Settings
from benchmarks.synthetic_user import seed_habit_user
from storage import registry, runs
from storage.db import open_db
from tests.conftest import assert_clean_error


def test_the_exit_stride_comes_from_the_flag_else_the_config_key(tmp_path, model_path):
    settings = Settings(home=tmp_path, adapt_exit_stride=10)
    assert adaptation.config_for(settings, layers="adaptive").lora.stride == 10
    assert adaptation.config_for(settings, layers="adaptive", exit_stride="8").lora.stride == 8
    assert layerwise.exits(30, 10) == [9, 19, 29]
    assert [(w.first, w.exit) for w in layerwise.windows(30, 7, 10)] == [(0, 6), (7, 13), (14, 20), (21, 27),
                                                                         (28, 29)]


@pytest.mark.parametrize("args, config, says", [
    (["--exit-stride", "0"], None, "--exit-stride must be at least 1 layer"),
    (["--exit-stride", "31"], None, "--exit-stride is 31 but SmolLM2-135M-Instruct.Q4_1.gguf has 30 layers"),
    (["--exit-stride", "two"], None, "--exit-stride must be a whole number of layers, not 'two'"),
    (["--exit-stride", "2.5"], None, "--exit-stride must be a whole number of layers, not '2.5'"),
    ([], "adapt_exit_stride = 40", "adapt_exit_stride in config.toml is 40"),
    ([], "adapt_exit_stride = 6.5", "setting 'adapt_exit_stride' has an invalid value 6.5"),
])
def test_a_stride_the_model_cannot_take_is_one_line_and_touches_nothing(ember, home, args, config, says):
    if config:
        home.mkdir(mode=0o700)
        (home / "config.toml").write_text(config + "\n")
    result = ember("adapt", "--layers", "adaptive", *args)
    assert_clean_error(result, contains=says)
    assert not (home / "ember.db").exists()


def test_a_stride_without_adaptive_layers_or_a_model_is_refused(ember, tmp_path):
    assert_clean_error(ember("adapt", "--exit-stride", "5"), contains="needs --layers adaptive")
    assert_clean_error(ember("adapt", "--layers", "adaptive", "--model", str(tmp_path / "gone.gguf")),
                       contains="gone.gguf does not exist")


@pytest.fixture(scope="module")
def user_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("adaptive-user")
    seed_habit_user(open_db(home), 12)
    return home


def test_the_planned_windows_follow_the_stride(user_home, training_cache):
    env = dict(os.environ, EMBER_HOME=str(user_home), EMBER_CACHE=str(training_cache))
    result = subprocess.run([sys.executable, "-m", "assistant", "adapt", "--layers", "adaptive", "--exit-stride", "8",
                             "--steps", "20", "--dry-run", "--json"], capture_output=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    plan = json.loads(result.stdout)["windows"]
    # The last window takes three quarters of the steps (15 of 20), the three others split the other 5
    # (the remainder to the last window).
    assert plan == [{"first": 0, "exit": 7, "steps": 1}, {"first": 8, "exit": 15, "steps": 1},
                    {"first": 16, "exit": 23, "steps": 1}, {"first": 24, "exit": 29, "steps": 17}]


# The tiny random-weight Llama 3 (benchmarks/tiny_models.py: 2 layers) with an exit after each layer: two
# windows, of 20 and 60 steps (the last window takes final_share, 0.75, of the run), checkpointed every
# 10, without DP so that a resumed run must match an uninterrupted one exactly. Its steps take
# milliseconds, so the whole test costs little more than three processes' start.
STEPS, FIRST = 80, 20


def _lora_tensors(path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(str(path)).tensors}


def test_an_adaptive_run_killed_in_a_window_registers_nothing_and_resumes_in_that_window(
        tmp_path, training_cache, tiny_gguf):
    from adapters.template import ChatTemplate

    model = tiny_gguf("llama3")
    args = ["adapt", "--model", str(model), "--layers", "adaptive", "--exit-stride", "1", "--steps", str(STEPS),
            "--no-dp", "--json"]
    home = tmp_path / "home"
    db = open_db(home)
    seed_habit_user(db, 12)
    env = dict(os.environ, EMBER_HOME=str(home), EMBER_CACHE=str(training_cache), EMBER_THREADS="2")
    proc = subprocess.Popen([sys.executable, "-m", "assistant", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        run = None
        while time.monotonic() < deadline and proc.poll() is None:
            run = runs.current(db)
            if run is not None and (run["step"] or 0) >= FIRST + 12:   # past a checkpoint inside window 1
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and run is not None
    assert registry.list_adapters(db) == []
    assert not list((home / "adapters").glob("*.gguf"))
    checkpoint = training_cache / "runs" / f"{run['id']}.ckpt"
    import torch

    saved = torch.load(checkpoint, weights_only=False)
    assert FIRST < saved["step"] < STEPS and saved["step"] % 10 == 0 and saved["window"] == 1   # mid-window 1

    resumed = subprocess.run([sys.executable, "-m", "assistant", *args], env=env, capture_output=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert f"resuming interrupted run {run['id']}".encode() in resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["run_id"] == run["id"]
    assert report["windows"] == [{"first": 0, "exit": 0, "steps": FIRST},
                                 {"first": 1, "exit": 1, "steps": STEPS - FIRST}]
    adapter = registry.get(db, report["adapter_id"])
    assert [w["exit"] for w in adapter["params"]["windows"]] == [0, 1]
    assert runs.get(db, run["id"])["status"] == "done" and not checkpoint.exists()

    # The same run uninterrupted, in this process, on the same examples.
    config = adaptation.config_for(Settings(home=home, model=model, cache=training_cache, n_threads=2),
                                   layers="adaptive", no_dp=True, steps=STEPS, exit_stride="1").lora
    data = dataset.build(db, ChatTemplate.from_gguf(str(model)))
    whole = layerwise.train(model, training_cache, data, config)
    assert report["eval"]["train_losses"] == pytest.approx([round(v, 4) for v in whole.losses], abs=2e-4)
    reference = export.write_lora_gguf(tmp_path / "whole.gguf", whole.weights, alpha=config.alpha,
                                       n_head=whole.n_head, n_head_kv=whole.n_head_kv,
                                       base_sha256=file_sha256(model), base_name=model.name)
    got, want = _lora_tensors(adapter["path"]), _lora_tensors(reference)
    assert set(got) == set(want) and {int(n.split(".")[1]) for n in got} == {0, 1}
    for name, tensor in want.items():
        np.testing.assert_allclose(got[name], tensor, atol=1e-5)
