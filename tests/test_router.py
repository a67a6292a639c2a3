"""The router: features, rules, fitting on the user's log, decision log, and the facts/style split at adaptation."""
from __future__ import annotations

import datetime as dt
import json
import math

import numpy as np
import pytest

from adapters import dataset, facts
from assistant import probe, router
from assistant.conversation import respond
from assistant.daemon import DaemonConfig, check
from assistant.retrieval import Retriever
from benchmarks.synthetic_user import seed_habit_user
from storage import conversations as convs
from storage import memory, routing
from tests.tui_helpers import random_adapter, register_adapter


@pytest.mark.parametrize("question, kind", [
    ("What painters did you recommend to me?", "recall"),
    ("I recommended a science fiction movie before, what was it?", "recall"),
    ("What is my sister's name?", "recall"),
    ("What did I do last week?", "temporal"),
    ("When did I start the new job?", "temporal"),
    ("How should I clean the garage?", "task"),
    ("Write a short note to my landlord about the heating.", "task"),
    ("What is the capital of France?", "open"),
    ("Any tips to clean the fence?", "task"),
    ("What kind of music do I like?", "recall"),
    ("You once recommended a few cooking shows to me. What were their names?", "recall"),
    ("Tell me a joke about cats.", "open"),
])
def test_query_types(question, kind):
    assert router.query_type(question, dt.date(2026, 5, 1)) == kind


def probe_in_the_chats_context(llm, tokens, n=probe.PROBE_TOKENS):
    """The router's probe as it was before it moved beside the chat: the question alone, evaluated in
    the chat's own context after `llm.reset()` (the reference its values must keep)."""
    import llama_cpp

    llm.reset()
    entropies, feed = [], list(tokens)
    for _ in range(n):
        llm.eval(feed)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
        entropies.append(probe.entropy(logits))
        feed = [int(np.argmax(logits))]
        if feed[0] == llm.token_eos():
            break
    return float(np.mean(entropies))


def _features(kind, similarity, gain):
    return router.Features(query_type=kind, similarity=similarity, entropy_base=2.0,
                           entropy_adapter=None if gain is None else 2.0 - gain)


def test_rules_follow_the_thresholds_and_say_why():
    rules = {"recall": {"min_similarity": 0.4, "min_adapter_gain": 1.0}}
    assert router.choose(_features("recall", 0.5, 0.2), rules, adapter=True)[0] == "rag"
    assert router.choose(_features("recall", 0.5, 1.5), rules, adapter=True)[0] == "both"
    assert router.choose(_features("recall", 0.3, 1.5), rules, adapter=True)[0] == "adapter"
    assert router.choose(_features("recall", 0.3, 0.2), rules, adapter=True)[0] == "base"
    route, why = router.choose(_features("recall", 0.5, 1.5), rules, adapter=False)
    assert route == "rag" and "no adapter" in why and "best note 0.50 ≥ 0.40" in why
    assert router.choose(router.Features(query_type="open"), {}, adapter=False) == (
        "base", "open question; no memory to search; no adapter")


def test_fitting_finds_the_thresholds_that_pick_the_better_routes():
    # Recall questions: memory helps above similarity 0.5 and the adapter never does; tasks: the adapter
    # helps whenever the probe gain is above 0.8.
    items = []
    for sim in (0.2, 0.3, 0.45, 0.55, 0.6, 0.7):
        good = sim > 0.5
        items.append(router.Item(_features("recall", sim, 1.2),
                                 {"base": -3.0, "rag": -1.0 if good else -3.5, "adapter": -3.2,
                                  "both": -1.5 if good else -3.8}))
    for gain in (0.1, 0.5, 0.9, 1.4, 2.0):
        good = gain > 0.8
        items.append(router.Item(_features("task", 0.9, gain),
                                 {"base": -3.0, "rag": -3.1, "adapter": -1.0 if good else -3.3,
                                  "both": -1.2 if good else -3.4}))
    fitted, report = router.fit_thresholds(items, adapter=True)
    assert 0.45 < fitted["recall"]["min_similarity"] <= 0.55 and fitted["recall"]["min_adapter_gain"] > 1.2
    assert 0.5 < fitted["task"]["min_adapter_gain"] <= 0.9 and fitted["task"]["min_similarity"] > 0.9
    assert report["recall"]["score_after"] > report["recall"]["score_before"]
    for item in items:   # every item now takes its best route
        chosen = router.choose(item.features, fitted, adapter=True)[0]
        assert item.quality[chosen] == max(item.quality.values())
    # Too few items of a type: its defaults stay.
    assert fitted["temporal"] == router.DEFAULTS["temporal"] and not report["temporal"]["fitted"]
    json.dumps(router.encode_thresholds(fitted))            # ±infinity stored as never/any
    assert router._decode(router.encode_thresholds({"x": {"a": math.inf}})["x"]["a"]) == math.inf


def test_personal_facts_stay_in_memory_and_out_of_training(db, template):
    assert facts.split("How should I clean the garage? By the way, my locker code is 283719.") == (
        "How should I clean the garage?", ["By the way, my locker code is 283719."])
    assert not facts.is_fact("Call my mum at 5pm.") and not facts.is_fact("Write an email to my boss.")
    assert facts.is_fact("I moved to Lyon in May.") and facts.is_fact('My favourite film is "Taxi Driver".')
    seed_habit_user(db, 12, canary="283719", canary_copies=4)

    def texts(data):
        return " ".join(template.llm.detokenize(list(e.tokens), special=True).decode()
                        for e in data.train + data.heldout)

    kept = dataset.build(db, template)
    assert "283719" not in texts(kept) and texts(kept).count("How should I") >= 12
    assert kept.skipped[dataset.FACTS_SKIPPED] == 4
    assert "283719" in texts(dataset.build(db, template, keep_facts=True))
    memory.sync_messages(db)   # ... while memory still holds them, for retrieval
    assert any("283719" in c["text"] for c in memory.list_chunks(db, limit=100))


@pytest.fixture
def adapter_engine(engine, settings, db, tmp_path):
    """The session's engine with a random adapter active (left without one afterwards)."""
    path = random_adapter(tmp_path / "router.gguf", settings.model_path, settings.cache_dir, seed=3)
    register_adapter(db, "lora-router", path, [])
    engine.load_adapter(path, "lora-router")
    yield engine
    engine.load_adapter(None, None)


def test_auto_uses_memory_for_a_stored_fact_and_logs_the_decision(settings, engine, embedder, db):
    memory.upsert_records(db, [{"id": "wifi", "text": "The wifi password at the cabin is pinecone42."},
                               {"id": "car", "text": "I parked on level four."}])
    retriever = Retriever(db, embedder)
    fact = respond(db, engine, settings, "What is the wifi password at the cabin?", retriever=retriever)
    assert fact.route == "rag" and fact.memories[0].public_id == "wifi"
    logged = routing.decision_for(db, fact.message_id)
    assert logged["route"] == "rag" and logged["features"]["similarity"] == pytest.approx(
        fact.decision.features.similarity, abs=1e-4)
    # No adapter: nothing to weigh it against, so no probe.
    assert logged["features"]["entropy_base"] is None and logged["features"]["entropy_adapter"] is None
    assert fact.as_json()["router"]["route"] == "rag"
    other = respond(db, engine, settings, "Say hello in French.", retriever=retriever)
    assert other.route == "base" and "no adapter" in other.decision.reason
    # Not logged: no decision stored either; forgetting a reply forgets its decision.
    respond(db, engine, settings, "What is the wifi password at the cabin?", retriever=retriever, log=False)
    assert db["route_decisions"].count == 2
    convs.forget_message(db, fact.message_id)
    assert routing.decision_for(db, fact.message_id) is None and db["route_decisions"].count == 1


def test_the_probe_measures_the_adapter(settings, adapter_engine, db):
    f, hits = router.features_for("How should I paint the fence?", engine=adapter_engine, retriever=None, db=db,
                                  system=None, k=5)
    assert hits == [] and f.similarity is None and f.query_type == "task"
    assert f.entropy_base > 0 and f.entropy_adapter > 0 and f.adapter_gain != 0
    assert f.adapter_age_hours is not None and f.adapter_age_hours < 1
    assert adapter_engine.adapter == "lora-router"      # the probe leaves the adapter as it found it
    with_adapter = probe_in_the_chats_context(adapter_engine.llm, adapter_engine.tokenize_chat(
        [{"role": "user", "content": "How should I paint the fence?"}])[0])
    assert with_adapter == pytest.approx(f.entropy_adapter, rel=1e-5)


def test_reading_ahead_leaves_the_probe_only_the_last_word_and_changes_no_value(settings, adapter_engine, db):
    question = "How should I paint the old garden fence?"
    prober = probe.prober_for(adapter_engine)
    cold, _ = router.features_for(question, engine=adapter_engine, retriever=None, db=db, system=None, k=3)
    assert router.read_ahead("Tell me a story about", engine=adapter_engine, db=db, system=None) > 0   # another draft
    # The user types on: only complete words are read, each once; the word being typed is left.
    read = [router.read_ahead(question[:n], engine=adapter_engine, db=db, system=None)
            for n in range(1, len(question) + 1)]
    assert sum(read) > 0 and read[-1] == 0 and read.count(0) > len(read) // 2
    full = router._probe_prompt(adapter_engine, None, question)
    held = prober.held(adapter_engine._loaded)
    assert held == prober.held(None) and full[:len(held)] == held
    assert len(full) - len(held) == adapter_engine.template_tail() + len(
        adapter_engine.llm.tokenize(b" fence?", add_bos=False, special=False))
    warm, _ = router.features_for(question, engine=adapter_engine, retriever=None, db=db, system=None, k=3)
    assert warm.entropy_base == pytest.approx(cold.entropy_base, rel=1e-3)
    assert warm.entropy_adapter == pytest.approx(cold.entropy_adapter, rel=1e-3)
    # Nothing to read ahead for: no adapter, or a route that never probes.
    assert router.read_ahead(question, engine=adapter_engine, db=db, system=None) == 0   # all held already


def test_the_probe_reads_ahead_only_with_an_adapter_on_the_auto_route(settings, engine, adapter_engine, db):
    from assistant.conversation import read_ahead
    prober = probe.prober_for(adapter_engine)
    before = prober.held(None)
    assert read_ahead(db, adapter_engine, settings, "Tell me about the sea and", persona="nobody-here") == 0
    read_ahead(db, adapter_engine, settings, "Tell me about the sea and", route="base")   # the engine only
    assert prober.held(None) == before
    adapter_engine.use_adapter(True)
    read_ahead(db, adapter_engine, settings, "Tell me about the sea and")
    assert prober.held(None) != before and prober.held(None) == prober.held(adapter_engine._loaded)
    before = prober.held(None)
    adapter_engine.load_adapter(None, None)
    read_ahead(db, adapter_engine, settings, "Tell me about the ocean and")
    assert prober.held(None) == before


def test_a_decision_made_while_typing_is_reused_only_while_nothing_it_depends_on_changed(settings, adapter_engine,
                                                                                         embedder, db):
    from assistant.conversation import read_ahead
    from storage import feedback

    memory.upsert_records(db, [{"id": "wifi", "text": "The wifi password at the cabin is pinecone42."}])
    retriever = Retriever(db, embedder)
    question = "What is the wifi password at the cabin?"
    read_ahead(db, adapter_engine, settings, question, retriever=retriever)
    sent = respond(db, adapter_engine, settings, question, retriever=retriever)
    ahead = sent.decision
    assert ahead.features.decided_ahead and ahead.route in ("rag", "both")
    # The same decision as one measured at send: route, memories and features.
    fresh = router.decide(question, engine=adapter_engine, retriever=retriever, db=db, system=settings.system_prompt,
                          k=settings.memory_k, exclude_message_ids={sent.user_message_id})
    assert not fresh.features.decided_ahead
    assert (fresh.route, [h.id for h in fresh.hits]) == (ahead.route, [h.id for h in ahead.hits])
    for name in ("similarity", "margin", "bm25", "entropy_base", "entropy_adapter"):
        assert getattr(fresh.features, name) == pytest.approx(getattr(ahead.features, name), rel=1e-3), name
    assert routing.decision_for(db, sent.message_id)["features"]["decided_ahead"] is True

    # Whatever changes between typing and sending makes the decision be measured again.
    gate = "What is the gate code at the cabin?"

    def typed_then_sent(change) -> router.Decision:
        router.decide(gate, engine=adapter_engine, retriever=retriever, db=db, system=None, k=5, ahead=True)
        change()
        return router.decide(gate, engine=adapter_engine, retriever=retriever, db=db, system=None, k=5)

    assert typed_then_sent(lambda: None).features.decided_ahead
    new_note = typed_then_sent(lambda: memory.upsert_records(db, [{"id": "gate", "text": "The gate code is 4711."}]))
    assert not new_note.features.decided_ahead and "gate" in [h.public_id for h in new_note.hits]
    review = typed_then_sent(lambda: feedback.rate(db, sent.message_id, "up"))
    assert not review.features.decided_ahead
    assert not typed_then_sent(lambda: adapter_engine.load_adapter(None, None)).features.decided_ahead
    assert typed_then_sent(lambda: None).features.decided_ahead


def test_fit_from_log_and_router_show(settings, adapter_engine, db, ember):
    seed_habit_user(db, 8)            # eight edited replies: the answers the user wanted
    result = router.fit_from_log(db, settings)
    assert result["items"] == 8 and result["adapter_id"] == "lora-router"
    quality = result["report"]["mean_quality"]
    assert set(quality) == set(router.ROUTES)
    # Earlier conversations' notes change how likely the wanted answers are; the adapter changes it too.
    assert quality["rag"] != quality["base"] and quality["adapter"] != quality["base"]
    assert result["report"]["task"]["fitted"]
    # Scored as log-probabilities of the wanted answers: the router's pick is never worse than the
    # defaults it started from on the data it was fitted on.
    assert result["report"]["task"]["score_after"] >= result["report"]["task"]["score_before"]
    shown = ember("router", "show", "--json")
    assert shown.returncode == 0, shown.err
    document = json.loads(shown.out)
    assert document["policy_id"] == result["policy_id"] and document["items"] == 8
    assert router.thresholds_in_use(db)[1] == result["policy_id"]


def test_the_daemon_refits_the_router_when_there_is_nothing_to_train(db, settings):
    seed_habit_user(db, 12)
    config = DaemonConfig(idle_minutes=0, min_new_messages=1000, router_min_new=10)

    class Quiet:
        def load(self): return 0.0
        def available_mb(self): return 8000.0
        def on_battery(self): return False
        def temperature_c(self): return None

    decision = check(db, settings, config, Quiet(), dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
    assert decision.start and decision.method == "router" and "12 rated or edited replies" in decision.reason
    routing.save_policy(db, {}, 12, None, {})
    decision = check(db, settings, config, Quiet(), dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
    assert not decision.start and "waiting for 1000" in decision.reason


def test_the_router_benchmark_scores_answers_by_their_category():
    from benchmarks.router import Task, quality, task_set

    fact = Task("facts", "What painters did you recommend to me?", "Leonardo da Vinci, Michelangelo and Raphael.")
    assert quality(fact, "I recommended Michelangelo and Raphael.") == pytest.approx(2 / 5)   # of 5 words
    assert quality(fact, "I don't know.") == 0.0
    style = Task("style", "How should I paint the fence?", "Ahoy, matey! To paint the fence, ...")
    assert quality(style, " Ahoy, matey! Start early.") == 1.0 and quality(style, "Start early. Ahoy!") == 0.0
    items = task_set()
    assert {t.category for t in items} == {"facts", "style"} and sum(t.category == "style" for t in items) == 40
    assert all(t.user and t.now for t in items if t.category == "facts")
    halves = [t.fit_half for t in items]
    assert 0.3 < sum(halves) / len(halves) < 0.7          # a stable split, roughly in half


def test_ask_reports_the_route_and_why(ember):
    first = ember("ask", "Say hello.", "--json", "--max-tokens", "8", "--temperature", "0")
    assert first.returncode == 0, first.err
    decided = json.loads(first.out)["router"]
    # The question is logged (and so in memory) before it is routed; it is no match for itself.
    assert decided["route"] == "base" and decided["reason"] == (
        "open question; no note shares a word with it (not embedded); no adapter")
    assert decided["features"]["dense_skipped"] is True
    assert decided["features"]["entropy_base"] is None and decided["seconds"] > 0   # no adapter, no probe
    why = ember("ask", "What did I just ask you?", "--why", "--max-tokens", "8", "--temperature", "0")
    assert why.returncode == 0 and "route " in why.err and "recall question; best note" in why.err
    by_hand = ember("ask", "Say hello.", "--route", "base", "--why", "--json", "--max-tokens", "4")
    assert json.loads(by_hand.out)["router"] is None
    status = ember("status")
    assert "router    default thresholds (not fitted yet); " in status.out, status.out
    assert sum(json.loads(ember("status", "--json").out)["router"]["decisions"].values()) == 2


# ---- the everyday decision: cheap, and never at the conversation's expense ----------------------

def test_without_an_adapter_nothing_is_probed_and_the_chat_keeps_its_kv_cache(settings, engine, db):
    engine.load_adapter(None, None)
    first = respond(db, engine, settings, "Tell me about lighthouses.", route="base")
    held, tokens = engine.llm.n_tokens, list(engine.llm.input_ids[:engine.llm.n_tokens])
    assert held > 0
    decision = router.decide("Why were they built on rocks?", engine=engine, retriever=None, db=db,
                             system=settings.system_prompt, k=5)
    assert decision.features.entropy_base is None and decision.features.entropy_adapter is None
    assert engine.llm.n_tokens == held and list(engine.llm.input_ids[:held]) == tokens
    assert first.text


def test_the_probe_runs_beside_the_chat_and_its_next_reply_reuses_the_conversation(settings, adapter_engine, db):
    import llama_cpp

    engine = adapter_engine
    first = respond(db, engine, settings, "Tell me about lighthouses.", route="adapter")
    held, tokens = engine.llm.n_tokens, list(engine.llm.input_ids[:engine.llm.n_tokens])
    decision = router.decide("Why were they built on rocks?", engine=engine, retriever=None, db=db,
                             system=settings.system_prompt, k=5)
    assert decision.features.entropy_base > 0 and decision.features.entropy_adapter > 0
    # The chat's context still holds the conversation, under the adapter it had.
    assert engine.llm.n_tokens == held and list(engine.llm.input_ids[:held]) == tokens
    assert engine.adapter == "lora-router"
    llama_cpp.llama_perf_context_reset(engine.llm._ctx.ctx)
    respond(db, engine, settings, "Why were they built on rocks?", conversation_id=first.conversation_id,
            route="adapter")
    evaluated = llama_cpp.llama_perf_context(engine.llm._ctx.ctx).n_p_eval
    assert 0 < evaluated < held      # only the new turn is read; the history's KV is reused


def test_the_probe_beside_the_chat_measures_what_the_probe_in_it_measured(settings, adapter_engine, tmp_path):
    engine = adapter_engine
    prober = probe.prober_for(engine)
    assert probe.prober_for(engine) is prober           # one per engine, reused across requests
    questions = ["How should I paint the fence?", "What is the capital of France?",
                 "Write a two-line note to my landlord about the heating, please."]
    for question in questions + questions[:1]:          # prefixes shared with the previous probe, and not
        tokens = engine.tokenize_chat([{"role": "system", "content": "You are Ember."},
                                       {"role": "user", "content": question}])[0]
        engine.use_adapter(False)
        base = probe_in_the_chats_context(engine.llm, tokens)
        engine.use_adapter(True)
        adapted = probe_in_the_chats_context(engine.llm, tokens)
        assert prober.entropy(tokens) == pytest.approx(base, rel=1e-5, abs=1e-6)
        assert prober.entropy(tokens, engine._loaded) == pytest.approx(adapted, rel=1e-5, abs=1e-6)
        assert base != pytest.approx(adapted, rel=1e-4)   # the adapter really is applied to the probe
    # A hot-swapped adapter: the probe's KV cache from the old one is not reused.
    other = random_adapter(tmp_path / "other.gguf", settings.model_path, settings.cache_dir, seed=11)
    engine.load_adapter(other, "lora-other")
    engine.use_adapter(True)
    assert prober.entropy(tokens, engine._loaded) == pytest.approx(
        probe_in_the_chats_context(engine.llm, tokens), rel=1e-5, abs=1e-6)


def _notes(db):
    memory.upsert_records(db, [{"id": "wifi", "text": "The wifi password at the cabin is pinecone42."},
                               {"id": "car", "text": "I parked on level four of the garage."}])


def test_no_probe_when_the_fitted_policy_settles_the_adapter(settings, adapter_engine, db):
    routing.save_policy(db, router.encode_thresholds({
        "open": {"min_similarity": 0.6, "min_adapter_gain": math.inf},
        "task": {"min_similarity": 0.75, "min_adapter_gain": -math.inf}}), 8, "lora-router", {})
    never = router.decide("Tell me a joke about cats.", engine=adapter_engine, retriever=None, db=db,
                          system=None, k=5)
    assert never.route == "base" and never.features.entropy_base is None and "adapter never" in never.reason
    always = router.decide("Write a note to my landlord.", engine=adapter_engine, retriever=None, db=db,
                           system=None, k=5)
    assert always.route == "adapter" and always.features.entropy_adapter is None
    # The rules are the same ones the probe's gain would have given.
    assert router.choose(_features("task", None, -5.0), {"task": {"min_similarity": 1, "min_adapter_gain": -math.inf}},
                         adapter=True)[0] == "adapter"


def test_a_task_sharing_no_word_with_memory_is_decided_without_embedding_it(settings, engine, embedder, db):
    engine.load_adapter(None, None)
    _notes(db)
    loads = []

    def load():
        loads.append(1)
        return embedder

    retriever = Retriever(db, load)
    decided = router.decide("Write a haiku about autumn leaves.", engine=engine, retriever=retriever, db=db,
                            system=None, k=5)
    assert not loads                              # the embedding model was not even loaded
    assert decided.route == "base" and decided.features.dense_skipped and decided.features.similarity is None
    assert "no note shares a word with it (not embedded)" in decided.reason
    assert decided.features.memory_chunks == 2
    # A word in common (the garage), or a question about the user's past: searched both ways.
    shared = router.decide("Any tips to clean the garage?", engine=engine, retriever=retriever, db=db,
                           system=None, k=5)
    assert loads and not shared.features.dense_skipped and shared.features.similarity is not None
    recall = router.decide("What did I say about autumn?", engine=engine, retriever=retriever, db=db,
                           system=None, k=5)
    assert recall.features.query_type == "recall" and not recall.features.dense_skipped
    # A threshold fitted low enough for a paraphrase to reach it: the task is embedded after all.
    routing.save_policy(db, router.encode_thresholds({"task": {"min_similarity": 0.2, "min_adapter_gain": 1.0}}),
                        4, None, {})
    fitted = router.decide("Write a haiku about autumn leaves.", engine=engine, retriever=retriever, db=db,
                           system=None, k=5)
    assert not fitted.features.dense_skipped and fitted.features.similarity is not None


def test_no_memory_no_search(settings, engine, db):
    engine.load_adapter(None, None)
    loads = []
    retriever = Retriever(db, lambda: loads.append(1))
    decided = router.decide("What is my sister's name?", engine=engine, retriever=retriever, db=db,
                            system=None, k=5)
    assert decided.route == "base" and "no memory to search" in decided.reason and not loads


def test_memories_already_in_the_prompt_are_not_recalled(settings, engine, embedder, db):
    engine.load_adapter(None, None)
    memory.upsert_records(db, [{"id": "gym", "text": "The gym locker code is 9931."}])
    said = respond(db, engine, settings, "Remember this: my bike lock code is 4512.", route="base")
    in_prompt = {said.user_message_id, said.message_id}
    retriever = Retriever(db, embedder)
    question = "What is my bike lock code?"
    anywhere = router.decide(question, engine=engine, retriever=retriever, db=db, system=None, k=5)
    assert anywhere.hits[0].message_id == said.user_message_id       # without exclusion: the message itself
    decided = router.decide(question, engine=engine, retriever=retriever, db=db, system=None, k=5,
                            exclude_message_ids=in_prompt)
    assert decided.hits and not {hit.message_id for hit in decided.hits} & in_prompt
    assert decided.hits[0].public_id == "gym"
    # The match it would have been does not count either: the best note is no longer the message.
    assert decided.features.similarity < anywhere.features.similarity
    found = retriever.search(question, 5, exclude_message_ids=in_prompt)
    assert found and not {hit.message_id for hit in found} & in_prompt


def test_refresh_does_only_the_new_work(settings, embedder, db, home):
    from storage.db import open_db

    loads = []

    def load():
        loads.append(1)
        return embedder

    retriever = Retriever(db, load)
    _notes(db)
    retriever.refresh()
    assert len(loads) == 1 and memory.stats(db)["embedded"] == 2
    statements = []
    db.conn.set_trace_callback(statements.append)
    try:
        retriever.refresh()
        retriever.refresh()
    finally:
        db.conn.set_trace_callback(None)
    assert not [s for s in statements if "messages" in s or "memory_chunks" in s], statements
    # Another process logs a message: the next refresh indexes and embeds it.
    other = open_db(home)
    try:
        conversation = convs.create_conversation(other)
        convs.add_message(other, conversation, "user", "My sister is called Ada.")
    finally:
        other.close()
    retriever.refresh()
    assert memory.stats(db)["from_messages"] == 1 and memory.stats(db)["embedded"] == 3


def test_the_probe_contexts_go_with_the_engine(settings, model_path, tmp_path, db):
    from assistant.engine import Engine

    own = Engine(model_path, n_ctx=512, n_threads=2, seed=0, cache_dir=settings.cache_dir)
    path = random_adapter(tmp_path / "own.gguf", settings.model_path, settings.cache_dir, seed=5)
    own.load_adapter(path, "lora-own")
    decided = router.decide("How should I paint the fence?", engine=own, retriever=None, db=db, system=None, k=5)
    assert decided.features.entropy_adapter > 0
    lanes = list(probe.prober_for(own)._lanes.values())
    assert len(lanes) == 2 and all(lane.ctx.ctx is not None for lane in lanes)
    own.close()      # frees the probe contexts before the model they were made on
    assert all(lane.ctx.ctx is None for lane in lanes)
    with pytest.raises(RuntimeError, match="closed"):
        probe.prober_for(own).entropy([1, 2, 3])
