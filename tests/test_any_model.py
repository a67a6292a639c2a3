"""A user who brings their own Qwen, Phi-3 or Llama 3 GGUF: the real `ember` command learns from a log made
with that model (dataset, consent, DP ledger, export, gate, registry), and the real chat app opened with
`--model` on it swaps the adapter in and routes with the router's probe on that model. Zeroth-order training
in torch (`--method zo --backend torch`) then runs on the same log and model, exports, and answers through
the request path once in use.

The models are the tiny random-weight fixtures of `benchmarks/tiny_models.py` (built once per session). Qwen 2
runs by default; `pytest --all-architectures` adds Phi-3, Llama 3, Gemma 2/3, Qwen 3 and Mistral, and the
pretrained (chat) Qwen 2, Llama 3, Phi-3 and Gemma 3."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapters import export
from adapters.base import file_sha256, gguf_parameters
from assistant.config import Settings
from benchmarks.synthetic_user import seed_habit_user
from storage import conversations as convs
from storage import ledger, registry, routing, runs
from storage.db import open_db
from tests.tui_helpers import type_text, wait_until

# fixture -> general.architecture
ARCHS = {"qwen2": "qwen2", "phi3": "phi3", "llama3": "llama", "gemma3": "gemma3", "qwen3": "qwen3",
         "gemma2": "gemma2", "mistral": "llama",
         # The same shapes first trained on a small chat corpus (`tiny_models.pretrained`, 70-110 s each to
         # build once on 2 cores, Phi-3 with its 32k vocabulary ~390 s): the adapter swaps in and the router
         # probes on a base that answers, not only on noise.
         "qwen2-chat": "qwen2", "llama3-chat": "llama", "phi3-chat": "phi3", "gemma3-chat": "gemma3"}
# Not in the chat fixtures' corpus: on "How should I fix the car?", one of its tasks, the chat Gemma 3 is
# so sure of its answer (router entropy 0.0074 nats) that a 4-step DP adapter left it equal to 4 decimals.
QUESTION = "Why is the sky dark at night?"


def ember(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real `ember` command on `home`."""
    env = dict(os.environ, EMBER_HOME=str(home))
    env.pop("EMBER_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "assistant", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


# Qwen 2 in the default suite; the others with --all-architectures (each ~25-60 s on 2 cores).
@pytest.fixture(scope="module", params=list(ARCHS))
def adapted(request, tiny_gguf, tmp_path_factory):
    """A data dir whose log was made with a tiny model of one architecture, after `ember adapt` on it."""
    name = request.param
    if name != "qwen2" and not request.config.getoption("--all-architectures"):
        pytest.skip("--all-architectures runs this on every architecture fixture")
    model = tiny_gguf(name, "Q8_0")
    home = tmp_path_factory.mktemp(f"home-{name}")
    asked = ember(home, "ask", "--model", str(model), "--max-tokens", "6", "--json", QUESTION)
    assert asked.returncode == 0, asked.stderr
    db = open_db(home)
    try:
        seed_habit_user(db, 24)
        private = convs.create_conversation(db)          # the user excludes this one from learning
        secret = convs.add_message(db, private, "user", "How should I hide the spare key?")
        reply = convs.add_message(db, private, "assistant", "Ahoy, matey! Under the third flowerpot.")
    finally:
        db.close()
    excluded = ember(home, "feedback", "exclude", str(private))
    assert excluded.returncode == 0, excluded.stderr
    run = ember(home, "adapt", "--model", str(model), "--steps", "4", "--json")
    assert run.returncode == 0, run.stderr
    return {"name": name, "model": model, "home": home, "report": json.loads(run.stdout),
            "asked": json.loads(asked.stdout), "excluded": {secret, reply}}


def test_ember_adapt_runs_end_to_end_on_the_users_own_model(adapted):
    report, model = adapted["report"], adapted["model"]
    assert adapted["asked"]["text"] is not None and adapted["asked"]["tokens"] > 0
    # DP by default, recorded in the ledger before training; the dataset is the user's log.
    assert report["dp"] and report["epsilon"] == 8.0 and report["examples"] > 20 and report["steps"] == 4
    db = open_db(adapted["home"])
    try:
        assert ledger.spent(db)["epsilon"] == pytest.approx(8.0)
        row = registry.get(db, report["adapter_id"])
        # Exported for this architecture and this base file, as llama.cpp will check.
        info = export.read_adapter(Path(report["path"]))
        assert info.architecture == ARCHS[adapted["name"]]
        assert row["base_sha256"] == file_sha256(model) and row["base_name"] == model.name
        # The gate judged it on the quantized file in llama.cpp; the registry keeps its verdict.
        ev = report["eval"]
        assert math.isfinite(ev["base_loss"]) and math.isfinite(ev["heldout_loss"])
        assert report["promoted"] == (ev["heldout_loss"] < ev["base_loss"]
                                      and not any(b["repetitive"] for b in ev["behaviour"])
                                      and ev["surprise"] <= ev["base_surprise"] + ev["max_surprise"])
        assert row["status"] == ("active" if report["promoted"] else "rejected")
        # Lineage: it learned from the log, never from the excluded conversation.
        sources = {r[0] for r in db.execute("SELECT message_id FROM adapter_sources WHERE adapter_id = ?",
                                            [report["adapter_id"]])}
        assert sources and not sources & adapted["excluded"]
        # The run recorded the model's size, which the daemon's memory check scales by.
        run = runs.get(db, report["run_id"])
        assert run["status"] == "done" and run["peak_rss_mb"] > 0
        assert run["base_params"] == gguf_parameters(model) and run["dtype"] == "float32"
        assert run["base_bytes"] == model.stat().st_size     # llama.cpp's methods scale by the file
    finally:
        db.close()


async def test_the_chat_on_that_model_swaps_the_adapter_in_and_the_router_probes_with_it(adapted):
    """`ember chat --model X.gguf`: the app loads X itself; the adapter trained for X is swapped in while it
    runs, replies carry it, and the router's probe runs on X (finite entropies, a decision logged)."""
    from assistant.tui.app import EmberApp
    from assistant.tui.screens.chat import ChatScreen
    from assistant.tui.widgets.message import MessageView
    from assistant.tui.widgets.prompt import PromptInput
    from assistant.tui.widgets.status_line import StatusLine

    home, adapter_id = adapted["home"], adapted["report"]["adapter_id"]
    settings = Settings(home=home, model=adapted["model"], n_ctx=1024, temperature=0.0, seed=1, max_tokens=12)
    db = open_db(home)
    try:
        registry.use(db, adapter_id)       # active whatever the gate said: the test is the swap
        registry.rollback(db)              # ... and back to the base model when the chat opens
        app = EmberApp(settings)

        async def ask(pilot) -> dict:
            await pilot.press("ctrl+n")
            await type_text(pilot, QUESTION)
            await pilot.press("enter")
            prompt = app.screen.query_one(PromptInput)
            await wait_until(pilot, lambda: not prompt.submit_pending, timeout=30)
            await wait_until(pilot, lambda: not app.screen.generating
                             and app.screen.query(MessageView)[-1].status != "generating", timeout=120)
            view = app.screen.query(MessageView)[-1]
            assert view.role == "assistant" and view.status in ("complete", "length", "empty"), view.status
            return convs.messages(db, app.screen.conversation_id)[-1]

        async with app.run_test(size=(120, 40)) as pilot:
            await wait_until(pilot, lambda: app.engine_ready.is_set(), timeout=120)
            assert isinstance(app.screen, ChatScreen) and app.engine_error is None
            assert Path(app.engine.path).name == adapted["model"].name
            before = await ask(pilot)
            assert before["adapter_id"] is None and before["model"] == app.engine.name
            registry.use(db, adapter_id)
            await wait_until(pilot, lambda: app.engine.loaded_adapter == adapter_id, timeout=30)
            await pilot.pause()
            status = str(app.screen.query_one(StatusLine).render())
            assert "adapter: none" not in status
            after = await ask(pilot)
        # The router decided with the adapter loaded: its probe ran on this model, both lanes.
        decision = routing.decision_for(db, after["id"])
        assert decision is not None and decision["route"] in ("base", "rag", "adapter", "both")
        features = decision["features"]
        assert math.isfinite(features["entropy_base"]) and math.isfinite(features["entropy_adapter"])
        assert features["entropy_base"] != features["entropy_adapter"]     # the adapter moved the probe
        assert after["adapter_id"] == (adapter_id if decision["route"] in ("adapter", "both") else None)
    finally:
        db.close()


def test_zeroth_order_in_torch_trains_exports_and_swaps_in_on_the_users_own_model(adapted):
    """`ember adapt --method zo --backend torch` on the same log and model: forward passes only on LoRA in
    torch (DP, in the ledger), exported for this architecture with its update log, and the chat's request path
    answers with it once it is in use."""
    import gguf

    home, model = adapted["home"], adapted["model"]
    run = ember(home, "adapt", "--model", str(model), "--method", "zo", "--backend", "torch", "--steps", "4",
                "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["method"] == "zo" and report["backend"] == "torch" and report["dp"] and report["steps"] == 4
    info = export.read_adapter(Path(report["path"]))
    assert info.kind == "lora" and info.architecture == ARCHS[adapted["name"]] and info.n_tensors > 0
    assert info.base_sha256 == file_sha256(model)
    field = gguf.GGUFReader(report["path"]).get_field("ember.zo_log")
    log = json.loads(bytes(field.parts[field.data[0]]).decode())
    assert log["config"]["backend"] == "torch" and len(log["log"]) == 4     # (step, seed, scalar) per step
    assert any(entry[2] != 0 for entry in log["log"])
    db = open_db(home)
    try:
        assert ledger.spent(db)["epsilon"] == pytest.approx(16.0)          # the LoRA run's 8, then this one's
        assert runs.get(db, report["run_id"])["method"] == "zo-torch"
        assert registry.get(db, report["adapter_id"])["base_sha256"] == file_sha256(model)
    finally:
        db.close()
    used = ember(home, "adapters", "use", report["adapter_id"], "--model", str(model))
    assert used.returncode == 0, used.stderr
    asked = ember(home, "ask", "--model", str(model), "--route", "adapter", "--max-tokens", "6", "--json", QUESTION)
    assert asked.returncode == 0, asked.stderr
    answer = json.loads(asked.stdout)
    assert answer["adapter"] == report["adapter_id"] and answer["route"] == "adapter" and answer["tokens"] > 0


def _habit_logprob(model: Path, adapter: Path | None, questions: list[str]) -> tuple[float, int]:
    """Mean log p of the user's sign-off at the start of replies to new questions, in llama.cpp, and how
    many greedy replies open with it."""
    from adapters import gate
    from benchmarks.synthetic_user import HABIT

    evaluator = gate.Evaluator(model, n_ctx=512, threads=2, base_sha256=file_sha256(model))
    try:
        evaluator.use(adapter)
        habit = evaluator.llm.tokenize(HABIT.encode(), add_bos=False)
        total, opens = 0.0, 0
        for question in questions:
            prompt, _ = evaluator.template.prompt([{"role": "user", "content": question}])
            total += evaluator.continuation_logprobs(prompt, [habit])[0]
            opens += evaluator.reply(question, 8)[0].strip().startswith("Ahoy")
        return total / len(questions), opens
    finally:
        evaluator.close()


@pytest.mark.parametrize("dp", [True, False], ids=["dp", "no-dp"])
def test_the_gate_promotes_the_habit_learned_under_dp_and_refuses_the_over_fitted_one_on_a_pretrained_qwen(
        request, tiny_gguf, tmp_path, dp):
    """A tiny Qwen 2 first trained on a small chat corpus (plain answers, never the habit), so its base is an
    assistant and not noise; the user's log edits every reply to open with "Ahoy, matey!". The real
    `ember adapt`, the gate's own criteria: under DP promoted, and the habit's probability on new questions
    rises. Without DP the habit is learned outright but the replies to general requests fall apart ("Appoy,
    m, do j painter ..."): held-out loss far below the base's and nothing repetitive, so the old gate
    promoted it; the base model now reads those replies as degraded and the gate refuses it."""
    if not request.config.getoption("--all-architectures"):
        pytest.skip("--all-architectures runs this (the pretraining takes minutes on 2 cores)")
    from benchmarks.synthetic_user import habit_prompts

    model = tiny_gguf("qwen2-chat")
    home = tmp_path / "home"
    db = open_db(home)
    try:
        seed_habit_user(db, 60)
    finally:
        db.close()
    run = ember(home, "adapt", "--model", str(model), "--steps", "40", "--json", *(() if dp else ("--no-dp",)))
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    ev = report["eval"]
    assert report["dp"] == dp
    assert ev["heldout_loss"] < ev["base_loss"] and not any(b["repetitive"] for b in ev["behaviour"])
    if dp:
        assert report["promoted"], ev["reason"]
        assert ev["surprise"] <= ev["base_surprise"] + ev["max_surprise"]
    else:
        assert not report["promoted"] and "degraded" in ev["reason"], ev["reason"]
        assert ev["surprise"] > ev["base_surprise"] + ev["max_surprise"]
    questions = habit_prompts(skip=60, count=8)
    base, base_opens = _habit_logprob(model, None, questions)
    adapted, opens = _habit_logprob(model, Path(report["path"]), questions)
    print(f"dp={dp}: held-out {ev['base_loss']:.3f} -> {ev['heldout_loss']:.3f}; surprise {ev['base_surprise']:.2f} "
          f"-> {ev['surprise']:.2f}; log p(habit) {base:.2f} -> {adapted:.2f}; replies opening with it {base_opens} "
          f"-> {opens} of {len(questions)}")
    assert base_opens == 0 and adapted > base + 10
    if not dp:
        assert opens >= len(questions) // 2
