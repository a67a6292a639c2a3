"""Memory: import, incremental indexing, hybrid retrieval, time-awareness, forgetting, bad input."""
from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest

from assistant.errors import InvalidInput
from assistant.memory_import import read_records
from assistant.retrieval import Retriever, fit_memories, memory_message, time_window
from storage import conversations as convs
from storage import memory
from storage.db import open_db
from tests.conftest import assert_clean_error

NOTES = [
    {"id": "n1", "text": "My sister Ana was born on 3 May.", "time": "2026-03-01"},
    {"id": "n2", "text": "I parked the car on level four of the airport garage.", "time": "2026-03-02"},
    {"id": "n3", "text": "We loved the dumplings at Jade Garden on Fifth Street.", "time": "2026-03-10"},
    {"id": "n4", "text": "Dentist appointment with Dr Okafor moved to Thursday.", "time": "2026-03-11"},
    {"id": "n5", "text": "The wifi password at the cabin is pinecone42.", "time": "2026-02-01"},
]


def ids(hits):
    return [h.public_id for h in hits]


def test_hybrid_search_finds_paraphrases_and_exact_names(db, embedder):
    memory.upsert_records(db, NOTES)
    retriever = Retriever(db, embedder)
    retriever.refresh()
    # No shared content word with n1 ("birthday" vs "born"): only the dense side can find it.
    assert "n1" not in ids(retriever.search("When is her birthday?", 5, mode="bm25"))
    assert ids(retriever.search("When is her birthday?", 1, mode="dense")) == ["n1"]
    assert ids(retriever.search("When is her birthday?", 1)) == ["n1"]
    # A made-up token only BM25 can match exactly.
    assert ids(retriever.search("pinecone42", 1, mode="bm25")) == ["n5"]
    assert ids(retriever.search("pinecone42", 1)) == ["n5"]
    assert ids(retriever.search("which restaurant did I like?", 1)) == ["n3"]


def test_search_is_time_aware(db, embedder):
    memory.upsert_records(db, [
        {"id": "old", "text": "Went running in the park for an hour.", "time": "2026-01-05"},
        {"id": "new", "text": "Went running in the park for twenty minutes.", "time": "2026-03-09"},
    ])
    retriever = Retriever(db, embedder)
    retriever.refresh()
    now = dt.date(2026, 3, 12)
    assert ids(retriever.search("How long did I run last week?", 1, now=now)) == ["new"]
    assert ids(retriever.search("How long did I run in January?", 1, now=now)) == ["old"]
    assert ids(retriever.search("How long did I run on January 5th?", 1, now=now)) == ["old"]


@pytest.mark.parametrize("question, window", [
    ("what did I eat yesterday", ("2026-03-11", "2026-03-12")),
    ("a few days ago I went out", ("2026-03-06", "2026-03-11")),
    ("on May 4th I read a book", ("2025-05-04", "2025-05-05")),
    ("on 27 February I ran", ("2026-02-27", "2026-02-28")),
    ("what happened in February", ("2026-02-01", "2026-03-01")),
    ("last week", ("2026-03-05", "2026-03-13")),
    ("on 2026-01-02", ("2026-01-02", "2026-01-03")),
    ("which restaurant did I like", None),
])
def test_time_window(question, window):
    assert time_window(question, dt.date(2026, 3, 12)) == window


def test_duplicate_ids_update_in_place_and_the_same_words_count_once(db, embedder):
    memory.upsert_records(db, NOTES[:2])
    assert memory.upsert_records(db, [{"id": "n1", "text": "Ana's birthday is on 4 May, not 3 May."}]) == \
        {"added": 0, "updated": 1, "chunks": 1}
    assert memory.stats(db)["imported_records"] == 2
    retriever = Retriever(db, embedder)
    retriever.refresh()
    assert retriever.search("Ana birthday", 1)[0].text.startswith("Ana's birthday is on 4 May")
    memory.upsert_records(db, [{"id": "copy", "text": "Ana's birthday is on 4 May,  not 3 May!"}])
    retriever.refresh()
    assert len([h for h in retriever.search("Ana birthday", 5) if "4 May" in h.text]) == 1


def test_huge_texts_are_chunked_and_every_part_is_searchable(db, embedder):
    filler = " ".join(f"word{i}" for i in range(900))
    memory.upsert_records(db, [{"id": "big", "text": f"start {filler} The boat is called Seagull."}])
    chunks = db.execute("SELECT COUNT(*) FROM memory_chunks WHERE source_id = 'big'").fetchone()[0]
    assert chunks >= 6
    retriever = Retriever(db, embedder)
    retriever.refresh()
    hit = retriever.search("Seagull boat", 1)[0]
    assert hit.public_id == "big" and "Seagull" in hit.text


def test_messages_are_indexed_incrementally_and_forget_removes_chunks_fts_and_vectors(db, embedder):
    cid = convs.create_conversation(db)
    mid = convs.add_message(db, cid, "user", "My locker code at the gym is 4412.")
    retriever = Retriever(db, embedder)
    retriever.refresh()
    assert memory.stats(db)["from_messages"] == 1
    assert retriever.search("gym locker code", 1)[0].message_id == mid
    convs.add_message(db, cid, "assistant", "Noted: locker 4412.")
    retriever.refresh()
    assert memory.stats(db)["from_messages"] == 2
    convs.forget_message(db, mid)
    counts = [db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
              for t in ("memory_chunks", "memory_fts_docsize", "memory_vec")]
    # only the assistant's message is left; its vector went too, as it was made reading the forgotten one
    assert counts == [1, 1, 0]
    assert all(h.message_id != mid for h in retriever.search("gym locker code", 5))
    # the search re-made it from what is left: the reply's own words alone
    assert db.execute("SELECT COUNT(*) FROM memory_vec").fetchone()[0] == 1
    stored = np.frombuffer(db.execute("SELECT embedding FROM memory_chunks").fetchone()[0], dtype=np.float32)
    assert float(stored @ embedder.encode(["assistant: Noted: locker 4412."])[0]) > 0.9999


def test_deleting_a_memory(db, embedder):
    memory.upsert_records(db, NOTES[:2])
    cid = convs.create_conversation(db)
    mid = convs.add_message(db, cid, "user", "I keep the spare key under the blue pot.")
    Retriever(db, embedder).refresh()
    imported = db.execute("SELECT id FROM memory_chunks WHERE source_id = 'n1'").fetchone()[0]
    memory.delete_chunk(db, imported)
    from_message = db.execute("SELECT id FROM memory_chunks WHERE message_id = ?", [mid]).fetchone()[0]
    memory.delete_chunk(db, from_message)
    assert convs.messages(db, cid) == [] or not any(m["id"] == mid for m in convs.messages(db, cid))
    assert [r["source_id"] for r in memory.list_chunks(db)] == ["n2"]


def test_memory_prompt_fits_the_budget_and_numbers_its_notes(db, embedder, engine):
    memory.upsert_records(db, NOTES)
    retriever = Retriever(db, embedder)
    retriever.refresh()
    hits = retriever.search("restaurant dumplings", 5)
    kept = fit_memories(hits, engine.count_tokens, budget=90)
    assert 0 < len(kept) < len(hits)
    assert engine.count_tokens(memory_message(kept)["content"]) <= 90
    text = memory_message(hits[:2])["content"]
    assert all(" ".join(hit.text.split()) in text for hit in hits[:2])
    dated = memory_message(hits[:2], "numbered")["content"]
    assert "[1] (2026-02-01" in dated and "[2] (2026-03-10" in dated   # oldest first: a later statement is read last


def test_bad_jsonl_reports_the_line_and_imports_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n\n{"id": "b", "text": ""}\n{not json}\n[1]\n'
                   '{"id": "c", "text": "x", "time": "yesterday"}\n', encoding="utf-8")
    with pytest.raises(InvalidInput, match=r"line 3: needs \"text\".*and 3 more.*nothing was imported"):
        read_records(bad)
    records, problems = read_records(bad, skip_bad=True)
    assert [r["id"] for r in records] == ["a"]
    assert [p.split(":")[0] for p in problems] == ["line 3", "line 4", "line 5", "line 6"]
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes('{"id": "a", "text": "ok"}\n{"id": "b", "text": "café"}\n'.encode("latin-1"))
    with pytest.raises(InvalidInput, match="not UTF-8 \\(line 2"):
        read_records(latin)


def test_an_import_that_imports_nothing_fails(ember, tmp_path, home):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{not json}\n[1]\n{"id": "x", "text": "  "}\n', encoding="utf-8")
    assert_clean_error(ember("memory", "import", str(bad), "--skip-bad"),
                       contains="no line could be imported (line 1: not valid JSON")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    assert_clean_error(ember("memory", "import", str(empty)), contains="holds no records")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{not json}\n{"id": "ok", "text": "The one good line."}\n', encoding="utf-8")
    result = ember("memory", "import", str(mixed), "--skip-bad", "--json")
    assert result.returncode == 0 and json.loads(result.out)["added"] == 1, result.err


def test_memory_cli_import_search_batch_and_bad_input(ember, tmp_path):
    notes = tmp_path / "notes.jsonl"
    notes.write_text("\n".join(json.dumps(n) for n in NOTES) + "\n", encoding="utf-8")
    assert ember("memory", "import", str(notes)).returncode == 0
    found = json.loads(ember("memory", "search", "When is Ana's birthday?", "--k", "1", "--json").out)
    assert [r["id"] for r in found] == ["n1"] and {"id", "text", "score"} <= set(found[0])
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": "q1", "query": "where did I park"}\n{"id": 2, "query": "wifi password"}\n')
    lines = [json.loads(line) for line in ember("memory", "search", "--queries", str(queries),
                                                "--k", "2").out.splitlines()]
    assert [(line["id"], line["results"][0]["id"]) for line in lines] == [("q1", "n2"), (2, "n5")]
    stats = json.loads(ember("memory", "stats", "--json").out)
    assert stats["chunks"] == 5 and stats["embedded"] == 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "text": "ok"}\n{not json}\n')
    assert_clean_error(ember("memory", "import", str(bad)), contains="line 2")
    assert json.loads(ember("memory", "stats", "--json").out)["chunks"] == 5
    assert_clean_error(ember("memory", "import", str(tmp_path / "missing.jsonl")), contains="cannot read")
    assert_clean_error(ember("memory", "search"), contains="give a QUERY")


def test_ask_with_the_rag_route_puts_memories_in_the_prompt_and_records_them(ember, tmp_path, home):
    notes = tmp_path / "notes.jsonl"
    notes.write_text("\n".join(json.dumps(n) for n in NOTES) + "\n", encoding="utf-8")
    assert ember("memory", "import", str(notes)).returncode == 0
    result = ember("ask", "What is the wifi password at the cabin?", "--route", "rag", "--json",
                   "--max-tokens", "24", "--temperature", "0")
    answer = json.loads(result.out)
    assert answer["route"] == "rag" and answer["memories"][0]["id"] == "n5"
    assert "pinecone42" in answer["text"].lower()     # only the memory could have told it
    base = json.loads(ember("ask", "What is the wifi password at the cabin?", "--route", "base", "--json",
                            "--max-tokens", "24", "--temperature", "0", "--no-log").out)
    assert "pinecone42" not in base["text"].lower() and base["memories"] == []
    db = open_db(home)
    assert [m["source_id"] for m in memory.reply_memories(db, answer["message_id"])][0] == "n5"


TURNS = [  # one conversation, one turn a record, as `ember memory import` takes a long chat
    {"id": "t1", "speaker": "Caroline", "session": "s1", "time": "2023-05-08",
     "text": "Did you ever get to try the pottery class you signed up for?"},
    {"id": "t2", "speaker": "Melanie", "session": "s1", "time": "2023-05-08",
     "text": "Yes! Twice already, and I made a lopsided bowl."},
    {"id": "t3", "speaker": "Caroline", "session": "s2", "time": "2023-06-01",
     "text": "The parking at the new office is a nightmare."},
]


def test_a_turn_is_embedded_with_its_speaker_and_its_neighbours_in_the_session(db, embedder):
    memory.upsert_records(db, TURNS)
    Retriever(db, embedder).refresh()
    vector = {row["source_id"]: np.frombuffer(row["embedding"], dtype=np.float32)
              for row in db.query("SELECT source_id, embedding FROM memory_chunks")}
    own = embedder.encode(["Melanie: " + TURNS[1]["text"]])[0]
    read = embedder.encode([f"Caroline: {TURNS[0]['text']}\nMelanie: {TURNS[1]['text']}"])[0]
    expected = (own + read) / np.linalg.norm(own + read)
    assert float(vector["t2"] @ expected) > 0.9999
    # t3 is alone in its session: its vector is its own words'
    assert float(vector["t3"] @ embedder.encode(["Caroline: " + TURNS[2]["text"]])[0]) > 0.9999
    # the short answer is nearer a question about what it answers than its own words are
    question = embedder.encode_query("Did Melanie go to her pottery class?")
    assert float(vector["t2"] @ question) > float(own @ question) + 0.05


def test_a_new_turn_makes_its_neighbours_vector_stale_and_a_search_remakes_it(db, embedder):
    memory.upsert_records(db, TURNS[:1])
    retriever = Retriever(db, embedder)
    retriever.refresh()
    before = db.execute("SELECT embedding FROM memory_chunks WHERE source_id = 't1'").fetchone()[0]
    memory.upsert_records(db, TURNS[1:2])
    assert [source_id for _, source_id in db.execute(
        "SELECT id, source_id FROM memory_chunks WHERE vector_stale = 1")] == ["t1"]
    retriever.search("pottery", 2)
    after = db.execute("SELECT embedding, vector_stale FROM memory_chunks WHERE source_id = 't1'").fetchone()
    assert after[1] == 0 and after[0] != before


def test_recently_names_no_period(db, embedder):
    now = dt.date(2026, 3, 12)
    assert time_window("what did I eat recently?", now) is None
    assert time_window("what did I eat recently?", now, recently=True) == ("2026-03-05", "2026-03-13")
    # an old note asked about "recently" is not pushed below the last week's unrelated ones
    memory.upsert_records(db, NOTES)
    hits = Retriever(db, embedder).search("Where did I park the car recently?", 1, now=now)
    assert ids(hits) == ["n2"]


def test_vectors_made_before_they_read_neighbours_stay_in_use_and_are_remade(tmp_path, embedder):
    from storage.db import DB_NAME
    from storage.migrations import migrate
    from tests.test_storage import _database

    (tmp_path / "home").mkdir(mode=0o700)
    old = _database(tmp_path / "home" / DB_NAME)
    migrate(old, target=9)          # the schema before m010_vectors_in_context
    memory.upsert_records(old, TURNS)
    for chunk_id, text in memory.unembedded(old):
        blob = embedder.encode([text])[0].tobytes()
        old.execute("UPDATE memory_chunks SET embedding = ? WHERE id = ?", [blob, chunk_id])
        old.execute("INSERT INTO memory_vec(rowid, embedding) VALUES (?, vec_quantize_binary(?))", [chunk_id, blob])
    old.conn.commit()
    old.close()
    old = open_db(tmp_path / "home")      # upgrades it
    assert len(memory.stale(old)) == 3 and not memory.unembedded(old)
    assert len(memory.vector_search(old, embedder.encode_query("pottery"), 3)) == 3   # still in use
    Retriever(old, embedder).search("pottery class", 2)
    assert not memory.stale(old)
    old.close()


def test_two_processes_indexing_the_same_new_message_at_once_both_succeed(home, monkeypatch):
    """The chat and `ember status` both index new messages: one may chunk a message between the other's
    reading it as pending and its write (a UNIQUE constraint failure in the stress test's `ember status`)."""
    from storage.db import open_db

    first, second = open_db(home), open_db(home)
    conversation = convs.create_conversation(first, "race")
    convs.add_message(first, conversation, "user", "My bicycle is green and has a basket.")
    real = convs.branch_ids
    calls = []

    def other_process_indexes_meanwhile(db, conversation_id):
        if db is first and not calls:
            calls.append(None)
            calls[0] = memory.sync_messages(second)      # after `first` read it as pending
        return real(db, conversation_id)

    monkeypatch.setattr(convs, "branch_ids", other_process_indexes_meanwhile)
    memory.sync_messages(first)
    assert calls == [1]
    assert first.execute("SELECT COUNT(*) FROM memory_chunks").fetchone()[0] == 1
    first.close(), second.close()
