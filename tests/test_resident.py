"""`ember ask` with a resident engine (a running `ember serve` for the same data directory) against
`ember ask` alone: the same asks, both ways, in two fresh homes, must print the same things and exit
the same way. Real server process, real bundled model, greedy."""
from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import pytest

from assistant import ownership
from assistant.config import Settings
from assistant.daemon import Daemon, DaemonConfig, Sensors, check
from storage import activity
from storage.db import open_db
from tests.test_serve import BASE, ROOT, Server

SERVING = "ember serve is answering a request"
TIMING = {"seconds", "tokens_per_second", "first_token_seconds"}   # and when a remembered message was written

# (args, stdin): every option of `ember ask`, and the errors it can give before and after logging.
ASKS = [
    (["What is the capital of France?", "--max-tokens", "24"], None),
    (["Tell me a fact about owls.", "--max-tokens", "20", "--json"], None),
    (["And another one?", "--conversation", "1", "--max-tokens", "16", "--why"], None),
    (["-", "--max-tokens", "12", "--route", "base", "--json"], "What colour is the sky?"),
    (["Do not keep this.", "--no-log", "--max-tokens", "8"], None),
    (["Remember: my cat is called Tom.", "--max-tokens", "8", "--route", "rag", "--json"], None),
    (["What is my cat called?", "--max-tokens", "16", "--temperature", "0", "--seed", "3"], None),
    (["   "], None),                                                   # empty: refused, nothing stored
    (["hello", "--conversation", "999"], None),                        # no such conversation
    (["hello", "--route", "adapter"], None),                           # no adapter: refused after logging
    (["hello", "--max-tokens", "100000"], None),                       # beyond the context
]


def _ask(home, args, stdin):
    env = dict(os.environ, EMBER_HOME=str(home), PYTHONPATH=str(ROOT))
    env.pop("EMBER_DEBUG", None)
    result = subprocess.run([sys.executable, "-m", "assistant", "ask", *args], input=(stdin or "").encode(),
                            capture_output=True, timeout=180, env=env, cwd=ROOT)
    out = result.stdout.decode()
    if "--json" in args and result.returncode == 0:
        document = json.loads(out)
        out = {k: v for k, v in document.items() if k not in TIMING}
        out["memories"] = [{k: v for k, v in hit.items() if k != "time"} for hit in out["memories"]]
        if out.get("router"):
            out["router"] = {k: v for k, v in out["router"].items() if k != "seconds"}
    return result.returncode, out, result.stderr.decode()


def _log(home):
    db = open_db(home)
    try:
        return db.execute("SELECT role, content, status, route, origin FROM messages ORDER BY id").fetchall()
    finally:
        db.close()


def _served(server):
    return httpx.get(server.url.replace("/v1", "/health"), timeout=10).json()["served"]


def _greedy(home):
    home.mkdir(mode=0o700, parents=True)
    (home / "config.toml").write_text("temperature = 0.0\nseed = 0\n")


@pytest.fixture
def homes(tmp_path):
    resident, alone = tmp_path / "resident", tmp_path / "alone"
    _greedy(resident), _greedy(alone)
    server = Server(resident)
    assert server.wait_ready()["status"] == "ready"
    yield server, alone
    server.stop()


def test_ask_prints_the_same_through_a_resident_engine_as_alone(homes):
    server, alone = homes
    sock = server.home / "serve.sock"
    assert sock.stat().st_mode & 0o777 == 0o600
    before = _served(server)
    for args, stdin in ASKS:
        through = _ask(server.home, args, stdin)
        here = _ask(alone, args, stdin)
        assert through == here, (args, through, here)
        assert "Traceback" not in through[2]
    # every ask past the log went through the server's engine (the empty prompt and the unknown
    # conversation are refused by the log itself, as in-process)
    assert _served(server) - before == 9
    assert _log(server.home) == _log(alone)   # the same log, from the CLI (origin NULL), not the API


def test_ask_answers_alone_when_the_server_is_gone_or_cannot_honour_it(homes):
    server, alone = homes
    args = ["Name a planet.", "--max-tokens", "8", "--json"]
    before = _served(server)
    other_model = _ask(server.home, [*args, "--model", str(server_model())], None)   # other settings: alone
    assert other_model[0] == 0 and _served(server) == before
    server.process.kill()                       # SIGKILL: the socket file stays behind, nobody listens
    server.process.wait()
    assert (server.home / "serve.sock").exists()
    stale = _ask(server.home, ["Name a planet.", "--max-tokens", "8"], None)
    here = _ask(alone, ["Name a planet.", "--max-tokens", "8"], None)
    assert stale == here and stale[0] == 0


def server_model():
    from assistant.config import bundled_model

    return bundled_model()


class QuietMachine(Sensors):
    """Idle, cool, on mains (the daemon's only fake: the machine's signals)."""

    def load(self):
        return 0.0

    def available_mb(self):
        return 8000.0

    def on_battery(self):
        return False

    def temperature_c(self):
        return None


def test_the_daemon_never_trains_while_the_server_answers_and_replies_wait_out_a_training_step(tmp_path):
    home = tmp_path / "home"
    server = Server(home)
    try:
        assert server.wait_ready()["status"] == "ready"
        settings, config = Settings(home=home), DaemonConfig(idle_minutes=0)
        db = open_db(home)
        now = dt.datetime.now(dt.timezone.utc)
        assert check(db, settings, config, QuietMachine(), now).reason != SERVING
        long = {"model": BASE, "messages": [{"role": "user", "content": "Write a long story about a ship."}],
                "max_tokens": 1500, "stream": True, "ember": {"log": False}}    # stores nothing: no message to see
        with httpx.stream("POST", server.url + "/chat/completions", json=long, timeout=120) as response:
            lines = response.iter_lines()
            next(lines), next(lines)
            assert check(db, settings, config, QuietMachine(), now).reason == SERVING
            daemon = Daemon(settings, config, sensors=QuietMachine())
            daemon.running, daemon.seen_at_start = True, activity.last_seen(daemon.db)
            assert daemon.user_returned()              # a run in progress pauses after its step
        deadline = time.monotonic() + 30
        while httpx.get(server.url.replace("/v1", "/health")).json()["queue"]["waiting"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert check(db, settings, config, QuietMachine(), now).reason != SERVING
        assert not daemon.user_returned()

        answered = {}
        short = {**long, "max_tokens": 4, "stream": False}
        thread = threading.Thread(target=lambda: answered.update(
            r=httpx.post(server.url + "/chat/completions", json=short, timeout=120), at=time.monotonic()))
        with ownership.training(home):                 # the daemon is mid-step
            thread.start()
            time.sleep(2)
            released = time.monotonic()
            assert thread.is_alive()                   # the reply waits for the step to end
        thread.join(timeout=60)
        assert answered["r"].status_code == 200 and answered["at"] >= released
    finally:
        server.stop()


def test_sigkill_of_the_server_mid_answer_loses_no_prompt_and_ask_says_so_in_one_line(tmp_path):
    home = tmp_path / "home"
    _greedy(home)
    server = Server(home)
    try:
        assert server.wait_ready()["status"] == "ready"
        env = dict(os.environ, EMBER_HOME=str(home), PYTHONPATH=str(ROOT))
        env.pop("EMBER_DEBUG", None)
        ask = subprocess.Popen([sys.executable, "-m", "assistant", "ask", "Describe the sea at night, at length.",
                                "--max-tokens", "1500"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=env, cwd=ROOT)
        assert ask.stdout.read(20)                   # the answer is streaming from the server
        time.sleep(1.5)                              # past the reply's first save (every 0.5 s)
        server.process.kill()
        server.process.wait()
        out, err = ask.communicate(timeout=60)
    finally:
        server.stop()
    lines = err.decode().strip().splitlines()
    assert ask.returncode != 0 and len(lines) == 1 and "saved" in lines[0] and "Traceback" not in err.decode()
    assert [row[:2] for row in _log(home)] == [("user", "Describe the sea at night, at length."),
                                               ("assistant", _log(home)[1][1])]
    assert _log(home)[1][1]                          # the reply so far, kept (marked interrupted on recovery)


def test_an_interrupted_ask_is_stored_and_reported_the_same_both_ways(homes):
    server, alone = homes
    outcomes = []
    for home in (server.home, alone):
        env = dict(os.environ, EMBER_HOME=str(home), PYTHONPATH=str(ROOT))
        env.pop("EMBER_DEBUG", None)
        # --route base: the interruption is what is tested.
        # Ctrl-C as a terminal delivers it: a test run started in the background of a script (`make test &`)
        # has SIGINT ignored, which its children inherit, and Python then never raises KeyboardInterrupt
        # (both asks ran to their token limit in such runs).
        ask = subprocess.Popen([sys.executable, "-m", "assistant", "ask", "Write a long story about a ship.",
                                "--max-tokens", "1500", "--route", "base"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=env, cwd=ROOT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        assert ask.stdout.read(20)
        time.sleep(1)
        ask.send_signal(signal.SIGINT)               # Ctrl-C
        _, err = ask.communicate(timeout=60)
        deadline = time.monotonic() + 30
        while _log(home)[-1][2] == "generating" and time.monotonic() < deadline:
            time.sleep(0.1)
        outcomes.append((ask.returncode, err.decode(), [row[2] for row in _log(home)]))
    # (the outcomes in full when this fails)
    assert outcomes[0] == outcomes[1] and outcomes[0][0] == 130, outcomes
    assert outcomes[0][2] == ["complete", "interrupted"], outcomes


def test_a_server_that_does_not_answer_is_passed_over_and_the_question_is_logged_once(homes):
    server, alone = homes
    server.process.send_signal(signal.SIGSTOP)       # alive, socket open, answering nothing
    try:
        started = time.monotonic()
        stalled = _ask(server.home, ["Name a river.", "--max-tokens", "8"], None)
        waited = time.monotonic() - started
    finally:
        server.process.send_signal(signal.SIGCONT)
    assert stalled == _ask(alone, ["Name a river.", "--max-tokens", "8"], None) and stalled[0] == 0
    assert waited < 60
    server.wait_ready()                              # the server wakes and reads the abandoned request
    time.sleep(1)
    assert [row[1] for row in _log(server.home)].count("Name a river.") == 1


def test_ask_through_a_resident_engine_imports_neither_llama_cpp_nor_the_database_layer(homes):
    server, _ = homes
    env = dict(os.environ, EMBER_HOME=str(server.home), PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "assistant", "ask", "Hi.", "--max-tokens", "4"],
                            capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip()
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "assistant.resident" in imported
    assert not imported & {"llama_cpp", "sqlite_utils", "numpy", "assistant.conversation", "httpx2", "torch"}


def test_regenerate_through_a_resident_engine_keeps_the_old_reply_as_an_alternative(homes):
    """`ember ask --regenerate ID` with `ember serve` running: answered by the server's engine, the old
    reply kept as the new one's sibling, the kept branch through the new one, and the printed answer is
    what was stored."""
    server, _ = homes
    code, first, _ = _ask(server.home, ["Name three fruits.", "--max-tokens", "24", "--json"], None)
    assert code == 0
    before = _served(server)
    code, printed, err = _ask(server.home, ["--regenerate", str(first["message_id"]), "--max-tokens", "24",
                                            "--temperature", "1.2", "--seed", "11"], None)
    assert code == 0 and "Traceback" not in err, err
    assert _served(server) == before + 1            # the server's engine answered, not this process
    db = open_db(server.home)
    try:
        old = db["messages"].get(first["message_id"])
        question = db["messages"].get(old["parent_id"])
        siblings = db.execute("SELECT id, content, status FROM messages WHERE parent_id = ? AND role = 'assistant' "
                              "ORDER BY id", [question["id"]]).fetchall()
        assert [row[0] for row in siblings][0] == old["id"] and len(siblings) == 2
        new_id, new_text, status = siblings[1]
        assert old["content"] == first["text"] and status == "complete"
        assert printed.strip() == new_text.strip() and new_text != old["content"]
        assert db["conversations"].get(first["conversation_id"])["current_id"] == new_id
        assert [m["content"] for m in db.query("SELECT content FROM messages WHERE role = 'user'")] \
            == ["Name three fruits."]            # the question is asked again, not stored again
    finally:
        db.close()
    # and `ember history --json` shows the tree: both replies, the kept branch through the new one
    env = dict(os.environ, EMBER_HOME=str(server.home), PYTHONPATH=str(ROOT))
    shown = json.loads(subprocess.run([sys.executable, "-m", "assistant", "history", "--json"], capture_output=True,
                                      timeout=60, env=env, cwd=ROOT, check=True).stdout)
    conversation = next(c for c in shown if c["id"] == first["conversation_id"])
    assert conversation["current_id"] == new_id and conversation["branch"] == [question["id"], new_id]
    assert {m["id"] for m in conversation["messages"]} == {question["id"], old["id"], new_id}
