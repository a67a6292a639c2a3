"""Zeroth-order training on the real model, both backends: the step restores θ exactly, DPZero's
clipping bounds one example's influence, a run is rebuilt bit for bit from its update log, and `ember adapt
--method zo` goes end to end to a control vector the chat hot-swaps."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from adapters import dataset, export, privacy, zo
from adapters.base import file_sha256
from adapters.errors import InvalidInput
from benchmarks.synthetic_user import seed_habit_user
from storage import ledger, registry, runs
from storage.db import open_db


@pytest.fixture(scope="module")
def small(tmp_path_factory, template):
    """Eight training and four held-out examples of the synthetic user: enough to take real steps fast."""
    db = open_db(tmp_path_factory.mktemp("zo-user"))
    seed_habit_user(db, 12)
    data = dataset.build(db, template)
    return dataclasses.replace(data, train=data.train[:8], heldout=data.heldout[:4])


@pytest.fixture(scope="module")
def control_vector(model_path, small):
    backend = zo.LlamaControlVector(model_path, small.train, zo.ZoConfig(), base_sha256=file_sha256(model_path))
    yield backend
    backend.close()


def test_a_step_moves_along_its_direction_only_and_restores_theta_exactly_in_between(control_vector, small):
    control_vector.reset()
    config = zo.ZoConfig(epsilon=None, perturbations=2, mu=0.3, lr=1e-3)
    before = control_vector.losses(range(4))
    loss, entries = zo.zo_step(control_vector, [0, 1, 2, 3], config, 0, None, np.random.default_rng(0))
    assert [e[0] for e in entries] == [0, 0] and len({e[1] for e in entries}) == 2
    assert np.isfinite(loss) and loss > 0
    expected = zo.replay([np.zeros_like(control_vector.vector)], entries, config)[0]
    assert np.array_equal(control_vector.vector, expected)         # θ₀ + the two updates, nothing else
    assert not np.array_equal(control_vector.losses(range(4)), before)


def test_batched_scoring_keeps_each_example_to_itself(control_vector, small, model_path):
    # One llama_decode for a whole batch, one sequence id each, the shared prefix evaluated once. An
    # example's loss must not see the other examples (DPZero clips one scalar per example): the same
    # batch with another example's tokens replaced (same length, so the same kernels run) gives the
    # other examples exactly the same losses.
    scorer = control_vector.scorer
    control_vector.vector[:] = np.random.default_rng(1).normal(0, 0.05, control_vector.vector.shape)
    try:
        scorer.set_control_vector(control_vector.vector, control_vector.n_embd)
        pairs = [(list(e.tokens), e.loss_from) for e in control_vector.examples]
        decodes = scorer.decodes
        together = scorer.losses(pairs)
        assert scorer.decodes - decodes <= 3             # the shared prefix, then the batch (≤ 512 tokens a call)
        changed = list(pairs)
        tokens, loss_from = changed[3]
        changed[3] = (tokens[:loss_from] + [tokens[loss_from]] * (len(tokens) - loss_from), loss_from)
        other = scorer.losses(changed)
        assert other[3] != together[3]
        assert np.array_equal(np.delete(other, 3), np.delete(together, 3))
        # Alone, or in the one-sequence evaluator the gate uses, only the kernels' rounding differs.
        alone = np.array([scorer.losses([pair])[0] for pair in pairs])
        assert np.allclose(alone, together, atol=0.1)
        sequential = zo.LlamaControlVector(model_path, small.train, zo.ZoConfig(),
                                           base_sha256=None, batched=False)
        try:
            sequential.vector[:] = control_vector.vector
            assert np.allclose(sequential.losses(range(len(pairs))), together, atol=0.1)
        finally:
            sequential.close()
    finally:
        control_vector.reset()


def test_a_batch_too_long_for_the_context_is_split_and_a_too_long_example_refused(control_vector):
    scorer = control_vector.scorer
    scorer.set_control_vector(None, control_vector.n_embd)
    example = control_vector.examples[0]
    copies = scorer.capacity // len(example.tokens) + 2        # more tokens than the context holds
    decodes = scorer.decodes
    losses = scorer.losses([(example.tokens, example.loss_from)] * copies)
    assert len(losses) == copies and np.ptp(losses) < 0.1     # the last, smaller group rounds differently
    assert scorer.decodes - decodes >= 2
    with pytest.raises(ValueError, match="does not fit"):
        scorer.losses([(list(example.tokens) * (scorer.capacity // len(example.tokens) + 1), example.loss_from)])


def _mappings_of(path):
    """Lines of /proc/self/maps that map `path` (llama.cpp maps a model file once per loaded model)."""
    target = str(path.resolve())
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if line.rstrip().endswith(target))


@pytest.fixture(scope="module")
def windowed(model_path, small):
    before = _mappings_of(model_path)
    backend = zo.LlamaControlVector(model_path, small.train, zo.ZoConfig(window=6), base_sha256=None,
                                    heldout=small.heldout)
    backend.mappings_added = _mappings_of(model_path) - before
    yield backend
    backend.close()


def test_a_window_frees_the_full_model_once_every_example_has_run_through_the_layers_below(windowed, small):
    # Training and held-out examples alike go through blocks 0-22 when the backend is made; the full
    # model is then closed (its file no longer mapped) before the top layers' model is loaded, so
    # the two are never resident together and a run needs what inference needs.
    assert windowed.mappings_added == 0 and windowed.llm is None
    assert windowed.top.below_decodes > 0
    # The system turn every example starts with is held once, not once per example.
    assert 0 < windowed.top.cached_tokens < sum(len(e.tokens) for e in small.train + small.heldout) - 7 * 10
    decodes = windowed.top.below_decodes
    windowed.losses(range(8))
    windowed.heldout(small.heldout)
    assert windowed.top.below_decodes == decodes                    # nothing ran below again
    unseen = dataclasses.replace(small.heldout[0], tokens=list(small.heldout[0].tokens) + [13])
    with pytest.raises(InvalidInput, match="not cached"):
        windowed.heldout([unseen])


def test_the_top_layers_on_their_cached_input_score_as_the_whole_model_does(windowed, control_vector):
    # A vector on the top 6 layers only: the small model (blocks 23-29) on the captured output of
    # blocks 0-22 gives the losses the whole model gives with the same vector, for a fraction of the work.
    windowed.reset()
    assert windowed.top.first == windowed.n_layer - 7 and windowed.tensors[0].base is windowed.vector
    windowed.tensors[0][:] = np.random.default_rng(2).normal(0, 0.3, windowed.tensors[0].shape)
    try:
        control_vector.vector[:] = windowed.vector
        whole = control_vector.losses(range(8))
        top = windowed.losses(range(8))
        assert np.allclose(top, whole, atol=2e-3), (top, whole)
        assert np.array_equal(windowed.losses(range(8)), top)
        windowed.tensors[0][:] = 0
        assert np.abs(windowed.losses(range(8)) - top).max() > 0.01      # the vector is applied
    finally:
        control_vector.reset()
        windowed.reset()


def test_the_pass_below_stops_at_the_window_and_keeps_the_states_the_whole_graph_gives(control_vector, small,
                                                                                        model_path):
    # The pass below ends each decode once l_out-<first−1> is copied: the same states bit for bit as
    # running all 30 blocks and the output head, with far fewer graph nodes computed.
    from adapters.top_layers import TopLayers

    sequences = [(e.tokens, e.loss_from) for e in small.train]
    found = {}
    for stop in (False, True):
        top = TopLayers(control_vector.llm, model_path, 6, threads=2, capacity=512, stop_below=stop)
        try:
            top.cache(sequences)
            found[stop] = ([top._rows(tuple(int(t) for t in tokens)) for tokens, _ in sequences],
                           top._observer.asked)
        finally:
            top.close()
    (whole, asked_whole), (stopped, asked_stopped) = found[False], found[True]
    assert all(np.array_equal(a, b) for a, b in zip(whole, stopped))
    assert asked_stopped < asked_whole * (top.first + 1) / control_vector.n_layer


def test_a_window_run_is_rebuilt_bit_for_bit_and_leaves_the_layers_below_at_zero(windowed, small, model_path):
    windowed.reset()
    config = zo.ZoConfig(epsilon=None, steps=3, batch_size=4, perturbations=2, mu=0.3, lr=5e-2, eval_every=0,
                         window=6)
    trained = zo.train(windowed, small, config)
    rebuilt = zo.replay([np.zeros_like(windowed.tensors[0])], trained.log, config)[0]
    assert rebuilt.tobytes() == windowed.tensors[0].tobytes() and np.any(rebuilt)
    assert not np.any(windowed.vector[:windowed.top.first * windowed.n_embd])
    with pytest.raises(InvalidInput, match="window"):
        zo.LlamaControlVector(model_path, small.train, zo.ZoConfig(window=6), base_sha256=None,
                              batched=False)
    windowed.reset()


def test_dpzero_clips_each_examples_scalars_so_one_example_moves_the_estimate_by_at_most_c(small):
    class Loud:
        """Two parameters; example 0's loss is steep along them, the others are flat."""

        def __init__(self):
            self.tensors = [np.zeros(2, dtype=np.float32)]

        def losses(self, batch):
            return np.array([1e6 * float(self.tensors[0].sum()) if i == 0 else 0.0 for i in batch])

    config = zo.ZoConfig(epsilon=8.0, clip=1.5, mu=0.1, lr=1.0)
    quiet = privacy.Plan(epsilon=8.0, delta=1e-6, sigma=0.0, clip=1.5, sample_rate=0.5, steps=1, batch_size=4)
    _, entries = zo.zo_step(Loud(), [0, 1, 2, 3], config, 0, quiet, np.random.default_rng(0))
    assert abs(entries[0][2]) == pytest.approx(1.5 / 4)               # C over the expected batch size
    noisy = dataclasses.replace(quiet, sigma=1.0)
    draws = [zo.zo_step(Loud(), [], config, s, noisy, np.random.default_rng(s))[1][0][2] for s in range(200)]
    assert np.std(draws) == pytest.approx(1.5 / 4, rel=0.25)          # an empty batch still gets σC noise


def test_a_control_vector_run_is_rebuilt_bit_for_bit_from_its_update_log(control_vector, small, tmp_path):
    control_vector.reset()
    config = zo.ZoConfig(epsilon=50.0, steps=3, batch_size=3, perturbations=2, mu=0.3, lr=1e-3, eval_every=0)
    trained = zo.train(control_vector, small, config, checkpoint=tmp_path / "run.ckpt")
    assert len(trained.log) == 6 and trained.plan is not None
    rebuilt = zo.replay([np.zeros_like(control_vector.vector)], trained.log, config)[0]
    assert rebuilt.tobytes() == control_vector.vector.tobytes()


def test_a_torch_lora_run_is_rebuilt_bit_for_bit_and_stopped_runs_resume(model_path, training_cache, small,
                                                                          tmp_path):
    config = zo.ZoConfig(backend="torch", epsilon=None, steps=4, batch_size=4, eval_every=0)
    backend = zo.TorchLora(model_path, training_cache, small.train, config)
    try:
        initial = [t.copy() for t in backend.tensors]
        whole = zo.train(backend, small, config)
        trained = [t.copy() for t in backend.tensors]
        rebuilt = zo.replay([t.copy() for t in initial], whole.log, config)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(rebuilt, trained))
        backend.reset()
        checkpoint = tmp_path / "run.ckpt"
        assert zo.train(backend, small, config, checkpoint=checkpoint, should_stop=lambda: True) is None
        backend.reset()                                               # a new process starts from the init
        resumed = zo.train(backend, small, config, checkpoint=checkpoint)
        assert resumed.log == whole.log
        assert all(a.tobytes() == b.tobytes() for a, b in zip(backend.tensors, trained))
    finally:
        backend.close()


def test_early_stopping_keeps_the_best_held_out_point_and_its_log(control_vector, small):
    control_vector.reset()
    config = zo.ZoConfig(epsilon=None, steps=6, batch_size=4, mu=0.3, lr=5e-2, eval_every=2, patience=1)
    seen = []

    def heldout():
        seen.append(control_vector.heldout(small.heldout))
        return seen[-1]

    trained = zo.train(control_vector, small, config, heldout_loss=heldout)
    best = min(range(len(seen)), key=seen.__getitem__)
    assert trained.best_step == (best + 1) * 2
    assert all(e[0] < trained.best_step for e in trained.log)
    assert control_vector.heldout(small.heldout) == pytest.approx(seen[best], abs=1e-9)


def test_ember_adapt_method_zo_registers_a_control_vector_that_the_chat_hot_swaps(tmp_path, training_cache,
                                                                                  model_path):
    home = tmp_path / "home"
    db = open_db(home)
    seed_habit_user(db, 12)
    env = dict(os.environ, EMBER_HOME=str(home), EMBER_CACHE=str(training_cache), EMBER_THREADS="2")

    def ember(*args):
        return subprocess.run([sys.executable, "-m", "assistant", *args], capture_output=True, text=True,
                              env=env, timeout=600)

    result = ember("adapt", "--method", "zo", "--steps", "4", "--json")
    assert result.returncode == 0, result.stderr
    made = json.loads(result.stdout)
    assert made["method"] == "zo" and made["backend"] == "llama" and made["epsilon"] == 8.0
    assert made["window"] == 8                                    # zo_window: the top 8 layers' vectors
    adapter = registry.get(db, made["adapter_id"])
    assert adapter["kind"] == "control_vector" and adapter["params"]["updates"] == 4
    assert ledger.entries(db)[-1]["method"] == "zo" and ledger.entries(db)[-1]["steps"] == 4
    info = export.read_adapter(adapter["path"])
    assert info.kind == "control_vector" and info.base_sha256 == file_sha256(model_path)
    assert os.stat(adapter["path"]).st_mode & 0o777 == 0o600
    # Forward passes in llama.cpp only: the run needs about what the chat needs, far from LoRA's ~2 GB.
    assert runs.get(db, made["run_id"])["peak_rss_mb"] < 800, result.stderr
    if not made["promoted"]:
        assert ember("adapters", "use", made["adapter_id"]).returncode == 0
    answer = ember("ask", "--route", "adapter", "--max-tokens", "8", "--json", "What should I bring?")
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout)["adapter"] == made["adapter_id"]


def test_ember_adapt_window_flag_chooses_the_top_layers_and_bad_values_are_one_line(tmp_path, model_path):
    home = tmp_path / "home"
    seed_habit_user(open_db(home), 12)
    env = dict(os.environ, EMBER_HOME=str(home), EMBER_THREADS="2")

    def ember(*args):
        return subprocess.run([sys.executable, "-m", "assistant", "adapt", "--dry-run", *args], capture_output=True,
                              text=True, env=env, timeout=300)

    for flags, window in ((["--method", "zo"], 8), (["--method", "zo", "--window", "3"], 3),
                          (["--method", "zo", "--window", "0"], 0)):
        result = ember(*flags, "--no-dp", "--json")              # no accountant to wait for
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["window"] == window
    for flags, says in ((["--method", "lora", "--window", "3"], "needs --method zo"),
                        (["--method", "zo", "--backend", "torch", "--window", "3"], "needs --method zo"),
                        (["--method", "zo", "--window", "29"], "has 30 layers"),
                        (["--method", "zo", "--window", "three"], "whole number")):
        result = ember(*flags)
        assert result.returncode != 0 and says in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_the_window_is_ember_s_default_for_zo_in_llama_cpp_but_not_for_a_household(tmp_path):
    from assistant import adaptation
    from assistant.config import Settings

    settings = Settings(home=tmp_path)
    assert adaptation.config_for(settings, method="zo").zo.window == 8
    assert adaptation.config_for(settings, method="zo", backend="torch").zo.window == 0
    # FedKSeed devices replay each other's seeds on the whole vector (assistant/federation/client.py).
    assert adaptation.config_for(settings, method="zo", seed_pool=(16, 1, 2)).zo.window == 0
    windowed = zo.ZoConfig(window=8)
    assert (windowed.learning_rate(0), windowed.perturbation(0)) == (zo.WINDOW_DEFAULTS["lr"],
                                                                     zo.WINDOW_DEFAULTS["mu"])
    assert zo.ZoConfig().learning_rate(0) == zo.DEFAULTS["llama"]["lr"]
    # DPZero's clip is the window's own (its scalars are ~10x smaller than C = 2), and the accountant's.
    assert windowed.dp_clip() == zo.WINDOW_DEFAULTS["clip"] < zo.ZoConfig().dp_clip() == zo.DEFAULTS["llama"]["clip"]
    assert zo.plan_for(windowed, 157).clip == zo.WINDOW_DEFAULTS["clip"]
    assert zo.ZoConfig(window=8, clip=1.5).dp_clip() == 1.5
    # The window steps on smaller batches (more steps in the same time learned more); every layer keeps 8.
    assert zo.ZoConfig(window=8).batch() == zo.WINDOW_DEFAULTS["batch"] < zo.ZoConfig().batch() == 8
    assert len(zo._batches(157, windowed, None, 0, None)) == zo.WINDOW_DEFAULTS["batch"]
