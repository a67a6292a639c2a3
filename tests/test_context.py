"""The context budget: the model's own limits, what is left out and said so, and memories that fit."""
from __future__ import annotations

import json

import pytest

from assistant.engine import Engine
from storage import conversations as convs
from storage.db import open_db
from tests.gguf_variants import variant


@pytest.fixture(scope="session")
def variants(tmp_path_factory, model_path):
    """Copies of the bundled model: short training context, no chat template, a broken one."""
    folder = tmp_path_factory.mktemp("variants")
    made = {}

    def get(name):
        if name not in made:
            target = folder / f"{name}.gguf"
            if name == "ctx1k":
                variant(model_path, target, set_ints={"{arch}.context_length": 1024})
            elif name == "no-template":
                variant(model_path, target, remove=("tokenizer.chat_template",))
            elif name == "broken-template":
                variant(model_path, target, set_strings={"tokenizer.chat_template": "{% for m in messages %}{{ m.content }"})
            made[name] = target
        return made[name]

    return get


def test_the_context_is_capped_at_the_training_context(variants):
    engine = Engine(variants("ctx1k"), n_ctx=4096, n_threads=2)
    assert engine.n_ctx == 1024
    engine.close()


def test_llama_cpp_log_lines_never_reach_the_terminal(ember, variants):
    result = ember("ask", "--model", str(variants("ctx1k")), "--route", "base", "--max-tokens", "4", "Hi")
    assert result.returncode == 0, result.err
    assert "n_ctx" not in result.err and "llama_" not in result.err and "llama_" not in result.out


def test_a_model_without_a_chat_template_says_so_once(ember, variants):
    result = ember("ask", "--model", str(variants("no-template")), "--route", "base", "--max-tokens", "4", "Hi")
    assert result.returncode == 0, result.err
    assert result.err.count("no chat template") == 1
    out = json.loads(ember("ask", "--json", "--model", str(variants("no-template")), "--route", "base",
                           "--max-tokens", "4", "Hi").out)
    assert any("no chat template" in w for w in out["warnings"])


def test_a_broken_chat_template_is_one_line_naming_the_model(ember, variants, home):
    result = ember("ask", "--model", str(variants("broken-template")), "--route", "base", "Hi there")
    assert result.returncode != 0
    assert result.err.count("\n") == 1 and "broken-template.gguf" in result.err and "chat template" in result.err
    assert "internal error" not in result.err and "Traceback" not in result.err
    db = open_db(home)   # logged first: the question survives the model's failure
    assert [m["content"] for m in db["messages"].rows] == ["Hi there"]
    db.close()


def test_the_default_reply_length_adapts_to_a_small_context(ember):
    result = ember("ask", "--route", "base", "hi", env={"EMBER_N_CTX": "512"})
    assert result.returncode == 0, result.err


def test_an_explicit_reply_length_too_long_for_the_context_is_one_line(ember):
    result = ember("ask", "--route", "base", "--max-tokens", "600", "hi", env={"EMBER_N_CTX": "512"})
    assert result.returncode != 0 and "--max-tokens" in result.err and result.err.count("\n") == 1


def test_memories_are_trimmed_to_fit_never_refused(ember, tmp_path):
    # Many long notes that match the question; a question that fits the small context on its own.
    notes = tmp_path / "notes.jsonl"
    notes.write_text("".join(json.dumps({"id": f"n{i}", "text": f"My garden plan {i}: " + "tomatoes and basil "
                                         "along the fence, watered every morning. " * 6}) + "\n" for i in range(20)))
    assert ember("memory", "import", str(notes)).returncode == 0
    question = "What is my garden plan? " + "Tell me about the tomatoes and the basil by the fence. " * 12
    env = {"EMBER_N_CTX": "512"}
    base = ember("ask", "--json", "--route", "base", "--max-tokens", "64", question, env=env)
    assert base.returncode == 0, base.err
    for route in ("rag", "auto"):
        result = ember("ask", "--json", "--route", route, "--max-tokens", "64", question, env=env)
        assert result.returncode == 0, (route, result.err)
        assert json.loads(result.out)["prompt_tokens"] + 64 <= 512


def test_old_turns_left_out_are_said_out_loud(ember, home):
    first = json.loads(ember("ask", "--json", "--route", "base", "--max-tokens", "8",
                             "The code word is PELICAN. " + "Some filler about my day. " * 25,
                             env={"EMBER_N_CTX": "512"}).out)
    cid = first["conversation_id"]
    for _ in range(3):
        ember("ask", "--json", "--route", "base", "--max-tokens", "8", "--conversation", str(cid),
              "Here is more about my day. " * 25, env={"EMBER_N_CTX": "512"})
    result = ember("ask", "--json", "--route", "base", "--max-tokens", "32", "--conversation", str(cid),
                   "What was the code word?", env={"EMBER_N_CTX": "512"})
    out = json.loads(result.out)
    assert out["dropped_messages"] > 0
    plain = ember("ask", "--route", "base", "--max-tokens", "8", "--conversation", str(cid), "And again?",
                  env={"EMBER_N_CTX": "512"})
    assert "no longer fit" in plain.err


def test_memories_never_repeat_a_message_already_in_the_prompt(home, engine, settings):
    from assistant.conversation import respond
    from assistant.retrieval import retriever_for

    db = open_db(home)
    retriever = retriever_for(settings, db)
    first = respond(db, engine, settings, "My locker code at the gym is 4417.", route="base", retriever=retriever)
    second = respond(db, engine, settings, "What is my locker code at the gym?", route="rag",
                     conversation_id=first.conversation_id, retriever=retriever)
    in_prompt = {m["id"] for m in convs.messages(db, first.conversation_id)}
    assert not [hit for hit in second.memories if hit.message_id in in_prompt]
    # In another conversation the same note is not in the prompt, so memory brings it.
    third = respond(db, engine, settings, "What is my locker code at the gym?", route="rag", retriever=retriever)
    assert first.user_message_id in [hit.message_id for hit in third.memories]
    db.close()


def test_memories_follow_the_history_so_the_prompt_prefix_stays_the_same(settings):
    from assistant.conversation import Question, prompt_messages
    from assistant.retrieval import Hit

    history = [{"role": "user", "content": "Tell me about lighthouses."},
               {"role": "assistant", "content": "They guide ships."}]
    question = Question("Who kept them?", 1, 3, history, [1, 2])
    note = Hit(id=1, text="My grandfather kept a lighthouse.", score=1.0, source="import", source_id="n1",
               message_id=None, time="2024-01-01", speaker=None)
    with_notes = prompt_messages(settings, question, [note])
    without = prompt_messages(settings, question, [])
    # The history comes first, unchanged, on every route: llama.cpp reuses its KV cache across turns.
    assert with_notes[:2] == without[:2] == history
    assert with_notes[2]["role"] == "system" and "grandfather" in with_notes[2]["content"]
    assert with_notes[-1] == {"role": "user", "content": "Who kept them?"}
    inline = prompt_messages(settings, question, [note], inline=True)
    assert inline[:2] == history and "grandfather" in inline[-1]["content"] and inline[-1]["role"] == "user"


def test_a_template_that_refuses_a_later_system_message_gets_the_notes_in_the_question(home, engine, settings,
                                                                                      monkeypatch):
    from assistant.conversation import respond
    from assistant.retrieval import retriever_for

    db = open_db(home)
    retriever = retriever_for(settings, db)
    first = respond(db, engine, settings, "My locker code at the gym is 4417.", route="base", retriever=retriever)
    respond(db, engine, settings, "I also keep my bike at the gym.", route="base", retriever=retriever)
    real = engine.template._prompt

    def alternating_only(messages):
        if any(m["role"] == "system" for m in messages[1:]):
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")
        return real(messages=messages)

    monkeypatch.setattr(engine.template, "_prompt", lambda **kw: alternating_only(kw["messages"]))
    second = respond(db, engine, settings, "Where is my bike, and what was the gym code I gave before?",
                     route="rag", conversation_id=first.conversation_id, retriever=retriever)
    assert second.status in ("complete", "length") and second.memories   # the notes went in, inline
    db.close()
