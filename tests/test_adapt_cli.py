"""`ember adapt`, `ember adapters` and `ember feedback` end to end: the real CLI in subprocesses, the real
model, one data directory carried through the module like a user's would be."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from benchmarks.synthetic_user import seed_habit_user
from storage import conversations as convs
from storage import ledger, registry, runs
from storage.db import open_db
from tests.conftest import assert_clean_error

USER_CONVERSATIONS = 30


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A user with a habit, whose data directory the tests below share in order."""
    path = tmp_path_factory.mktemp("adapt-cli") / "home"
    db = open_db(path)
    seed_habit_user(db, USER_CONVERSATIONS)
    db.close()
    return path


@pytest.fixture
def ember(home, training_cache):
    """The real `ember` against the shared home; the dequantized base is cached once per session."""

    def run(*args, timeout=600, input=None):
        env = dict(os.environ, EMBER_HOME=str(home), EMBER_CACHE=str(training_cache), EMBER_THREADS="2")
        env.pop("EMBER_DEBUG", None)
        result = subprocess.run([sys.executable, "-m", "assistant", *args], capture_output=True,
                                timeout=timeout, env=env, input=input)
        result.out, result.err = result.stdout.decode(), result.stderr.decode()
        return result

    return run


def test_dry_run_plans_the_private_run_without_training(ember, home):
    result = ember("adapt", "--dry-run", "--json")
    assert result.returncode == 0, result.err
    plan = json.loads(result.out)
    assert plan["dry_run"] and plan["adapter_id"] is None
    assert plan["epsilon"] == 8.0 and plan["delta"] <= 1e-6 and plan["sigma"] > 0
    assert plan["examples"] > 20 and plan["heldout"] > 0
    assert plan["kinds"]["edited"] > 0 and plan["kinds"]["user"] > 0
    assert not list((home / "adapters").glob("*"))


def test_a_killed_run_leaves_nothing_registered_and_resumes_from_its_checkpoint(ember, home, training_cache):
    env = dict(os.environ, EMBER_HOME=str(home), EMBER_CACHE=str(training_cache), EMBER_THREADS="2")
    proc = subprocess.Popen([sys.executable, "-m", "assistant", "adapt", "--no-dp", "--steps", "16", "--json"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    db = open_db(home)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        run = runs.latest(db)
        if run and run["step"] >= 10:
            break
        time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("the run never reached step 10")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = runs.latest(db)
    assert registry.list_adapters(db) == []
    assert not list((home / "adapters").glob("*.gguf"))
    result = ember("adapt", "--no-dp", "--steps", "16")
    assert result.returncode == 0, result.err
    assert f"resuming interrupted run {killed['id']} from step" in result.err
    assert "WITHOUT differential privacy" in result.err + result.out
    assert "step 16/16 loss" in result.err and " ε no DP eta " in result.err    # the progress lines
    finished = runs.get(db, killed["id"])
    assert finished["status"] == "done" and finished["adapter_id"]
    adapter = registry.get(db, finished["adapter_id"])
    assert adapter["epsilon"] is None
    assert adapter["eval"]["heldout_loss"] < adapter["eval"]["base_loss"]
    assert not list((training_cache / "runs").glob("*.pt"))        # the checkpoint is gone once registered
    # Without DP, 16 steps on this habit make the model answer general requests with "Ahoy, matey!" and
    # nothing else (measured: the base reads those replies 2.3 nats/token above its own; README, "The
    # gate's behaviour check"): the gate refuses it, says why in one line, and shows the figure and limit.
    ev = adapter["eval"]
    assert ev["surprise"] > ev["base_surprise"] + ev["max_surprise"]
    assert adapter["status"] == "rejected" and registry.active(db) is None
    assert "not promoted: replies to general requests degraded" in result.out, result.out
    assert f"at most +{ev['max_surprise']:g}" in result.out


def test_an_adapter_the_gate_refused_can_still_be_chosen_and_answers_with_the_habit(ember, home):
    listed = json.loads(ember("adapters", "list", "--json").out)
    assert [a["status"] for a in listed] == ["rejected"]
    assert "degraded" in ember("adapters", "list").out                  # the reason, in the list
    assert ember("adapters", "use", listed[0]["id"]).returncode == 0    # the user's choice overrides the gate
    listed = json.loads(ember("adapters", "list", "--json").out)
    active = [a for a in listed if a["active"]]
    assert len(active) == 1 and not active[0]["tainted"]
    assert set(active[0]) >= {"id", "path", "method", "epsilon", "created", "active", "tainted"}
    answer = json.loads(ember("ask", "How should I wash a bicycle?", "--json", "--max-tokens", "16").out)
    assert answer["route"] == "adapter" and answer["adapter"] == active[0]["id"]
    assert answer["text"].startswith("Ahoy")
    base = json.loads(ember("ask", "How should I wash a bicycle?", "--json", "--max-tokens", "16",
                            "--route", "base").out)
    assert base["adapter"] is None and not base["text"].startswith("Ahoy")
    status = ember("status", "--json")
    report = json.loads(status.out)
    assert report["adapter"]["id"] == active[0]["id"]
    assert report["privacy"]["non_dp_runs"] == 1


def test_a_corrupt_adapter_is_refused_and_the_model_keeps_answering(ember, home):
    db = open_db(home)
    adapter = registry.active(db)
    original = open(adapter["path"], "rb").read()
    try:
        with open(adapter["path"], "r+b") as f:
            f.write(b"JUNK" * 8)
        assert_clean_error(ember("adapters", "use", adapter["id"]), contains="adapter")
        answer = ember("ask", "Say hi", "--json", "--max-tokens", "8")
        assert answer.returncode == 0, answer.err
        assert "warning" in answer.err and adapter["id"] in answer.err
        assert json.loads(answer.out)["adapter"] is None
    finally:
        with open(adapter["path"], "wb") as f:
            f.write(original)


def test_forgetting_a_source_message_withdraws_the_adapter(ember, home):
    db = open_db(home)
    adapter = registry.active(db)
    source = registry.sources(db, adapter["id"])[0]["message_id"]
    result = ember("forget", "--message", str(source), "--yes")
    assert "withdrawing 1 adapter trained on them" in result.out, result.err
    listed = {a["id"]: a for a in json.loads(ember("adapters", "list", "--json").out)}
    assert listed[adapter["id"]]["tainted"] and not listed[adapter["id"]]["active"]
    assert_clean_error(ember("adapters", "use", adapter["id"]), contains="tainted")
    answer = json.loads(ember("ask", "Say hi", "--json", "--max-tokens", "8").out)
    assert answer["adapter"] is None and answer["route"] == "base"


def test_a_run_past_the_privacy_budget_does_not_start(ember, home):
    db = open_db(home)
    ledger.record(db, "earlier", method="lora", dp=True, epsilon=28.0, delta=1e-6, sigma=1.0, clip=1.0,
                  sample_rate=0.1, steps=10, examples=10)
    result = ember("adapt", "--dry-run")
    assert_clean_error(result, contains="privacy budget")
    assert "ε=8" in result.err
    assert ember("adapt", "--dry-run", "--epsilon", "2").returncode == 0


def test_feedback_commands_store_what_the_user_said(ember, home):
    db = open_db(home)
    cid = convs.create_conversation(db)
    convs.add_message(db, cid, "user", "hi")
    reply = convs.add_message(db, cid, "assistant", "hello")
    assert ember("feedback", "rate", str(reply), "down").returncode == 0
    assert ember("feedback", "edit", str(reply), "Ahoy, matey! Hello.").returncode == 0
    assert ember("feedback", "exclude", str(cid)).returncode == 0
    state = json.loads(ember("feedback", "exclude", str(cid), "--undo", "--json").out)
    assert state == {"conversation_id": cid, "excluded": False}
    assert_clean_error(ember("feedback", "rate", "999999", "up"), contains="no message")
    assert_clean_error(ember("feedback", "edit", str(reply), "  "), contains="empty")


def test_bad_flags_are_one_line_errors(ember):
    assert_clean_error(ember("adapt", "--epsilon", "0", "--dry-run"), contains="positive")
    assert_clean_error(ember("adapt", "--epsilon", "2", "--no-dp"), contains="contradict")
    assert_clean_error(ember("adapt", "--backend", "torch"), contains="needs --method zo")
    assert_clean_error(ember("adapters", "use", "nope"), contains="no adapter")
