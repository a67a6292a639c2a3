"""Adaptive layer tuning with early exits (adapters/layerwise.py) on the real model: the window moves
shallow → deep and trains only its own layers, earlier windows stay applied and frozen, a stopped run
resumes in its window where an uninterrupted one would be, the exported GGUF loads in llama.cpp, and
`ember adapt --layers adaptive` goes through DP, the ledger, the gate and the registry."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from adapters import dataset, export, gate, layerwise
from adapters.base import file_sha256
from benchmarks.synthetic_user import seed_habit_user
from storage import ledger, registry, runs
from assistant.config import Settings
from storage.db import open_db

# Two windows of 15 layers (exits at 14 and 29), two steps each: the whole schedule in a few seconds.
SMALL = layerwise.AdaptiveConfig(epsilon=None, threads=2, steps=4, batch_size=8, stride=15, checkpoint_every=100,
                                 final_share=0.5)


def test_exits_sit_every_stride_layers_and_always_at_the_last():
    assert layerwise.exits(30, 6) == [5, 11, 17, 23, 29]
    assert layerwise.exits(30, 8) == [7, 15, 23, 29]
    plan = layerwise.windows(30, 8, 10)
    assert [(w.first, w.exit, w.steps) for w in plan] == [(0, 7, 2), (8, 15, 2), (16, 23, 2), (24, 29, 4)]
    assert [layerwise.window_at(plan, s) for s in (0, 1, 2, 5, 6, 9, 10)] == [0, 0, 1, 2, 3, 3, 4]


def test_the_last_window_takes_its_share_of_the_steps_and_the_others_split_the_rest():
    from adapters.errors import InvalidInput

    plan = layerwise.windows(30, 6, 42, final_share=0.5)
    assert [w.steps for w in plan] == [5, 5, 5, 5, 22] and plan[-1].exit == 29
    assert [w.steps for w in layerwise.windows(30, 6, 42)] == [8, 8, 8, 8, 10]       # upstream: equal blocks
    assert [w.steps for w in layerwise.windows(30, 6, 3, final_share=0.5)] == [0, 0, 0, 0, 3]
    assert [w.steps for w in layerwise.windows(30, 30, 7, final_share=0.5)] == [7]   # one window takes all
    assert layerwise.AdaptiveConfig().final_share == 0.75 and layerwise.AdaptiveConfig().shallow_lr_scale == 0.1
    for share in (0, 1.5, -0.2):
        with pytest.raises(InvalidInput, match="share of the steps"):
            layerwise.windows(30, 6, 42, final_share=share)


def test_a_stride_the_model_cannot_take_is_refused():
    from adapters.errors import InvalidInput

    with pytest.raises(InvalidInput, match="stride"):
        layerwise.exits(30, 31)


def test_voting_takes_the_most_confident_exit_per_token_and_renormalises():
    import torch

    p = torch.tensor([[[0.7, 0.2, 0.1]], [[0.1, 0.1, 0.8]]])          # two exits, one token
    voted = layerwise.vote(p.log(), "max").exp()
    assert torch.allclose(voted, torch.tensor([[0.7, 0.2, 0.8]]) / 1.7)
    assert torch.allclose(layerwise.vote(p.log(), "mean").exp(), p.mean(0))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, template):
    db = open_db(tmp_path_factory.mktemp("layerwise"))
    seed_habit_user(db, 24)
    data = dataset.build(db, template, keep_facts=True)
    return dataclasses.replace(data, train=data.train[:16])


@pytest.fixture(scope="module")
def whole(model_path, training_cache, small_data):
    """An uninterrupted run, with every LoRA's weights after each step."""
    snapshots, started = {}, []
    trained = layerwise.train(model_path, training_cache, small_data, SMALL,
                              on_weights=(1, lambda step, w: snapshots.__setitem__(step, w)),
                              on_window=lambda i, w: started.append((i, w.first, w.exit)))
    return trained, snapshots, started


def _layer(module):
    return int(module.split(".")[2])


def test_each_window_trains_only_its_layers_and_earlier_windows_stay_frozen(whole):
    trained, snapshots, started = whole
    assert started == [(0, 0, 14), (1, 15, 29)]
    first_window = {m: b for m, (_, b) in snapshots[2].items()}
    assert first_window and all(_layer(m) <= 14 for m in first_window)       # nothing above it changed
    for m, (_, b) in snapshots[4].items():
        if _layer(m) <= 14:
            assert b.equal(first_window[m])                                    # frozen once its window ended
    assert any(_layer(m) >= 15 for m in snapshots[4])
    assert set(trained.weights) == set(snapshots[4]) and trained.gains and 14 in trained.gains
    assert any(abs(g - 1.0) > 1e-4 for g in trained.gains[14])                # the exit's gain learned


def test_the_shallow_windows_lora_trains_at_its_scaled_lr(model_path, training_cache, small_data, whole):
    # At SMALL's 0.1 the first window's B moved about a tenth as far as at the full lr (Adam's steps are
    # about lr each), while its exit's gain learned at the full lr in both.
    full = layerwise.train(model_path, training_cache, small_data, dataclasses.replace(SMALL, shallow_lr_scale=1.0))
    scaled = whole[0]
    gain_moved = [max(abs(g - 1.0) for g in run.gains[14]) for run in (scaled, full)]
    assert gain_moved[0] > 0.5 * gain_moved[1] > 0
    first = [m for m in scaled.weights if _layer(m) <= 14]
    moved = [sum(float(run.weights[m][1].norm()) for m in first) for run in (scaled, full)]
    assert 0.05 < moved[0] / moved[1] < 0.2


def test_a_run_stopped_in_a_window_resumes_there_and_ends_where_an_uninterrupted_one_does(
        model_path, training_cache, small_data, whole, tmp_path):
    checkpoint = tmp_path / "run.pt"
    steps = []
    stopped = layerwise.train(model_path, training_cache, small_data, SMALL, checkpoint=checkpoint,
                              on_step=lambda p: steps.append(p.step), should_stop=lambda: len(steps) == 2)
    # steps.append runs after should_stop: the run stops after its 3rd step, inside the second window.
    assert stopped is None and checkpoint.is_file() and steps == [1, 2, 3]
    windows = []
    resumed = layerwise.train(model_path, training_cache, small_data, SMALL, checkpoint=checkpoint,
                              on_window=lambda i, w: windows.append(i))
    assert windows == [1]
    trained = whole[0]
    assert resumed.losses == pytest.approx(trained.losses, abs=1e-5)
    for module, (a, b) in trained.weights.items():
        assert resumed.weights[module][0].allclose(a, atol=1e-6) and resumed.weights[module][1].allclose(b, atol=1e-6)


def test_every_windows_lora_is_exported_and_llama_cpp_applies_it(model_path, small_data, whole, tmp_path):
    trained = whole[0]
    path = export.write_lora_gguf(tmp_path / "adaptive.gguf", trained.weights, alpha=SMALL.alpha,
                                  n_head=trained.n_head, n_head_kv=trained.n_head_kv,
                                  base_sha256=file_sha256(model_path), base_name=model_path.name,
                                  extra={"exits": layerwise.gains_document(trained, SMALL)})
    info = export.read_adapter(path)
    assert min(info.layers) <= 14 < 15 <= max(info.layers)
    evaluator = gate.Evaluator(model_path, n_ctx=512, threads=2, base_sha256=file_sha256(model_path))
    try:
        base = evaluator.loss(small_data.train[:4])
        evaluator.use(path)
        adapted = evaluator.loss(small_data.train[:4])
    finally:
        evaluator.close()
    assert adapted < base


def test_ember_adapt_layers_adaptive_runs_with_dp_through_the_ledger_gate_and_registry(tmp_path, training_cache):
    home = tmp_path / "home"
    db = open_db(home)
    seed_habit_user(db, 12)
    env = dict(os.environ, EMBER_HOME=str(home), EMBER_CACHE=str(training_cache), EMBER_THREADS="2")
    result = subprocess.run([sys.executable, "-m", "assistant", "adapt", "--layers", "adaptive", "--steps", "5",
                             "--json"], capture_output=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    assert report["layers"] == "adaptive" and report["dp"] and report["epsilon"] == 8.0
    run = runs.get(db, report["run_id"])
    assert run["method"] == "lora-adaptive" and run["status"] == "done"
    assert ledger.spent(db)["epsilon"] == pytest.approx(8.0)
    adapter = registry.get(db, report["adapter_id"])
    assert adapter["params"]["layers"] == "adaptive" and len(adapter["params"]["windows"]) == 5
    assert export.read_adapter(adapter["path"]).kind == "lora"
    bad = subprocess.run([sys.executable, "-m", "assistant", "adapt", "--method", "zo", "--layers", "adaptive"],
                         capture_output=True, env=env, timeout=120)
    assert bad.returncode != 0 and b"needs --method lora" in bad.stderr and b"Traceback" not in bad.stderr


def test_the_daemon_runs_adaptive_layers_when_they_learned_most_per_minute_here(tmp_path):
    from assistant import adaptation
    from assistant.daemon import choose_method

    db = open_db(tmp_path / "home")
    for run_id, method, gain in (("top", "lora", 0.2), ("adaptive", "lora-adaptive", 0.6), ("zo", "zo-llama", 0.1)):
        registry.register(db, {"id": run_id, "path": f"/nonexistent/{run_id}.gguf", "kind": "lora", "method": "lora",
                               "base_sha256": "abc", "base_name": "m.gguf", "status": "inactive",
                               "eval": {"base_loss": 3.7, "heldout_loss": 3.7 - gain, "train_seconds": 60}},
                          [], activate=False)
        runs.start(db, run_id, method=method, steps=1, fingerprint="x")
        runs.update(db, run_id, status="done", adapter_id=run_id, peak_rss_mb=300.0)
    method, reason = choose_method(db, 4000, [])
    assert method == "lora-adaptive" and "lora-adaptive learns most per minute" in reason
    assert adaptation.flags_for(method) == {"method": "lora", "layers": "adaptive"}
    config = adaptation.config_for(Settings(home=tmp_path / "home"), **adaptation.flags_for(method))
    assert config.label == "lora-adaptive" and isinstance(config.lora, layerwise.AdaptiveConfig)
