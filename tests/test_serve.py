"""`ember serve` against the real OpenAI SDK and raw HTTP: the real server process (uvicorn on a free
127.0.0.1 port), the real bundled model, a real database in a tmp dir. Replies are kept short."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
import sqlite_utils

from adapters import dataset
from assistant.config import bundled_model, load_settings
from storage import conversations as convs
from storage import feedback
from storage.db import integrity_ok, open_db

BASE = bundled_model().stem
ROOT = Path(__file__).parents[1]


class Server:
    """A running `ember serve` process and where to reach it."""

    def __init__(self, home: Path, *args: str):
        self.home = home
        self.log = home.parent / f"serve-{home.name}.log"
        env = dict(os.environ, EMBER_HOME=str(home), PYTHONPATH=str(ROOT))
        env.pop("EMBER_DEBUG", None)
        self.process = subprocess.Popen([sys.executable, "-m", "assistant", "serve", "--port", "0", *args],
                                        stdout=subprocess.PIPE, stderr=self.log.open("w"), env=env, cwd=ROOT)
        deadline = time.monotonic() + 60
        while "serving on" not in self.log.read_text():
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        line = next(line for line in self.log.read_text().splitlines() if "serving on" in line)
        self.url = line.split("serving on ")[1].split()[0]          # http://127.0.0.1:PORT/v1
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])

    def wait_ready(self) -> dict:
        deadline = time.monotonic() + 120
        while True:
            health = httpx.get(self.url.replace("/v1", "/health"), timeout=10).json()
            if health["status"] != "loading" or time.monotonic() > deadline:
                return health
            time.sleep(0.2)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=kw.pop("api_key", "unused"), max_retries=0,
                             timeout=120, **kw)

    def db(self) -> sqlite_utils.Database:
        return open_db(self.home)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module: a queue of 1 behind the running reply, and a small body limit."""
    home = tmp_path_factory.mktemp("serve") / "home"
    running = Server(home, "--queue", "1", "--max-body", "200000")
    assert running.wait_ready()["status"] == "ready"
    yield running
    running.stop()


def _raw(server: Server, body: bytes, *, path: str = "/v1/chat/completions",
         headers: dict | None = None) -> httpx.Response:
    return httpx.post(server.url.replace("/v1", "") + path, content=body, timeout=60,
                      headers={"content-type": "application/json", **(headers or {})})


def _ask(content: str = "Say hello.", **extra) -> dict:
    return dict(model=BASE, messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0, **extra)


def test_a_completion_is_answered_logged_first_and_marked_as_from_the_api(server):
    client = server.client(default_headers={"User-Agent": "test-client/1.0"})
    done = client.chat.completions.create(**_ask("What is the capital of France?"))
    assert done.object == "chat.completion" and done.model == BASE
    choice = done.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert done.usage.prompt_tokens > 0 and 0 < done.usage.completion_tokens <= 8
    ember = done.model_extra["ember"]
    db = server.db()
    user, reply = db["messages"].get(ember["user_message_id"]), db["messages"].get(ember["message_id"])
    assert user["content"] == "What is the capital of France?" and user["id"] < reply["id"]
    assert (user["origin"], user["client"]) == ("api", "test-client/1.0")
    assert (reply["origin"], reply["client"], reply["content"]) == ("api", "test-client/1.0", choice.message.content)
    assert reply["status"] in ("complete", "length") and integrity_ok(db)


def test_top_p_is_applied(server):
    # At temperature 1 a nucleus of one token is greedy decoding; the whole distribution is not.
    question = "Write one sentence about a red kite over the hills."
    def answer(**sampling) -> str:
        body = dict(_ask(question), max_tokens=24, seed=7, **sampling)
        return server.client().chat.completions.create(**body).choices[0].message.content
    greedy = answer(temperature=0)
    assert answer(temperature=1.0, top_p=1e-6) == greedy
    assert answer(temperature=1.0, top_p=1.0) != greedy


def test_streaming_sends_role_then_content_then_finish_with_usage_then_done(server):
    chunks = list(server.client().chat.completions.create(**_ask(stream=True)))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.completion_tokens > 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text and server.db()["messages"].get(chunks[-1].model_extra["ember"]["message_id"])["content"] == text

    with httpx.stream("POST", server.url + "/chat/completions", json=_ask(stream=True), timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_models_list_the_base_model_and_the_embedder_and_personal_needs_an_adapter(server):
    ids = [m.id for m in server.client().models.list()]
    assert ids == [BASE, "all-MiniLM-L6-v2"]        # no adapter promoted yet: no "+personal"
    with pytest.raises(openai.NotFoundError) as err:
        server.client().chat.completions.create(**{**_ask(), "model": BASE + "+personal"})
    assert err.value.body["code"] == "model_not_found"


def test_errors_are_openai_error_objects_with_their_status(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(**{**_ask(), "model": "gpt-4o"})
    assert err.value.status_code == 404 and err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**_ask(), extra_body={"ember": {"route": "sideways"}})
    assert err.value.body["param"] == "ember.route"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=BASE, messages=[{"role": "assistant", "content": "hi"}])
    with pytest.raises(openai.APIStatusError) as err:   # 4,096 tokens of context: this is far more
        client.chat.completions.create(**_ask("lorem ipsum dolor " * 3000))
    assert err.value.status_code == 413 and err.value.body["code"] == "context_length_exceeded"


@pytest.mark.parametrize("body, status, code", [
    (b'{"model": "x", "messages": [', 400, "invalid_json"),
    (b'{"model": "m", "messages": "' + b"\xff\xfe" + b'"}', 400, "invalid_encoding"),
    (b'[1, 2, 3]', 400, "invalid_json"),
    (json.dumps({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}).encode(),
     400, None),
    (json.dumps({"model": BASE, "messages": [{"role": "user", "content": 5}]}).encode(), 400, None),
    (json.dumps({"model": BASE, "messages": [{"role": "user", "content": "x" * 300_000}]}).encode(),
     413, "request_too_large"),
])
def test_bad_bodies_get_a_4xx_json_error_and_never_a_traceback(server, body, status, code):
    response = _raw(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["code"] == code
    assert "Traceback" not in response.text


def test_a_client_that_disconnects_cancels_its_reply_and_the_partial_reply_is_kept(server):
    db = server.db()
    before = db.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()[0]
    stream = server.client().chat.completions.create(
        **{**_ask("Write a long story about a dragon and a knight."), "max_tokens": 1500}, stream=True)
    received = [next(stream) for _ in range(4)]
    assert received[0].choices[0].delta.role == "assistant"
    stream.close()
    deadline = time.monotonic() + 60
    while True:
        row = next(db["messages"].rows_where("id > ? AND role = 'assistant'", [before]), None)
        if row and row["status"] != "generating" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert row["status"] == "cancelled" and row["content"] and row["tokens"] < 1500
    assert db.execute("SELECT content FROM messages WHERE id = ?", [row["id"] - 1]).fetchone()[0].startswith(
        "Write a long story")


def test_beyond_the_queue_requests_get_429_with_retry_after(server):
    client = server.client()
    long = {**_ask("Tell me everything about the history of Rome."), "max_tokens": 1500}
    running = client.chat.completions.create(**long, stream=True)   # the reply being written
    next(running)
    waiting = httpx.Client(timeout=120)
    pending = waiting.build_request("POST", server.url + "/chat/completions", json=_ask())
    import threading

    second: dict = {}
    thread = threading.Thread(target=lambda: second.update(r=waiting.send(pending)))
    thread.start()                                                  # waits its turn: the queue holds 1
    deadline = time.monotonic() + 30
    while httpx.get(server.url.replace("/v1", "/health")).json()["queue"]["waiting"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(**_ask("One more?"))
    assert int(err.value.response.headers["retry-after"]) >= 1 and err.value.body["code"] == "queue_full"
    running.close()                                                  # cancels the long reply
    thread.join(timeout=120)
    assert second["r"].status_code == 200 and second["r"].json()["choices"][0]["message"]["content"]
    assert "One more?" not in [r["content"] for r in server.db()["messages"].rows]   # refused: nothing stored


def test_per_request_opt_outs_no_log_and_no_learning(server):
    db = server.db()
    count = db["messages"].count
    done = server.client().chat.completions.create(**_ask("Do not keep this."), extra_body={"ember": {"log": False}})
    assert done.choices[0].message.content and db["messages"].count == count
    kept = server.client().chat.completions.create(**_ask("Keep it, never learn."),
                                                   extra_body={"ember": {"learn": False, "route": "base"}})
    ember = kept.model_extra["ember"]
    assert ember["route"] == "base" and feedback.is_excluded(db, ember["conversation_id"])


def test_embeddings_are_memory_vectors(server):
    result = server.client().embeddings.create(model="all-MiniLM-L6-v2", input=["my cat is Tom", "hello"])
    assert [len(d.embedding) for d in result.data] == [384, 384] and result.usage.prompt_tokens > 0
    assert abs(sum(x * x for x in result.data[0].embedding) - 1) < 1e-3
    with pytest.raises(openai.NotFoundError):
        server.client().embeddings.create(model="text-embedding-3-small", input="x")


def _register_random_adapter(home: Path, adapter_id: str) -> None:
    """A small random LoRA on the last layer's q_proj, registered active as `ember adapt` would."""
    import numpy as np

    from adapters import export
    from adapters.base import file_sha256
    from storage import registry

    (home / "adapters").mkdir(mode=0o700, exist_ok=True)
    rng = np.random.default_rng(0)
    weights = {"model.layers.29.self_attn.q_proj": (rng.normal(0, 0.05, (2, 576)), rng.normal(0, 0.05, (576, 2)))}
    path = export.write_lora_gguf(home / "adapters" / f"{adapter_id}.gguf", weights, alpha=4, n_head=9,
                                  n_head_kv=3, base_sha256=file_sha256(bundled_model()),
                                  base_name=bundled_model().name)
    registry.register(open_db(home), {"id": adapter_id, "path": str(path), "kind": "lora", "method": "lora",
                                      "base_sha256": file_sha256(bundled_model()), "base_name": "SmolLM2-135M",
                                      "params": {"rank": 2}, "eval": {}, "status": "inactive"}, [], activate=True)


def test_a_promoted_adapter_is_swapped_in_between_requests_never_mid_stream(server):
    client = server.client()
    stream = client.chat.completions.create(**{**_ask("Count from one to fifty."), "max_tokens": 60}, stream=True)
    next(stream)
    _register_random_adapter(server.home, "lora-test")      # promoted while a reply streams
    chunks = list(stream)
    assert chunks[-1].model_extra["ember"]["adapter"] is None     # the running reply kept the base model
    after = client.chat.completions.create(**_ask(), extra_body={"ember": {"route": "base"}})
    assert after.model_extra["ember"]["adapter"] is None
    assert [m.id for m in client.models.list()] == [BASE, BASE + "+personal", "all-MiniLM-L6-v2"]
    personal = client.chat.completions.create(**{**_ask(), "model": BASE + "+personal"},
                                              extra_body={"ember": {"route": "adapter"}})
    assert personal.model_extra["ember"]["adapter"] == "lora-test"
    assert server.db()["messages"].get(personal.model_extra["ember"]["message_id"])["adapter_id"] == "lora-test"
    with pytest.raises(openai.BadRequestError):    # the base model withholds the adapter
        client.chat.completions.create(**_ask(), extra_body={"ember": {"route": "adapter"}})


def test_the_server_never_loads_torch_and_the_database_is_whole(server):
    maps = Path(f"/proc/{server.process.pid}/maps").read_text()
    assert "libtorch" not in maps
    db = server.db()
    assert integrity_ok(db)
    # every answered request has its user message and its reply; the two refused after logging (413:
    # the prompt is longer than the context; 400: the adapter route on the base model) keep the prompt
    unanswered = [row["content"][:11] for row in db["messages"].rows_where("role = 'user'")
                  if not db["messages"].count_where("conversation_id = ? AND role = 'assistant'",
                                                    [row["conversation_id"]])]
    assert sorted(unanswered) == ["Say hello.", "lorem ipsum"]
    replies = [row["status"] for row in db["messages"].rows_where("role = 'assistant'")]
    assert len(replies) >= 10 and set(replies) <= {"complete", "length", "cancelled"}


def test_a_token_is_required_off_loopback_and_checked_when_given(tmp_path):
    home = tmp_path / "home"
    env = dict(os.environ, EMBER_HOME=str(home), PYTHONPATH=str(ROOT))
    refused = subprocess.run([sys.executable, "-m", "assistant", "serve", "--host", "0.0.0.0", "--port", "0"],
                             capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "--token-file" in refused.stderr and "Traceback" not in refused.stderr

    server = Server(home, "--new-token")
    try:
        token = server.process.stdout.readline().decode().strip()
        path = home / "api-token"
        assert path.read_text().strip() == token and path.stat().st_mode & 0o777 == 0o600
        with pytest.raises(openai.AuthenticationError) as err:
            server.client(api_key="wrong-token").models.list()
        assert err.value.status_code == 401 and err.value.body["type"] == "authentication_error"
        assert [m.id for m in server.client(api_key=token).models.list()][0] == BASE
    finally:
        server.stop()
    path.chmod(0o644)
    loose = subprocess.run([sys.executable, "-m", "assistant", "serve", "--token-file", str(path)],
                           capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)
    assert loose.returncode != 0 and "chmod 600" in loose.stderr and len(loose.stderr.strip().splitlines()) == 1


def test_sigkill_mid_stream_loses_no_accepted_prompt(tmp_path):
    server = Server(tmp_path / "home")
    try:
        assert server.wait_ready()["status"] == "ready"
        stream = server.client().chat.completions.create(
            **{**_ask("Describe the sea at night, at length."), "max_tokens": 1500}, stream=True)
        for _ in range(5):
            next(stream)
        server.process.kill()
        server.process.wait()
    finally:
        server.stop()
    db = server.db()
    assert integrity_ok(db)
    user = db.execute("SELECT content FROM messages WHERE role = 'user'").fetchall()
    assert user == [("Describe the sea at night, at length.",)]
    assert convs.recover_interrupted(db) == 1
    reply = db.execute("SELECT status, content FROM messages WHERE role = 'assistant'").fetchone()
    assert reply[0] == "interrupted"


def test_learn_from_api_false_keeps_api_conversations_out_of_the_dataset(db, template, tmp_path):
    from assistant.conversation import log_question

    for i in range(12):
        question = log_question(db, f"Write a short poem about autumn leaves, version {i}.")
        convs.add_message(db, question.conversation_id, "assistant", "Nice.")
        log_question(db, f"Explain how tides work, in {i} sentences.", origin="api", client="app/1")
    everything = dataset.build(db, template, min_train=1)
    without = dataset.build(db, template, min_train=1, learn_from_api=False)
    api = convs.api_conversations(db)
    shown = {ex.message_id for ex in everything.train + everything.heldout}
    kept = {ex.message_id for ex in without.train + without.heldout}
    api_messages = {r["id"] for r in db["messages"].rows_where("origin = 'api'")}
    assert len(api) == 12 and api_messages <= shown and not (api_messages & kept)
    assert without.skipped["API conversation messages"] == 12
    assert load_settings(environ={"EMBER_HOME": str(tmp_path / "h"), "EMBER_LEARN_FROM_API": "false"}
                         ).learn_from_api is False


def _too_big_in_chunks():
    for _ in range(30):          # 300 kB without a Content-Length: the limit holds while it streams in
        yield b" " * 10_000


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/chat/completions"])
@pytest.mark.parametrize("body, status, code", [
    (b'{"model": "all-MiniLM-L6-v2", "input": ', 400, "invalid_json"),
    (b'{"model": "all-MiniLM-L6-v2", "input": "\xc3\x28"}', 400, "invalid_encoding"),
    (json.dumps({"model": "all-MiniLM-L6-v2", "input": 5, "messages": 5}).encode(), 400, None),
    (_too_big_in_chunks, 413, "request_too_large"),
])
def test_bad_bodies_on_every_endpoint_and_unannounced_sizes_get_a_4xx_json_error(server, path, body, status, code):
    response = _raw(server, body() if callable(body) else body, path=path)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == code and error["message"]
    assert "Traceback" not in response.text


def test_the_resident_endpoint_is_on_the_unix_socket_only_and_refuses_bad_bodies(server):
    assert _raw(server, b"{}", path="/ember/ask").status_code == 404        # never on the TCP port
    sock = httpx.Client(transport=httpx.HTTPTransport(uds=str(server.home / "serve.sock")), timeout=30)
    for body, status in [(b'{"prompt": ', 400), (b'{"prompt": "\xff"}', 400),
                         (json.dumps({"prompt": 5, "log": True, "route": "auto", "settings": {}}).encode(), 400),
                         (json.dumps({"prompt": "hi", "max_tokens": None, "seed": None, "temperature": None,
                                      "log": True, "conversation_id": None, "route": "auto", "persona": None,
                                      "settings": {"model": "other.gguf"}}).encode(), 409),
                         (b"x" * 300_000, 413)]:
        response = sock.post("http://ember/ember/ask", content=body, headers={"content-type": "application/json"})
        assert response.status_code == status, response.text
        assert response.json()["error"]["message"] and "Traceback" not in response.text
