"""The idle-time daemon: when it starts, when it waits, how it yields — with a controllable clock and
fake sensors (the only fakes: a CPU's load, a battery, a thermometer), the real pipeline and database."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from adapters import dataset, pipeline
from adapters.base import bf16_supported, gguf_parameters, resolve_dtype
from adapters.lora import LoraConfig
from assistant.config import Settings
from assistant.daemon import Daemon, DaemonConfig, Sensors, check, choose_method, single_instance
from assistant.errors import InvalidInput
from benchmarks.synthetic_user import seed_habit_user
from storage import activity, ledger, registry, routing, runs
from storage import conversations as convs
from storage.db import open_db


class FakeSensors(Sensors):
    """A machine whose signals the test sets."""

    def __init__(self, load=0.1, free_mb=8000.0, battery=False, temperature=None):
        self.load_value, self.free, self.battery, self.temperature = load, free_mb, battery, temperature

    def load(self):
        return self.load_value

    def available_mb(self):
        return self.free

    def on_battery(self):
        return self.battery

    def temperature_c(self):
        return self.temperature


CONFIG = DaemonConfig(idle_minutes=30, check_seconds=60, min_new_messages=10)


@pytest.fixture
def user(home, training_cache):
    db = open_db(home)
    seed_habit_user(db, 30)
    settings = Settings(home=home, cache=training_cache, n_threads=2)
    return settings, db


def _later(db, minutes):
    seen = dt.datetime.fromisoformat(activity.last_seen(db))
    return seen + dt.timedelta(minutes=minutes)


def test_starts_when_the_user_is_away_and_the_machine_is_quiet(user):
    settings, db = user
    decision = check(db, settings, CONFIG, FakeSensors(), _later(db, 31))
    assert decision.start and decision.method == "lora"


def test_picks_forward_only_training_when_memory_is_short_of_what_lora_needs(user):
    settings, db = user
    assert check(db, settings, CONFIG, FakeSensors(free_mb=1000), _later(db, 31)).method == "zo-llama"
    # What this machine measured beats the benchmark's figure: a LoRA run that needed only 900 MB here.
    runs.start(db, "lora-small", method="lora", steps=1, fingerprint="x")
    runs.update(db, "lora-small", status="done", peak_rss_mb=900.0)
    assert check(db, settings, CONFIG, FakeSensors(free_mb=1000), _later(db, 31)).method == "lora"


def _finished(db, run_id, method, *, gain, seconds, peak_mb):
    registry.register(db, {"id": run_id, "path": f"/nonexistent/{run_id}.gguf", "kind": "lora", "method": method,
                           "base_sha256": "abc", "base_name": "m.gguf", "status": "inactive",
                           "eval": {"base_loss": 3.7, "heldout_loss": 3.7 - gain, "train_seconds": seconds}},
                      [], activate=False)
    runs.start(db, run_id, method=method, steps=1, fingerprint="x")
    runs.update(db, run_id, status="done", adapter_id=run_id, peak_rss_mb=peak_mb)


def test_when_both_fit_picks_the_method_that_learned_more_per_minute_here(user, ember):
    settings, db = user
    assert check(db, settings, CONFIG, FakeSensors(), _later(db, 31)).method == "lora"   # the benchmark's figures
    _finished(db, "lora-slow", "lora", gain=0.1, seconds=600, peak_mb=300)      # 0.01 nats/min here
    _finished(db, "zo-quick", "zo-llama", gain=0.5, seconds=300, peak_mb=400)   # 0.1 nats/min here
    _finished(db, "adaptive-slow", "lora-adaptive", gain=0.2, seconds=600, peak_mb=400)   # 0.02 nats/min
    method, reason = choose_method(db, FakeSensors().available_mb(), [])
    assert method == "zo-llama" and "zo-llama learns most per minute" in reason
    assert choose_method(db, 350, [])[0] == "lora"                              # only what fits competes
    report = json.loads(ember("daemon", "status", "--json").out)["gain_per_minute"]
    assert report["zo-llama"] == {"nats_per_minute": pytest.approx(0.1), "measured": True}
    assert report["lora"]["measured"] and report["lora"]["nats_per_minute"] == pytest.approx(0.01)
    assert "zo-llama 0.100 nats/min held-out (measured here)" in ember("daemon", "status").out


@pytest.mark.parametrize("sensors, minutes, words", [
    (FakeSensors(), 5, "user active 5 min ago"),
    (FakeSensors(battery=True), 31, "on battery"),
    (FakeSensors(load=0.9), 31, "CPU busy"),
    (FakeSensors(temperature=92.0), 31, "too hot"),
    (FakeSensors(free_mb=300), 31, "not enough free memory"),
])
def test_does_not_start_when_the_user_or_the_machine_is_busy(user, sensors, minutes, words):
    settings, db = user
    decision = check(db, settings, CONFIG, sensors, _later(db, minutes))
    assert not decision.start and words in decision.reason


def test_a_chat_opening_counts_as_the_user_coming_back(user):
    settings, db = user
    activity.record(db, "chat_open")
    assert not check(db, settings, CONFIG, FakeSensors(), _later(db, 10)).start


def test_waits_for_the_nightly_window_and_for_new_messages(user, home):
    settings, db = user
    now = _later(db, 31)
    hour = now.astimezone().hour
    closed = dataclasses.replace(CONFIG, nightly=((hour + 2) % 24, (hour + 4) % 24))
    assert "nightly window" in check(db, settings, closed, FakeSensors(), now).reason
    fussy = dataclasses.replace(CONFIG, min_new_messages=1000)
    assert "waiting for 1000" in check(db, settings, fussy, FakeSensors(), now).reason


def test_an_adapter_withdrawn_by_forgetting_is_learned_again_without_waiting_for_new_messages(user):
    settings, db = user
    ids = [r["id"] for r in db.query("SELECT id FROM messages ORDER BY id LIMIT 3")]
    registry.register(db, {"id": "a1", "path": "/nonexistent/a1.gguf", "kind": "lora", "method": "lora",
                           "base_sha256": "abc", "base_name": "m.gguf", "status": "inactive", "epsilon": 8.0,
                           "delta": 1e-6, "examples": 3}, [(m, "train") for m in ids], activate=True)
    now = _later(db, 31)
    assert "0 new messages" in check(db, settings, CONFIG, FakeSensors(), now).reason
    convs.forget_message(db, ids[0])                     # the adapter is tainted and withdrawn
    assert check(db, settings, CONFIG, FakeSensors(), now).start


def test_status_says_when_the_user_will_count_as_away(user, ember):
    settings, db = user
    daemon = Daemon(settings, CONFIG, sensors=FakeSensors(), clock=lambda: _later(db, 5))
    assert not daemon.tick().start
    report = json.loads(ember("daemon", "status", "--json").out)
    assert report["state"] == "waiting" and "waiting 26 more min" in report["reason"]
    assert report["eligible_at"] == _later(db, 30).isoformat(timespec="seconds")
    assert report["epsilon_left"] == settings.privacy_budget
    assert report["memory_need_mb"]["zo-llama"] < report["memory_need_mb"]["lora"]
    # Nothing ran here yet: the benchmark's slopes (MB per million parameters, per MB of file). LoRA's is
    # that of the dtype it would train SmolLM2 in: bf16 on a CPU with it (135 M parameters), else float32.
    lora_dtype = resolve_dtype(LoraConfig.dtype, gguf_parameters(settings.model_path))
    assert lora_dtype == ("bfloat16" if bf16_supported() else "float32")
    assert report["memory_slope"]["lora"] == {"mb_per_unit": {"float32": 4.54, "bfloat16": 2.84}[lora_dtype],
                                              "measured": False}
    assert report["memory_slope"]["lora-adaptive"] == {"mb_per_unit": 4.54, "measured": False}   # float32 always
    assert report["memory_slope"]["zo-llama"] == {"mb_per_unit": 1.0, "measured": False}


def test_forgetting_a_message_drops_a_paused_run_that_was_learning_from_it(user, ember, template):
    settings, db = user
    data = dataset.build(db, template)
    for run_id in ("lora-paused", "lora-also-paused"):
        runs.start(db, run_id, method="lora", steps=10, fingerprint="x")
        runs.update(db, run_id, status="interrupted")
        pipeline._save_data(settings.cache_dir, run_id, data)
        pipeline._files_in(settings.cache_dir, run_id)[0].write_bytes(b"a checkpoint")
    forgotten = data.train[0].message_id
    result = ember("forget", "--message", str(forgotten), "--yes", "--json",
                   env={"EMBER_CACHE": str(settings.cache_dir)})
    assert json.loads(result.out)["deleted"]["runs_dropped"] == 2, result.err
    for run_id in ("lora-paused", "lora-also-paused"):
        assert not any(f.exists() for f in pipeline._files_in(settings.cache_dir, run_id))
        assert runs.get(db, run_id)["status"] == "failed"
    assert json.loads(ember("forget", "--message", str(data.train[1].message_id), "--yes", "--json",
                            env={"EMBER_CACHE": str(settings.cache_dir)}).out)["deleted"]["runs_dropped"] == 0


def test_refuses_when_the_privacy_budget_is_spent(user):
    settings, db = user
    ledger.record(db, "old", method="lora", dp=True, epsilon=30.0, delta=1e-6, sigma=1.0, clip=1.0,
                  sample_rate=0.1, steps=10, examples=10)
    decision = check(db, settings, CONFIG, FakeSensors(), _later(db, 31))
    # No training; the idle time goes to refitting the router on the user's edited replies instead.
    assert decision.method == "router" and "privacy budget spent" in decision.reason
    routing.save_policy(db, {}, 30, None, {})
    decision = check(db, settings, CONFIG, FakeSensors(), _later(db, 31))
    assert not decision.start and "privacy budget spent" in decision.reason


def test_never_runs_twice(user, home):
    settings, db = user
    with single_instance(home):
        with pytest.raises(InvalidInput, match="already running"):
            with single_instance(home):
                pass
    runs.start(db, "busy", method="lora", steps=10, fingerprint="x")   # a live run (this process)
    assert "already running" in check(db, settings, CONFIG, FakeSensors(), _later(db, 31)).reason


def test_pauses_within_seconds_when_the_user_returns_and_resumes_when_away_again(user):
    settings, db = user
    clock = {"now": _later(db, 31)}
    daemon = Daemon(settings, CONFIG, sensors=FakeSensors(), clock=lambda: clock["now"])
    returned = {}

    def user_comes_back():
        other = open_db(settings.home)
        while not (runs.current(other) and runs.current(other)["step"] >= 2):
            time.sleep(0.1)
        returned["at"] = time.monotonic()
        cid = convs.create_conversation(other)
        convs.add_message(other, cid, "user", "I'm back")

    thread = threading.Thread(target=user_comes_back)
    thread.start()
    first = daemon.tick()
    paused_after = time.monotonic() - returned["at"]
    thread.join()
    assert "paused" in first.reason
    assert paused_after < 5.0                    # one training step, then a checkpoint
    paused = runs.latest(db)
    assert paused["status"] == "interrupted" and registry.list_adapters(db) == []
    assert activity.daemon(db)["state"] == "waiting"

    clock["now"] = _later(db, 31)
    second = daemon.tick()
    assert second.start and ("promoted" in second.reason)
    done = runs.get(db, paused["id"])
    assert done["status"] == "done" and done["adapter_id"]          # the same run, resumed
    log = [json.loads(line) for line in (settings.home / "daemon.jsonl").read_text().splitlines()]
    assert [e["event"] for e in log] == ["start", "end", "start", "end"]
    assert log[2]["reason"] == "resuming a paused run"


def test_the_real_daemon_process_survives_a_kill_and_promotes_an_adapter(home, training_cache):
    db = open_db(home)
    seed_habit_user(db, 30)
    (home / "config.toml").write_text(
        "daemon_idle_minutes = 0.02\ndaemon_check_seconds = 1\ndaemon_min_new_messages = 5\n"
        # The suite's own earlier tests leave the 1-minute load average high on 2 cores: what is tested
        # here is a kill and a resume, the load rule is tested above with recorded sensors.
        "daemon_max_load = 1000.0\n"
        # A generous ε so that 12 steps on 30 conversations reliably beat the base model: what is
        # tested here is the daemon, DP learning is tested in test_adapt.py.
        "adapt_epsilon = 50.0\nprivacy_budget = 200.0\n")
    env = dict(os.environ, EMBER_HOME=str(home), EMBER_CACHE=str(training_cache), EMBER_THREADS="2")
    command = [sys.executable, "-m", "assistant", "daemon", "run"]
    first = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not ((run := runs.latest(db)) and run["step"] >= 10):
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed = runs.latest(db)
    assert killed is not None and killed["step"] >= 10, "the daemon never got to step 10"
    assert registry.list_adapters(db) == []
    second = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    try:
        while time.monotonic() < deadline and registry.active(db) is None:
            time.sleep(0.5)
        active = registry.active(db)
        assert active is not None and active["id"] == killed["id"]        # resumed, then promoted
        status = json.loads(subprocess.run([sys.executable, "-m", "assistant", "status", "--json"], env=env,
                                           capture_output=True, timeout=60).stdout)
        # Once the adapter is live the daemon may go on to refit the router on the seeded edited replies.
        assert status["daemon"]["state"] in ("waiting", "adapting", "fitting the router")
        assert status["adapter"]["id"] == active["id"]
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0 or second.returncode == -signal.SIGTERM
    stopped = activity.daemon(db)
    assert stopped["state"] == "stopped" and stopped["reason"] == "stopped cleanly"
