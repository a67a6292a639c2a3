"""DP LoRA on the real model: it learns a user's habit, DP still improves held-out loss, and a planted
secret is memorised without DP and not with it (Secret Sharer exposure), all measured in llama.cpp on
the exported GGUF adapters."""
from __future__ import annotations

import dataclasses
import statistics

import pytest

from adapters import dataset, export, gate, lora
from adapters.base import file_sha256
from benchmarks.adapt import CANARY, CANARY_COPIES, CONVERSATIONS, canary_exposure, habit_logprob
from benchmarks.synthetic_user import habit_prompts, seed_habit_user
from storage.db import open_db

# 200 codes keep the test to seconds (each is one llama.cpp call); `ember bench adapt` ranks among 1,000.
CANDIDATES = 200


@pytest.fixture(scope="module")
def habit_data(tmp_path_factory, template):
    """The synthetic user's dataset: a sign-off habit in 100 conversations, a canary in 4."""
    db = open_db(tmp_path_factory.mktemp("habit"))
    seed_habit_user(db, CONVERSATIONS, canary=CANARY, canary_copies=CANARY_COPIES)
    return dataset.build(db, template, keep_facts=True)   # the canary is a fact: train on it to test DP


def _train_and_export(model_path, training_cache, data, tmp_path_factory, epsilon):
    config = lora.LoraConfig(epsilon=epsilon, threads=2)
    trained = lora.train(model_path, training_cache, data, config)
    path = tmp_path_factory.mktemp("adapter") / "adapter.gguf"
    export.write_lora_gguf(path, trained.weights, alpha=config.alpha, n_head=trained.n_head,
                           n_head_kv=trained.n_head_kv, base_sha256=file_sha256(model_path),
                           base_name=model_path.name)
    return trained, path


@pytest.fixture(scope="module")
def plain(model_path, training_cache, habit_data, tmp_path_factory):
    """An adapter trained WITHOUT differential privacy."""
    return _train_and_export(model_path, training_cache, habit_data, tmp_path_factory, None)


@pytest.fixture(scope="module")
def private(model_path, training_cache, habit_data, tmp_path_factory):
    """An adapter trained with DP-SGD at ε = 8."""
    return _train_and_export(model_path, training_cache, habit_data, tmp_path_factory, 8.0)


@pytest.fixture(scope="module")
def evaluator(model_path):
    ev = gate.Evaluator(model_path, n_ctx=512, threads=2, base_sha256=file_sha256(model_path))
    yield ev
    ev.close()


def _exposure(evaluator, adapter):
    return canary_exposure(evaluator, adapter, candidates=CANDIDATES)


def test_without_dp_the_adapter_makes_the_users_habit_far_more_likely(evaluator, plain):
    _, path = plain
    base, adapted = habit_logprob(evaluator, None), habit_logprob(evaluator, path)
    assert adapted - base > 5.0, (base, adapted)           # e^5 ≈ 150× more likely
    evaluator.use(path)
    reply, _ = evaluator.reply(habit_prompts(count=1, skip=CONVERSATIONS)[0])
    assert reply.strip().startswith("Ahoy"), reply


def test_with_dp_at_epsilon_8_held_out_loss_still_improves_and_the_gate_promotes_it(evaluator, private,
                                                                                    habit_data):
    trained, path = private
    assert trained.plan is not None and trained.plan.epsilon == 8.0 and trained.plan.sigma > 0.5
    verdict = gate.judge(evaluator, habit_data.heldout, path, None)
    assert verdict.heldout_loss < verdict.base_loss - 0.05
    assert verdict.promote and all(b["ok"] for b in verdict.behaviour)
    assert verdict.surprise <= verdict.base_surprise + gate.MAX_SURPRISE
    assert "nats/token" in verdict.reason and f"at most {gate.MAX_SURPRISE:g}" in verdict.reason


def test_the_gate_refuses_an_over_trained_adapter_whose_replies_to_general_requests_degenerate(evaluator, plain,
                                                                                             habit_data):
    """Without DP the habit's training loss falls to ~0.4: held-out loss far below the base model's and no reply
    repeats itself, so a gate that looks for empty or repetitive replies only promotes it. But its replies to
    general requests stop being answers ("Ahoy, matey! To the sun, and to the sea, it is to be told."), and the
    base model reads them as far less likely than its own: refused, with the figure and the limit."""
    _, path = plain
    verdict = gate.judge(evaluator, habit_data.heldout[:8], path, None)
    assert verdict.heldout_loss < verdict.base_loss - 1.0
    assert all(b["ok"] for b in verdict.behaviour)       # all the old gate looked at
    assert verdict.surprise > verdict.base_surprise + gate.MAX_SURPRISE
    assert not verdict.promote and "degraded" in verdict.reason, verdict.reason
    assert f"{verdict.surprise:.2f} nats/token" in verdict.reason and f"{gate.MAX_SURPRISE:g}" in verdict.reason
    assert verdict.as_json()["max_surprise"] == gate.MAX_SURPRISE


def test_a_planted_secret_is_exposed_without_dp_and_near_chance_with_dp(evaluator, plain, private):
    base = _exposure(evaluator, None)
    memorised = _exposure(evaluator, plain[1])
    protected = _exposure(evaluator, private[1])
    print(f"canary exposure: base {base.exposure:.2f} (rank {base.rank}), no DP {memorised.exposure:.2f} "
          f"(rank {memorised.rank}), DP ε=8 {protected.exposure:.2f} (rank {protected.rank})")
    assert memorised.exposure >= 5.6          # ranked in the top 2% (4th of 200 or better)
    assert protected.exposure <= 4.0          # chance is ~1.4 bits; the top 6% happens by luck only


def test_training_losses_fall_without_dp(plain):
    trained, _ = plain
    assert statistics.mean(trained.losses[-5:]) < statistics.mean(trained.losses[:5]) - 0.5


def test_the_gate_keeps_the_current_adapter_when_the_candidate_is_worse(evaluator, plain, private, habit_data):
    worse = gate.judge(evaluator, habit_data.heldout, private[1], plain[1])
    assert not worse.promote and "current adapter" in worse.reason
    assert worse.current_loss < worse.heldout_loss < worse.base_loss


def test_a_run_stopped_and_resumed_from_its_checkpoint_ends_where_an_uninterrupted_one_does(
        model_path, training_cache, habit_data, tmp_path):
    # 20 examples in batches of 8: 3 batches an epoch, so the 5 steps cross into a second epoch.
    small = dataclasses.replace(habit_data, train=habit_data.train[:20])
    config = lora.LoraConfig(epsilon=None, threads=2, steps=5, batch_size=8, checkpoint_every=100)
    whole = lora.train(model_path, training_cache, small, config)
    checkpoint = tmp_path / "run.pt"
    stopped = lora.train(model_path, training_cache, small, config, checkpoint=checkpoint,
                         should_stop=lambda: True)                      # pauses after step 1
    assert stopped is None and checkpoint.is_file()
    resumed = lora.train(model_path, training_cache, small, config, checkpoint=checkpoint)
    assert resumed.losses == pytest.approx(whole.losses, abs=1e-5)
    for module, (a, b) in whole.weights.items():
        assert resumed.weights[module][0].allclose(a, atol=1e-6)
        assert resumed.weights[module][1].allclose(b, atol=1e-6)
