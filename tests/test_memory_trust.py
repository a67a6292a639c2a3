"""Memory the user can trust: corrections beat stale facts, an assistant's words are not evidence about
the user, the memory block's markup never comes back, the gate keeps memory off everyday requests, and
answers show their evidence."""
from __future__ import annotations

import json

import pytest

from assistant import evidence, router
from assistant.conversation import respond
from assistant.retrieval import Hit, Retriever, memory_message
from storage import conversations as convs
from storage import feedback, memory

BIRTHDAY = [
    {"id": "note-a", "text": "My sister's birthday is 4 May.", "time": "2025-01-10"},
    {"id": "note-b", "text": "My sister's birthday is 4 May.", "time": "2025-02-10"},
    {"id": "note-c", "text": "Correction: my sister's birthday is 9 May.", "time": "2025-03-10"},
]
QUESTION = "When is my sister's birthday?"


def _import(ember, tmp_path, records) -> None:
    notes = tmp_path / "notes.jsonl"
    notes.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    assert ember("memory", "import", str(notes)).returncode == 0


def test_a_correction_ranks_above_the_stale_fact_which_is_marked_replaced(ember, tmp_path):
    _import(ember, tmp_path, BIRTHDAY)
    found = json.loads(ember("memory", "search", QUESTION, "--json").out)
    assert found[0]["id"] == "note-c"
    stale = next(hit for hit in found if hit["id"] in ("note-a", "note-b"))
    assert stale["replaced_by"] == found[0]["chunk_id"]
    assert [hit["id"] for hit in found].count("note-a") + [hit["id"] for hit in found].count("note-b") == 1
    text = ember("memory", "search", QUESTION).out.splitlines()
    assert text[0].startswith("1. [note-c]") and "replaced by note-c" in text[1]


def test_a_correction_told_in_chat_wins_too_and_the_stale_one_stays_out_of_the_prompt(db, engine, settings, embedder):
    retriever = Retriever(db, embedder)
    for said in ("My sister's birthday is 4 May.", "Correction: my sister's birthday is 9 May."):
        respond(db, engine, settings, said, route="base", retriever=retriever)
    hits = retriever.search(QUESTION, 5)
    users = [hit for hit in hits if hit.origin == "user"]
    assert "9 May" in users[0].text
    assert next(hit for hit in users if "4 May" in hit.text).replaced_by == users[0].id
    exchange = respond(db, engine, settings, QUESTION, route="rag", retriever=retriever)
    given = [hit.text for hit in exchange.memories]
    assert any("9 May" in text for text in given) and not any("4 May" in text for text in given)


@pytest.mark.parametrize("newer, older, replaced", [
    ("Correction: my sister's birthday is 9 May.", "My sister's birthday is 4 May.", True),
    ("My locker code is 9930.", "My locker code is 4821.", True),
    ("My favourite colour is green.", "My favourite colour is blue.", True),
    ("I no longer like cats.", "I like cats.", True),
    ("Correction: my brother's birthday is 9 May.", "My sister's birthday is 4 May.", False),
    ("My sister works in Oslo.", "My sister lives in Oslo.", False),
    ("My sister's birthday is 4 May.", "My sister's birthday is 4 May.", False),
    ("I bought bread.", "My sister's birthday is 4 May.", False),
])
def test_which_statements_replace_which(newer, older, replaced):
    assert evidence.replaces(newer, older) is replaced


def _state_facts(db, engine, settings, retriever) -> list[int]:
    replies = []
    for said in ("My sister's birthday is 9 May.", "My dad's name is Viktor.", "I keep my bike in the shed."):
        replies.append(respond(db, engine, settings, said, route="base", retriever=retriever).message_id)
    return replies


def test_embers_replies_are_not_evidence_unless_asked_about_or_approved(db, engine, settings, embedder):
    retriever = Retriever(db, embedder)
    replies = _state_facts(db, engine, settings, retriever)
    for hit in retriever.search(QUESTION, 10) + retriever.search("What is my dad's name?", 10):
        assert hit.origin == "user" and hit.speaker == "user", hit
    exchange = respond(db, engine, settings, QUESTION, route="rag", retriever=retriever)
    assert exchange.memories and all(hit.speaker == "user" for hit in exchange.memories)

    said = retriever.search("What did you tell me about my sister's birthday?", 10)
    assert any(hit.message_id in replies and hit.origin == "assistant" for hit in said)
    embers = [hit for hit in said if hit.origin == "assistant"]
    assert ", Ember) " in memory_message(embers, "numbered")["content"]
    assert "Ember said: " in memory_message(embers, "prose")["content"]

    feedback.rate(db, replies[0], "up")
    feedback.rate(db, replies[1], "down")
    approved = retriever.search(QUESTION, 10)
    assert any(hit.message_id == replies[0] and hit.origin == "approved" for hit in approved)
    rejected = retriever.search("What did you tell me about my dad's name?", 10)
    assert not any(hit.message_id == replies[1] for hit in rejected)
    feedback.edit(db, replies[2], "You keep your bike in the garden shed.")
    edited = next(hit for hit in retriever.search("Where do I keep my bike?", 10) if hit.message_id == replies[2])
    assert edited.origin == "edited" and edited.text == "You keep your bike in the garden shed."


@pytest.mark.parametrize("pieces, shown", [
    (["[2026-11-29, user] My sister's", " birthday is 9 May."], "My sister's birthday is 9 May."),
    (["Her birthday is 9 May [", "1]."], "Her birthday is 9 May."),
    (["(2026-", "11-29, user) It is", " 9 May"], "It is 9 May"),
    (["Use f(x) and a list [a, b] as usual."], "Use f(x) and a list [a, b] as usual."),
])
def test_memory_block_markup_never_reaches_the_screen_or_the_log(pieces, shown):
    stream = evidence.Shown("Tell me", None, markup=True)
    out = "".join(stream.feed(piece) for piece in pieces) + stream.flush()
    assert out == stream.text
    assert " ".join(out.split()) == shown


def test_a_reply_stored_after_rag_has_no_markup_and_its_copied_notes_are_not_indexed_again(db, engine, settings,
                                                                                               embedder):
    memory.upsert_records(db, BIRTHDAY[2:])
    retriever = Retriever(db, embedder)
    retriever.refresh()
    exchange = respond(db, engine, settings, "Repeat this exactly: [2025-03-10, user] my sister's birthday is 9 May.",
                       route="rag", retriever=retriever)
    stored = next(m for m in convs.messages(db, exchange.conversation_id) if m["id"] == exchange.message_id)
    assert not evidence._HEADER.search(stored["content"]), stored["content"]
    # A reply that copies its note word for word: the copy does not become a second witness.
    conversation = convs.create_conversation(db)
    reply = convs.start_reply(db, conversation)
    memory.record_reply_memories(db, reply, [(exchange.memories[0].id, 1.0)])
    convs.finish_reply(db, reply, "Sure. Correction: my sister's birthday is 9 May. Anything else?", "complete")
    memory.sync_messages(db)
    indexed = " ".join(chunk["text"] for chunk in memory.list_chunks(db, limit=100) if chunk["message_id"] == reply)
    assert "9 May" not in indexed and "Anything else?" in indexed


EVERYDAY = ["What should I cook for dinner tonight?", "Explain how a rainbow forms.",
            "Write a haiku about autumn.", "How do I boil an egg?", "What is the capital of France?",
            "Give me three tips for sleeping better.", "Translate 'good morning' into Spanish."]


def test_everyday_requests_that_need_no_memory_get_none(db, engine, embedder):
    memory.upsert_records(db, BIRTHDAY + [
        {"id": "n-dinner", "text": "We had dinner at Jade Garden with my cousin on Friday.", "time": "2025-03-01"},
        {"id": "n-cook", "text": "I cooked lentil soup for the neighbours.", "time": "2025-03-02"},
        {"id": "n-trip", "text": "Booked the train to Oslo for the concert tonight.", "time": "2025-03-03"}])
    retriever = Retriever(db, embedder)
    retriever.refresh()
    assert router.query_type("What should I cook for dinner tonight?") == "task"
    for question in EVERYDAY:
        decision = router.decide(question, engine=engine, retriever=retriever, db=db, system=None, k=5)
        assert decision.route == "base", (question, decision.reason)
    recall = router.decide(QUESTION, engine=engine, retriever=retriever, db=db, system=None, k=5)
    assert recall.route == "rag" and "9 May" in recall.hits[0].text


def test_an_answer_shows_its_evidence_in_json_and_on_stderr(ember, tmp_path):
    _import(ember, tmp_path, BIRTHDAY)
    result = ember("ask", QUESTION, "--route", "rag", "--json", "--max-tokens", "32", "--temperature", "0")
    answer = json.loads(result.out)
    assert answer["evidence"][0] == {"memory_id": "note-c", "text": "Correction: my sister's birthday is 9 May.",
                                     "time": "2025-03-10", "conversation_id": None, "origin": "user"}
    assert "9 may" in answer["text"].lower()     # from the model, or put first because it did not say it
    plain = ember("ask", QUESTION, "--route", "rag", "--max-tokens", "32", "--temperature", "0")
    assert "“Correction: my sister's birthday is 9 May.” — you said, 2025-03-10, imported note [note-c]" in plain.err
    shown = json.loads(ember("memory", "show", "note-c", "--json").out)
    assert shown["text"] == "Correction: my sister's birthday is 9 May." and shown["time"] == "2025-03-10"


def _hit(text: str, time: str = "2025-03-10") -> Hit:
    return Hit(id=1, text=text, score=1.0, time=time, speaker="user", source="import", source_id="n", message_id=None)


def test_a_direct_recall_answer_that_misses_its_evidence_gets_it_first():
    cited = evidence.evidence_for([_hit("We met in spring. Correction: my sister's birthday is 9 May.")], QUESTION, "")
    assert cited[0].text == "Correction: my sister's birthday is 9 May."
    missing = evidence.Shown(QUESTION, cited[0], markup=True)
    text = "".join(missing.feed(piece) for piece in ["I do not ", "know when ", "that is, sorry. " * 10]) + missing.flush()
    assert text.startswith("From your notes (2025-03-10): “Correction: my sister's birthday is 9 May.”\n\nI do not")
    carried = evidence.Shown(QUESTION, cited[0], markup=True)
    text = "".join(carried.feed(piece) for piece in ["Your sister's ", "birthday is on 9 May."]) + carried.flush()
    assert text == "Your sister's birthday is on 9 May." and carried.prefix is None
    other = evidence.Shown("Write a poem about my sister.", cited[0], markup=True)
    assert "".join(other.feed(p) for p in ["Roses"]) + other.flush() == "Roses"


def test_memory_show_opens_a_chat_message_with_its_conversation(db, ember, home):
    conversation = convs.create_conversation(db)
    first = convs.add_message(db, conversation, "user", "My sister's birthday is 9 May.")
    convs.add_message(db, conversation, "assistant", "Noted.")
    shown = json.loads(ember("memory", "show", f"message:{first}", "--json").out)
    assert shown["conversation_id"] == conversation and [r["content"] for r in shown["context"]] == [
        "My sister's birthday is 9 May.", "Noted."]
    missing = ember("memory", "show", "message:999")
    assert missing.returncode != 0 and "no memory" in missing.err and "Traceback" not in missing.err



async def test_the_chat_quotes_the_evidence_under_an_answer_that_used_memory(settings, engine, db):
    from assistant.tui.app import EmberApp
    from assistant.tui.widgets.message import MessageView
    from tests.test_tui_replies import SIZE, send

    memory.upsert_records(db, BIRTHDAY)
    app = EmberApp(settings, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")                 # memory on: every reply uses memories
        await send(pilot, QUESTION)
        reply = app.screen.query(MessageView)[-1]
        quoted = str(reply.query_one(".evidence").render())
        assert "“Correction: my sister's birthday is 9 May.” — you said, 2025-03-10, imported note [note-c]" in quoted
        assert "4 May" not in quoted
