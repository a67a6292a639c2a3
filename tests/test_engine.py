"""The engine on the real bundled model: template, streaming, stops, seeds, cancel, context budget."""
from __future__ import annotations

import threading

import pytest

from assistant.engine import Engine, check_gguf
from assistant.errors import InvalidInput, ModelInvalid, ModelNotFound, PromptTooLong

HELLO = [{"role": "user", "content": "Say hello."}]


def test_chat_template_comes_from_the_gguf_metadata(engine):
    template = engine.llm.metadata["tokenizer.chat_template"]
    assert "<|im_start|>" in template
    tokens, stop = engine.tokenize_chat(HELLO)
    prompt = engine.llm.detokenize(tokens, special=True).decode()
    assert prompt.endswith("<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n")
    assert stop == ["<|im_end|>"]


def test_greedy_generation_is_repeatable_and_streams_the_whole_text(engine):
    first = engine.generate(HELLO, max_tokens=24, temperature=0.0)
    pieces = list(first)
    second = engine.generate(HELLO, max_tokens=24, temperature=0.0)
    list(second)
    assert len(pieces) > 3, "the reply should arrive in pieces, not at once"
    assert "".join(pieces) == first.text == second.text
    assert first.text.strip()
    assert 0 < first.tokens <= 24 + 1
    assert first.first_token_seconds is not None and first.first_token_seconds <= first.seconds


def test_seeded_sampling_is_repeatable(engine):
    texts = set()
    for _ in range(2):
        gen = engine.generate(HELLO, max_tokens=16, temperature=1.0, seed=42)
        list(gen)
        texts.add(gen.text)
    assert len(texts) == 1


def test_unseeded_sampling_varies(engine):
    texts = set()
    for _ in range(4):
        gen = engine.generate([{"role": "user", "content": "Invent a name for a cat."}], max_tokens=12,
                              temperature=1.0)
        list(gen)
        texts.add(gen.text)
    assert len(texts) > 1


def test_reply_ends_at_the_templates_end_of_turn(engine):
    gen = engine.generate([{"role": "user", "content": "Reply with just the word yes."}],
                          max_tokens=200, temperature=0.0)
    list(gen)
    assert gen.finish_reason == "stop"
    assert "<|im_end|>" not in gen.text and "<|im_start|>" not in gen.text


def test_max_tokens_bounds_the_reply(engine):
    gen = engine.generate([{"role": "user", "content": "Write a long story about a dragon."}],
                          max_tokens=10, temperature=0.0)
    list(gen)
    assert gen.finish_reason == "length"
    assert gen.tokens == 10


def test_cancel_stops_the_reply_and_keeps_the_partial_text(engine):
    cancel = threading.Event()
    gen = engine.generate([{"role": "user", "content": "Write a long story about a dragon."}],
                          max_tokens=200, temperature=0.0, cancel=cancel)
    pieces = []
    for piece in gen:
        pieces.append(piece)
        if len(pieces) == 5:
            cancel.set()
    assert gen.finish_reason == "cancelled"
    assert gen.text == "".join(pieces) and len(pieces) <= 7
    assert gen.tokens < 20


def test_long_history_is_trimmed_oldest_first_and_never_overflows(engine):
    history = []
    for i in range(12):
        history += [{"role": "user", "content": f"Fact {i}: " + "lorem ipsum dolor " * 40},
                    {"role": "assistant", "content": "Noted."}]
    messages = [{"role": "system", "content": "You are terse."}] + history + \
        [{"role": "user", "content": "What was the last fact number?"}]
    tokens, _stop, dropped = engine.fit(messages, max_tokens=256)
    assert dropped > 0 and dropped % 2 == 0, "whole exchanges are dropped, oldest first"
    assert len(tokens) <= engine.n_ctx - 256
    prompt = engine.llm.detokenize(tokens, special=True).decode()
    assert prompt.startswith("<|im_start|>system\nYou are terse.")   # system prompt is kept
    assert "Fact 11:" in prompt and "Fact 0:" not in prompt
    assert prompt.rstrip().endswith("What was the last fact number?<|im_end|>\n<|im_start|>assistant")
    # Keeping one more exchange would not have fitted: the trim is as small as it can be.
    longer, _ = engine.tokenize_chat(messages[:1] + history[dropped - 2:] + messages[-1:])
    assert len(longer) > engine.n_ctx - 256
    gen = engine.generate(messages, max_tokens=256, temperature=0.0)
    list(gen)
    assert gen.dropped_messages == dropped and gen.prompt_tokens + gen.tokens <= engine.n_ctx


def test_a_prompt_longer_than_the_context_is_refused(engine):
    with pytest.raises(PromptTooLong, match="context holds 2048"):
        engine.generate([{"role": "user", "content": "word " * 3000}], max_tokens=64)
    with pytest.raises(InvalidInput, match="max-tokens"):
        engine.generate(HELLO, max_tokens=engine.n_ctx)


def test_missing_directory_and_corrupt_models_are_refused(tmp_path, model_path):
    with pytest.raises(ModelNotFound):
        check_gguf(tmp_path / "nope.gguf")
    with pytest.raises(ModelInvalid, match="directory"):
        check_gguf(tmp_path)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x00" * 1024)
    with pytest.raises(ModelInvalid, match="not a GGUF"):
        check_gguf(junk)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(model_path.read_bytes()[:4096])
    with pytest.raises(ModelInvalid, match="could not load"):
        Engine(truncated, n_ctx=512)


def held_tokens(engine: Engine) -> list[int]:
    return [int(t) for t in engine.llm.input_ids[:engine.llm.n_tokens]]


def test_a_draft_read_ahead_leaves_the_reply_only_its_last_word(settings, engine, db):
    """The chat reads a message while it is typed (conversation.read_ahead): sending it then evaluates
    only its last word and the template's tail, and nothing of the draft is stored."""
    import dataclasses

    from assistant.conversation import read_ahead, respond
    from storage import conversations as convs

    short = dataclasses.replace(settings, max_tokens=24, temperature=0.0, seed=0)
    first = respond(db, engine, short, "Tell me about lighthouses in one sentence.", route="base")
    conversation = first.conversation_id
    stored = len(convs.messages(db, conversation))
    question = "Why were they built on rocks?"
    read = [read_ahead(db, engine, short, question[:n], conversation_id=conversation, route="base")
            for n in range(1, len(question) + 1)]
    # The first key reads the reply's end and the user's turn header, before any word is complete;
    # each complete word is read once after that, and the word being typed is left.
    assert read[0] > 0 and read[-1] == 0 and read.count(0) > len(read) // 2
    assert len(convs.messages(db, conversation)) == stored        # a draft is read, never stored
    held = held_tokens(engine)
    evaluated: list[int] = []
    real_eval = engine.llm.eval
    engine.llm.eval = lambda tokens: (evaluated.append(len(tokens)), real_eval(tokens))[1]
    try:
        second = respond(db, engine, short, question, conversation_id=conversation, route="base")
    finally:
        del engine.llm.eval
    last_word = len(engine.llm.tokenize(b" rocks?", add_bos=False, special=False))
    assert evaluated[0] == second.prompt_tokens - len(held) == last_word + engine.template_tail()
    assert second.status in ("complete", "length") and second.text


def test_a_draft_on_the_rag_route_is_read_with_its_memories_and_sending_embeds_nothing(settings, engine, db,
                                                                                         embedder):
    """On the rag route the chat reads the draft with the memories recalled for it, the word being
    typed too, so sending it evaluates only its last word and the template's tail; the notes of the
    last exchange are embedded while the user types, and the message just sent (already in the
    prompt) waits: sending embeds nothing but the question."""
    import dataclasses

    from assistant.conversation import read_ahead, respond
    from assistant.retrieval import Retriever
    from storage import memory

    memory.upsert_records(db, [
        {"id": "n1", "text": "The lighthouse on Skerry Rock was built on granite in 1843."},
        {"id": "n2", "text": "My sister keeps bees behind the old lighthouse."},
        {"id": "n3", "text": "Rocks were chosen because sand shifts in storms."}])
    retriever = Retriever(db, embedder)
    short = dataclasses.replace(settings, max_tokens=24, temperature=0.0, seed=0)
    first = respond(db, engine, short, "Tell me about lighthouses in one sentence.", route="rag",
                    retriever=retriever)
    question = "Why were lighthouses built on rocks?"
    for n in [0, *(i + 1 for i, ch in enumerate(question) if ch == " "), len(question)]:   # word by word
        read_ahead(db, engine, short, question[:n], conversation_id=first.conversation_id, route="rag",
                   retriever=retriever)
    assert memory.unembedded(db) == []          # the first exchange's notes got vectors while typing
    held = held_tokens(engine)
    evaluated: list[int] = []
    encoded: list[int] = []
    real_eval, real_encode = engine.llm.eval, embedder.encode
    engine.llm.eval = lambda tokens: (evaluated.append(len(tokens)), real_eval(tokens))[1]
    embedder.encode = lambda texts, **kw: (encoded.append(len(texts)), real_encode(texts, **kw))[1]
    try:
        second = respond(db, engine, short, question, conversation_id=first.conversation_id, route="rag",
                         retriever=retriever)
    finally:
        del engine.llm.eval, embedder.encode
    assert second.memories
    last_word = len(engine.llm.tokenize(b" rocks?", add_bos=False, special=False))
    assert evaluated[0] == second.prompt_tokens - len(held) == last_word + engine.template_tail()
    assert encoded == []                        # the question's own note waits for the next read-ahead
    assert [chunk for chunk, _ in memory.unembedded(db)] != []
    assert second.first_token_seconds is not None and second.status in ("complete", "length")


def test_a_draft_the_router_sends_to_memory_is_read_with_its_memories_and_decided_while_typed(settings, engine,
                                                                                                db, embedder):
    """On auto (the default), the chat decides the route for the draft while it is typed and reads it
    as that route will answer it: a question the router sends to memory is read with its memories,
    so sending it evaluates only its last word and the template's tail, and the decision is reused,
    not measured again (the old read-ahead left the memories out, and the reply re-read everything
    after the system prompt)."""
    import dataclasses

    from assistant.conversation import read_ahead, respond
    from assistant.retrieval import Retriever
    from storage import memory

    memory.upsert_records(db, [
        {"id": "wifi", "text": "The wifi password at the cabin is pinecone42."},
        {"id": "car", "text": "I parked the car on level four of the station garage."}])
    retriever = Retriever(db, embedder)
    short = dataclasses.replace(settings, max_tokens=8, temperature=0.0, seed=0)
    first = respond(db, engine, short, "Say hello in French.", retriever=retriever)
    assert first.route == "base"
    question = "What is the wifi password at the cabin?"
    for n in [0, *(i + 1 for i, ch in enumerate(question) if ch == " "), len(question)]:   # word by word
        read_ahead(db, engine, short, question[:n], conversation_id=first.conversation_id, retriever=retriever)
    held = held_tokens(engine)
    evaluated: list[int] = []
    real_eval = engine.llm.eval
    engine.llm.eval = lambda tokens: (evaluated.append(len(tokens)), real_eval(tokens))[1]
    try:
        second = respond(db, engine, short, question, conversation_id=first.conversation_id, retriever=retriever)
    finally:
        del engine.llm.eval
    assert second.route == "rag" and second.memories[0].public_id == "wifi"
    last_word = len(engine.llm.tokenize(b" cabin?", add_bos=False, special=False))
    assert evaluated[0] == second.prompt_tokens - len(held) == last_word + engine.template_tail()
    assert second.decision.features.decided_ahead


def test_reading_ahead_stops_when_asked_and_goes_on_from_where_it_stopped(engine):
    """A message sent (or typed on) while a long draft is still being read waits at most one slice:
    the read stops when asked, keeps what it read, and the next read goes on from there."""
    from assistant.engine import READ_AHEAD_SLICE

    engine.llm.reset()
    messages = [{"role": "user", "content": " ".join(f"note {i} is about the lighthouse keeper's day"
                                                       for i in range(30))}]
    whole = engine.tokenize_chat(messages)[0]
    head = len(whole) - engine.template_tail()
    assert head > 3 * READ_AHEAD_SLICE
    asked: list[int] = []
    first = engine.read_ahead(messages, 16, stop=lambda: asked.append(engine.llm.n_tokens) or True)
    assert first == READ_AHEAD_SLICE and asked == [READ_AHEAD_SLICE]
    assert held_tokens(engine) == whole[:READ_AHEAD_SLICE]
    rest = engine.read_ahead(messages, 16)
    assert first + rest == head and held_tokens(engine) == whole[:head]
    assert engine.read_ahead(messages, 16, stop=lambda: True) == 0


def test_an_incognito_draft_is_read_with_the_history_the_chat_holds(settings, engine, db):
    from assistant.conversation import read_ahead
    from storage import conversations as convs

    history = [{"role": "user", "content": "My code word is heliotrope."},
               {"role": "assistant", "content": "Noted: heliotrope."}]
    assert read_ahead(db, engine, settings, "What was my code", history=history) > 0
    prompt = engine.tokenize_chat([*([{"role": "system", "content": settings.system_prompt}]
                                     if settings.system_prompt else []), *history,
                                   {"role": "user", "content": "What was my"}])[0]
    assert held_tokens(engine) == prompt[:len(prompt) - engine.template_tail()]
    assert convs.list_conversations(db) == []


def test_a_conversation_is_tokenized_once_not_again_for_every_prompt_built_from_it(engine):
    # Each turn, each word read ahead and each fit builds the prompt of the whole conversation again;
    # llama.cpp's tokenizer took 12 ms for 1,000 tokens of it, and the turn's first token waited for
    # several of these (10 turns: 70 -> 140 ms). Only text not seen before reaches the tokenizer.
    from adapters.template import ChatTemplate

    messages = [{"role": "system", "content": "You are terse."}]
    for i in range(6):
        messages += [{"role": "user", "content": f"Question {i} about <|im_end|> lighthouses?"},
                     {"role": "assistant", "content": f"Answer {i}: lighthouses guide ships. " * 5}]
    asked = [*messages, {"role": "user", "content": "And the last one?"}]
    fresh = ChatTemplate(engine.llm, name="fresh")   # nothing remembered: what the tokens must be
    expected = fresh.prompt(asked)
    calls = []
    real = engine.llm.tokenize

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    engine.tokenize_chat(messages)
    engine.llm.tokenize = counted
    try:
        assert engine.tokenize_chat(asked) == expected
        assert any(b"last one" in c for c in calls)                           # the new message: read
        assert not any(b"Question" in c or b"Answer" in c for c in calls)   # the history: remembered
        calls.clear()
        assert engine.fit(asked, 64)[0] == expected[0] and engine.count_tokens(asked[1]["content"]) > 0
        assert calls == []
    finally:
        del engine.llm.tokenize


def test_remembered_tokens_are_bounded_by_their_text_and_the_oldest_go_first(engine):
    from adapters.template import TokenCache

    cache = TokenCache(engine.llm, chars=100)
    texts = [f"message number {i} about the sea" for i in range(10)]   # 31-32 characters each
    for text in texts:
        assert list(cache(text, False, False)) == engine.llm.tokenize(text.encode(), add_bos=False, special=False)
    assert cache._held <= 100 and [key[0] for key in cache._entries] == texts[-3:]
    cache(texts[-3], False, False)                                    # used again: now the newest
    cache("one more text of about thirty chars", False, False)
    assert [key[0] for key in cache._entries] == [texts[-1], texts[-3], "one more text of about thirty chars"]
    huge = "word " * 100                                               # larger than the whole budget
    assert list(cache(huge, False, False)) == engine.llm.tokenize(huge.encode(), add_bos=False, special=False)
    assert [key[0] for key in cache._entries] == [huge]
