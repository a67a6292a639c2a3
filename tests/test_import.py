"""`ember import`: other apps' chat history and notes into the log and memory. Small invented fixtures
written here (never real personal data), real SQLite files, the real `ember` in subprocesses."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from assistant.importers import open_export
from assistant.importing import merge
from assistant.retrieval import vectors_in_context
from storage import conversations as convs
from storage import feedback, imports, memory, registry
from storage.db import open_db
from tests.conftest import assert_clean_error

T0 = 1_760_000_000.0     # 2025-10-09T08:53:20Z


def node(ident, parent, children, role=None, text=None, t=None, *, content_type="text", parts=None, model=None,
         content=True):
    """One node of a ChatGPT `mapping`."""
    message = None
    if role is not None:
        message = {"id": ident, "author": {"role": role}, "create_time": t, "metadata": {"model_slug": model} if model else {},
                   "content": {"content_type": content_type, "parts": [text] if parts is None else parts} if content else None}
    return {"id": ident, "message": message, "parent": parent, "children": children}


def trip(ident="c1", *, hotel="Hotel Bellecour", extra: list | None = None) -> dict:
    """A ChatGPT conversation with a regenerated reply (another branch) and an image beside text."""
    mapping = {
        "root": node("root", None, ["u1"]),
        "u1": node("u1", "root", ["a1", "a1b"], "user", "I am planning a trip to Lyon in May.", T0),
        "a1": node("a1", "u1", ["u2"], "assistant", "Lyon is lovely in May.", T0 + 10, model="gpt-4o"),
        "a1b": node("a1b", "u1", [], "assistant", "A regenerated reply nobody kept.", T0 + 11, model="gpt-4o"),
        "u2": node("u2", "a1", ["a2"], "user", None, T0 + 20, content_type="multimodal_text",
                   parts=[{"content_type": "image_asset_pointer"}, f"My hotel is the {hotel}."]),
        "a2": node("a2", "u2", [], "assistant", "A fine choice near the river.", T0 + 30, model="gpt-4o"),
    }
    current = "a2"
    for i, (role, text) in enumerate(extra or []):
        key = f"x{i}"
        mapping[current]["children"].append(key)
        mapping[key] = node(key, current, [], role, text, T0 + 40 + i)
        current = key
    return {"id": ident, "title": "Trip to Lyon", "create_time": T0, "update_time": T0 + 30,
            "current_node": current, "mapping": mapping}


def write(path, value) -> str:
    path.write_text(json.dumps(value), encoding="utf-8")
    return str(path)


def bare(tmp_path, name="conversations.json", conversations=None):
    return write(tmp_path / name, [trip()] if conversations is None else conversations)


def ember_at(home, *args: str) -> subprocess.CompletedProcess:
    """The real `ember` on another data directory than the test's own."""
    env = dict(os.environ, EMBER_HOME=str(home))
    env.pop("EMBER_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "assistant", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def log_size(db):
    return db["conversations"].count, db["messages"].count, db["memory_chunks"].count


# --- ChatGPT -------------------------------------------------------------------------------------------

def test_chatgpt_takes_the_current_node_branch_keeps_roles_times_models_and_counts_what_it_skips(db, tmp_path):
    result = merge(db, open_export(bare(tmp_path)))
    assert result["source"]["app"] == "chatgpt" and result["conversations"]["added"] == 1
    assert result["skipped"] == {"messages on other branches": 1, "image_asset_pointer parts": 1}
    conversation = convs.list_conversations(db)[0]
    assert conversation["title"] == "Trip to Lyon" and conversation["created"] == "2025-10-09T08:53:20.000+00:00"
    rows = convs.messages(db, conversation["id"])
    assert [(m["role"], m["content"]) for m in rows] == [
        ("user", "I am planning a trip to Lyon in May."), ("assistant", "Lyon is lovely in May."),
        ("user", "My hotel is the Hotel Bellecour."), ("assistant", "A fine choice near the river.")]
    assert [m["model"] for m in rows] == [None, "gpt-4o", None, "gpt-4o"]
    assert rows[2]["created"] == "2025-10-09T08:53:40.000+00:00"
    source = imports.sources(db)[0]
    assert rows[0]["import_id"] == source["id"] and source["sha256"] == result["source"]["sha256"]
    # Consent: imported conversations are not learned from until the user says so.
    assert feedback.is_excluded(db, conversation["id"])


def test_reimport_adds_nothing_and_a_newer_export_updates_edits_in_place(db, tmp_path):
    merge(db, open_export(bare(tmp_path)))
    before = convs.messages(db, 1)
    again = merge(db, open_export(bare(tmp_path)))
    assert again["conversations"] == {"added": 0, "updated": 0, "unchanged": 1}
    assert again["messages"]["unchanged"] == 4 and again["source"]["import_id"] == 1
    assert db["messages"].count == 4 and db["imports"].count == 1
    # A later export: the hotel was edited, and the conversation went on.
    newer = write(tmp_path / "newer.json", [trip(hotel="Hotel Carlton", extra=[("user", "And the museum?")])])
    result = merge(db, open_export(newer))
    assert result["messages"] == {"added": 1, "updated": 1, "removed": 0, "unchanged": 3}
    after = convs.messages(db, 1)
    assert [m["id"] for m in after[:4]] == [m["id"] for m in before]          # updated in place
    assert after[2]["content"] == "My hotel is the Hotel Carlton." and after[4]["content"] == "And the museum?"
    assert db["conversations"].count == 1


def test_dry_run_says_what_would_change_and_writes_nothing(ember, home, tmp_path):
    path = bare(tmp_path)
    result = ember("import", path, "--dry-run", "--json")
    assert result.returncode == 0, result.err
    planned = json.loads(result.out)
    assert planned["dry_run"] and planned["conversations"]["added"] == 1 and planned["messages"]["added"] == 4
    db = open_db(home)
    assert log_size(db) == (0, 0, 0) and db["imports"].count == 0 and db["feedback"].count == 0
    assert ember("import", path).returncode == 0
    text = ember("import", path, "--dry-run")
    assert "1 unchanged" in text.out and "nothing was written" in text.out


def test_a_zip_of_the_export_is_read_directly_and_imported_replies_are_not_evidence(ember, home, tmp_path, embedder):
    archive = tmp_path / "chatgpt-export.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("chat.html", "<html></html>")
        z.writestr("conversations.json", json.dumps([trip()]))
    result = ember("import", str(archive), "--json")
    assert result.returncode == 0, result.err
    done = json.loads(result.out)
    assert done["source"]["app"] == "chatgpt" and done["indexed"]["chunks"] == 4
    hits = json.loads(ember("memory", "search", "which hotel did I book", "--k", "3", "--json").out)
    assert hits[0]["text"] == "My hotel is the Hotel Bellecour." and hits[0]["origin"] == "user"
    # Another assistant's words come back only when asked what it said, and then as an assistant's.
    assert all(h["speaker"] != "assistant" for h in hits)
    said = json.loads(ember("memory", "search", "what did you tell me about the river", "--k", "3", "--json").out)
    assert any(h["speaker"] == "assistant" and h["origin"] == "assistant" for h in said)
    # Imported turns are embedded as every search embeds them: each read among its neighbours.
    db = open_db(home)
    rows = [(row[0], row[1]) for row in db.execute("SELECT id, embedding FROM memory_chunks ORDER BY id")]
    again = vectors_in_context(db, embedder, [chunk_id for chunk_id, _ in rows])
    assert np.allclose(np.frombuffer(b"".join(blob for _, blob in rows), dtype=np.float32).reshape(again.shape),
                       again, atol=1e-5)
    assert memory.stale_count(db) == 0 and memory.unembedded_count(db) == 0


def test_split_export_files_in_a_folder_are_one_import(db, tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    write(folder / "conversations-000.json", [trip("c1")])
    write(folder / "conversations-001.json", [trip("c2")])
    result = merge(db, open_export(folder))
    assert result["conversations"]["added"] == 2 and db["imports"].count == 1


def test_newer_exports_with_missing_or_null_fields(db, tmp_path):
    conv = trip()
    del conv["current_node"], conv["update_time"]
    conv["title"] = None
    conv["mapping"]["a2"]["message"]["content"]["parts"] = None           # null parts
    conv["mapping"]["a1"]["message"]["content"] = None                    # null content
    conv["mapping"]["u1"]["message"]["metadata"] = None
    conv["mapping"]["code"] = node("code", "a2", [], "assistant", None, T0 + 31, content_type="execution_output")
    conv["mapping"]["a2"]["children"] = ["code"]
    result = merge(db, open_export(write(tmp_path / "c.json", [conv])))
    assert result["conversations"]["added"] == 1
    assert result["skipped"]["messages with null parts"] == 1
    assert result["skipped"]["messages with no content"] == 1
    assert result["skipped"]["execution_output parts"] == 1
    rows = convs.messages(db, 1)
    assert [m["role"] for m in rows] == ["user", "user"]
    assert convs.list_conversations(db)[0]["title"] == "I am planning a trip to Lyon in May."


# --- Bad input: one line naming the file and the place, non-zero exit, nothing written ---------------

def cycle(tmp_path):
    conv = trip()
    conv["mapping"]["u1"]["parent"] = "a2"
    return write(tmp_path / "cycle.json", [trip("ok"), conv])


def dangling(tmp_path):
    conv = trip()
    conv["mapping"]["a1"]["parent"] = "gone"
    return write(tmp_path / "dangling.json", [trip("ok"), conv])


def truncated(tmp_path):
    text = json.dumps([trip("ok"), trip("c2")])
    (tmp_path / "truncated.json").write_text(text[: len(text) - 200])
    return str(tmp_path / "truncated.json")


@pytest.mark.parametrize("make, says", [
    (truncated, "truncated.json: after element 1 of the list"),
    (cycle, "cycle.json: conversation 2 (c1): the `mapping` has a cycle"),
    (dangling, "dangling.json: conversation 2 (c1): node a1's parent gone is not in the `mapping`"),
])
def test_bad_chatgpt_exports_import_nothing_unless_skip_bad(ember, home, tmp_path, make, says):
    path = make(tmp_path)
    result = ember("import", path)
    assert_clean_error(result, contains=says)
    assert "nothing was imported" in result.err
    db = open_db(home)
    assert log_size(db) == (0, 0, 0) and db["imports"].count == 0
    kept = ember("import", path, "--skip-bad", "--json")
    assert kept.returncode == 0, kept.err
    assert json.loads(kept.out)["conversations"]["added"] == 1 and len(json.loads(kept.out)["problems"]) == 1


def test_a_file_that_is_no_export_is_refused_in_one_line(ember, tmp_path):
    path = write(tmp_path / "other.json", [{"hello": "world"}])
    assert_clean_error(ember("import", path), contains="other.json")
    assert_clean_error(ember("import", str(tmp_path / "missing.json")), contains="no such file")


# --- Claude, llm, Open WebUI, oterm, elia --------------------------------------------------------------

def test_claude_export(db, tmp_path):
    conv = {"uuid": "k1", "name": "Bread", "created_at": "2025-01-02T10:00:00.000000Z",
            "updated_at": "2025-01-02T10:05:00Z", "chat_messages": [
                {"uuid": "m1", "sender": "human", "text": "My sourdough starter is called Bubbles.",
                 "created_at": "2025-01-02T10:00:00Z", "content": [{"type": "text", "text": "My sourdough starter is called Bubbles."}]},
                {"uuid": "m2", "sender": "assistant", "text": "", "created_at": "2025-01-02T10:00:05Z",
                 "content": [{"type": "text", "text": "Feed Bubbles daily."}, {"type": "tool_use", "name": "x"}]},
                {"uuid": "m3", "sender": "human", "text": None, "content": None, "created_at": "2025-01-02T10:01:00Z"}]}
    result = merge(db, open_export(write(tmp_path / "conversations.json", [conv])))
    assert result["source"]["app"] == "claude"
    assert result["skipped"] == {"tool_use parts": 1, "empty messages": 1}
    rows = convs.messages(db, 1)
    assert [(m["role"], m["content"], m["created"][:19]) for m in rows] == [
        ("user", "My sourdough starter is called Bubbles.", "2025-01-02T10:00:00"),
        ("assistant", "Feed Bubbles daily.", "2025-01-02T10:00:05")]


def llm_logs(path, *, extra_migration: str | None = None, drop_column: bool = False):
    """A logs.db made by llm's own migrations (the real schema), with one two-turn conversation."""
    import llm.migrations
    import sqlite_utils

    db = sqlite_utils.Database(path)
    llm.migrations.migrate(db)
    db["conversations"].insert({"id": "cv1", "name": "Plants", "model": "gpt-4o-mini"})
    for i, (prompt, response) in enumerate([("My fern is on the north windowsill.", "Ferns like that."),
                                            ("Water it weekly?", "Yes, weekly.")]):
        db["responses"].insert({"id": f"r{i}", "model": "gpt-4o-mini", "prompt": prompt, "system": "Be brief.",
                                "response": response, "conversation_id": "cv1",
                                "datetime_utc": f"2025-03-0{i + 1}T09:00:00.000000"})
    if extra_migration:
        db["_llm_migrations"].insert({"name": extra_migration, "applied_at": "2030-01-01"})
    if drop_column:
        db["responses"].transform(drop={"datetime_utc"})
    db.close()
    return str(path)


def test_llm_logs_db(db, tmp_path):
    result = merge(db, open_export(llm_logs(tmp_path / "logs.db")))
    assert result["source"]["app"] == "llm" and result["warnings"] == []
    rows = convs.messages(db, 1)
    assert [(m["role"], m["content"]) for m in rows] == [
        ("system", "Be brief."), ("user", "My fern is on the north windowsill."), ("assistant", "Ferns like that."),
        ("user", "Water it weekly?"), ("assistant", "Yes, weekly.")]
    assert rows[2]["model"] == "gpt-4o-mini" and rows[3]["created"].startswith("2025-03-02T09:00")
    assert convs.list_conversations(db)[0]["title"] == "Plants"


def test_an_llm_database_of_a_newer_schema(ember, home, tmp_path):
    newer = merge(open_db(tmp_path / "other"), open_export(llm_logs(tmp_path / "newer.db", extra_migration="m099_future")))
    assert "newer llm (migration m099_future)" in newer["warnings"][0]
    result = ember("import", llm_logs(tmp_path / "changed.db", drop_column=True))
    assert_clean_error(result, contains="changed.db: table 'responses' has no column 'datetime_utc'")
    assert log_size(open_db(home)) == (0, 0, 0)


def test_open_webui_export_takes_the_current_branch(db, tmp_path):
    history = {"currentId": "b", "messages": {
        "q": {"id": "q", "parentId": None, "childrenIds": ["a", "b"], "role": "user",
              "content": "Remind me: the boiler code is 4471.", "timestamp": 1_700_000_000},
        "a": {"id": "a", "parentId": "q", "childrenIds": [], "role": "assistant", "content": "Old answer", "timestamp": 1_700_000_005},
        "b": {"id": "b", "parentId": "q", "childrenIds": [], "role": "assistant", "content": "Noted.",
              "model": "llama3", "timestamp": 1_700_000_009}}}
    chat = {"id": "w1", "title": "Boiler", "chat": {"title": "Boiler", "history": history, "messages": []},
            "created_at": 1_700_000_000, "updated_at": 1_700_000_009}
    result = merge(db, open_export(write(tmp_path / "chat-export.json", [chat])))
    assert result["source"]["app"] == "openwebui" and result["skipped"] == {"messages on other branches": 1}
    assert [(m["role"], m["content"], m["model"]) for m in convs.messages(db, 1)] == [
        ("user", "Remind me: the boiler code is 4471.", None), ("assistant", "Noted.", "llama3")]


def test_oterm_and_elia_databases(db, tmp_path):
    oterm = sqlite3.connect(tmp_path / "store.db")
    oterm.executescript("""
        CREATE TABLE chat (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT, model TEXT NOT NULL, system TEXT,
                           format TEXT, parameters TEXT, keep_alive INTEGER DEFAULT 5);
        CREATE TABLE message (id INTEGER PRIMARY KEY AUTOINCREMENT, chat_id INTEGER NOT NULL, author TEXT NOT NULL,
                              text TEXT NOT NULL);
        INSERT INTO chat (name, model) VALUES ('Bike', 'llama3.2');
        INSERT INTO message (chat_id, author, text) VALUES (1, 'user', 'My bike lock code is 9031.'), (1, 'ollama', 'Got it.');
    """)
    oterm.commit()
    oterm.close()
    result = merge(db, open_export(tmp_path / "store.db"))
    assert result["source"]["app"] == "oterm"
    assert [(m["role"], m["model"]) for m in convs.messages(db, 1)] == [("user", None), ("assistant", "llama3.2")]
    elia = sqlite3.connect(tmp_path / "elia.sqlite")
    elia.executescript("""
        CREATE TABLE chat (id INTEGER PRIMARY KEY, model TEXT, title TEXT, started_at DATETIME, archived BOOLEAN);
        CREATE TABLE message (id INTEGER PRIMARY KEY, chat_id INTEGER, role TEXT, content TEXT, timestamp DATETIME,
                              meta JSON, parent_id INTEGER, model TEXT);
        INSERT INTO chat VALUES (1, 'gpt-4o', 'Cats', '2024-06-01 08:00:00', 0);
        INSERT INTO message VALUES (1, 1, 'user', 'My cat Miso is eleven.', '2024-06-01 08:00:01', '{}', NULL, NULL),
                                   (2, 1, 'assistant', 'Happy birthday Miso.', '2024-06-01 08:00:03', '{}', 1, 'gpt-4o');
    """)
    elia.commit()
    elia.close()
    result = merge(db, open_export(tmp_path / "elia.sqlite"))
    assert result["source"]["app"] == "elia"
    rows = convs.messages(db, 2)
    assert [(m["role"], m["model"], m["created"][:19]) for m in rows] == [
        ("user", None, "2024-06-01T08:00:01"), ("assistant", "gpt-4o", "2024-06-01T08:00:03")]


# --- Notes: Markdown and JSONL --------------------------------------------------------------------------

def test_markdown_notes_are_chunked_by_heading_dated_and_updated_on_reimport(db, tmp_path):
    notes = tmp_path / "vault"
    (notes / ".obsidian").mkdir(parents=True)
    (notes / ".obsidian" / "skip.md").write_text("# hidden")
    (notes / "garden.md").write_text("---\ntitle: Garden\ndate: 2024-02-03\n---\nIntro line.\n# Beds\n"
                                     "Tomatoes in bed two.\n## Shed\nThe key is under the blue pot.\n")
    (notes / "plain.md").write_text("No headings, just a note about the piano tuner on Fridays.")
    result = merge(db, open_export(notes))
    assert result["source"]["app"] == "markdown" and result["notes"]["added"] == 2
    rows = list(db.query("SELECT source_id, text, time FROM memory_chunks ORDER BY source_id"))
    assert [r["source_id"] for r in rows] == ["markdown:garden.md#0", "markdown:garden.md#1",
                                              "markdown:garden.md#2", "markdown:plain.md#0"]
    assert rows[2]["text"] == "## Shed The key is under the blue pot." and rows[0]["time"] == "2024-02-03"
    assert merge(db, open_export(notes))["notes"] == {"added": 0, "updated": 0, "unchanged": 2}
    (notes / "garden.md").write_text("# Beds\nPeppers now.\n")
    assert merge(db, open_export(notes))["notes"] == {"added": 0, "updated": 1, "unchanged": 1}
    assert [r["text"] for r in db.query("SELECT text FROM memory_chunks WHERE source_id LIKE 'markdown:garden%'")] == [
        "# Beds Peppers now."]


def test_a_markdown_file_in_another_encoding_is_named_with_its_line(ember, home, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "ok.md").write_text("# Fine\nAll good.")
    (notes / "latin.md").write_bytes("# Café\nLine two.\nCrème brûlée recipe.".encode("latin-1"))
    (notes / "utf16.md").write_bytes("# Sixteen\nA UTF-16 note with its BOM.".encode("utf-16"))
    result = ember("import", str(notes))
    assert_clean_error(result, contains="latin.md: line 1, byte 5 (0xe9): not UTF-8")
    assert open_db(home)["memory_chunks"].count == 0
    kept = json.loads(ember("import", str(notes), "--skip-bad", "--json").out)
    assert kept["notes"]["added"] == 2 and "latin.md" in kept["problems"][0]


def test_ember_jsonl_as_today(db, tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a1", "text": "Ana was born on 3 May.", "time": "2026-03-01"}\n'
                    '{"id": "a2", "text": "The car is on level four."}\n')
    assert merge(db, open_export(path))["notes"]["added"] == 2
    assert merge(db, open_export(path))["notes"]["unchanged"] == 2
    assert db["memory_chunks"].count == 2


# --- Consent, forgetting, status, round trip ------------------------------------------------------------

def test_learn_opts_in_and_the_chat_can_un_exclude(db, tmp_path):
    merge(db, open_export(bare(tmp_path)), learn=True)
    assert not feedback.is_excluded(db, 1)
    other = write(tmp_path / "b.json", [trip("c2")])
    merge(db, open_export(other))
    assert feedback.is_excluded(db, 2)
    feedback.set_excluded(db, 2, False)            # what F4 in the chat does
    merge(db, open_export(other))                  # a re-import does not take the user's choice back
    assert not feedback.is_excluded(db, 2)


def test_forget_source_removes_an_import_whole_and_taints_adapters(ember, home, tmp_path):
    assert ember("import", bare(tmp_path)).returncode == 0
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "n.md").write_text("# Note\nThe spare key is with Ines.")
    assert ember("import", str(notes)).returncode == 0
    db = open_db(home)
    native = convs.create_conversation(db)
    convs.add_message(db, native, "user", "A conversation of my own.")
    first = convs.messages(db, 1)[0]["id"]
    registry.register(db, {"id": "a1", "path": str(home / "a1.gguf"), "kind": "lora", "method": "lora",
                           "base_sha256": "x", "status": "inactive", "examples": 1}, [(first, "train")], activate=True)
    status = json.loads(ember("status", "--json").out)["imports"]
    assert status["by_app"] == {"chatgpt": {"imports": 1, "conversations": 1, "messages": 4, "notes": 0},
                                "markdown": {"imports": 1, "conversations": 0, "messages": 0, "notes": 1}}
    assert "chatgpt (1 conversations, 4 messages; 1 import)" in ember("status").out
    assert_clean_error(ember("forget", "--source", "chatgpt", input=""), contains="pass --yes")
    preview = json.loads(ember("forget", "--source", "chatgpt", "--dry-run", "--json").out)
    assert preview["would_delete"]["messages"] == 4 and preview["would_delete"]["adapters_tainted"] == 1
    assert db["messages"].count == 5
    done = json.loads(ember("forget", "--source", "chatgpt", "--yes", "--json").out)["deleted"]
    assert done["conversations"] == 1 and done["adapters_tainted"] == 1
    assert registry.get(db, "a1")["status"] == "tainted"
    assert db["messages"].count == 1 and [r["app"] for r in imports.sources(db)] == ["markdown"]
    sha = imports.sources(db)[0]["sha256"][:10]
    assert ember("forget", "--source", sha, "--yes").returncode == 0
    assert db["memory_chunks"].count == 1 and db["imports"].count == 0   # only the native message's chunk
    assert_clean_error(ember("forget", "--source", "claude", "--yes"), contains="no import matches")


def test_export_then_import_is_lossless(ember, home, tmp_path):
    db = open_db(home)
    cid = convs.create_conversation(db)
    convs.add_message(db, cid, "user", "Plan a picnic for Saturday")
    reply = convs.add_message(db, cid, "assistant", "Bring bread.", model="smollm2", route="rag", tokens=3, seconds=0.5)
    convs.finish_reply(db, reply, "Bring bread and cheese.", "length", tokens=5, seconds=0.7)
    feedback.set_excluded(db, cid, True)
    other = convs.create_conversation(db)
    convs.add_message(db, other, "user", "Second conversation, learned from.")
    liked = convs.add_message(db, other, "assistant", "Noted.")
    feedback.rate(db, liked, "down")
    feedback.rate(db, liked, "up")                        # the rating now: up
    fixed = convs.add_message(db, other, "assistant", "Wrong answer.")
    feedback.edit(db, fixed, "The right answer.")        # what learning takes as the approved reply
    assert ember("import", bare(tmp_path)).returncode == 0
    first = tmp_path / "first.json"
    assert ember("export", "-o", str(first)).returncode == 0

    elsewhere = tmp_path / "elsewhere"
    again = ember_at(elsewhere, "import", str(first), "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["source"]["app"] == "ember"
    second = tmp_path / "second.json"
    assert ember_at(elsewhere, "export", "-o", str(second)).returncode == 0

    def comparable(path):
        out = []
        for conv in json.loads(path.read_text())["conversations"]:
            # Ids differ between databases: the tree is compared by each message's place in the list.
            place = {m["id"]: i for i, m in enumerate(conv["messages"])}
            out.append({**{k: conv[k] for k in ("title", "created", "updated", "excluded")},
                        "current": place.get(conv["current_id"]),
                        "messages": [{**{k: v for k, v in m.items() if k not in ("id", "external_id", "parent_id")},
                                      "parent": place.get(m["parent_id"])} for m in conv["messages"]]})
        return sorted(out, key=lambda c: c["created"])
    assert comparable(first) == comparable(second)
    assert [c["excluded"] for c in comparable(second)] == [True, True, False]
    said = [(m["content"], m.get("rating"), m.get("edit")) for m in comparable(second)[-1]["messages"]]
    assert said[1:] == [("Noted.", "up", None), ("Wrong answer.", None, "The right answer.")]
    moved = open_db(elsewhere)
    assert sorted(v["rating"] or v["edit"] for v in feedback.state(moved).values()) == ["The right answer.", "up"]
    # Read back again: nothing new.
    repeat = json.loads(ember_at(elsewhere, "import", str(first), "--json").stdout)
    assert repeat["conversations"] == {"added": 0, "updated": 0, "unchanged": 3}


def test_a_large_export_is_streamed_in_bounded_memory(tmp_path):
    """Parsing holds one conversation at a time: Python's peak allocation does not grow with the file."""
    def peak(conversations: int) -> tuple[int, int]:
        path = tmp_path / f"big-{conversations}.json"
        with open(path, "w") as f:
            f.write("[")
            for i in range(conversations):
                f.write(("," if i else "") + json.dumps(trip(f"c{i}", hotel="Hotel " + "x" * 4000)))
            f.write("]")
        script = ("import sys, tracemalloc, ijson; from assistant.importers import open_export; tracemalloc.start();"
                  "n = sum(1 for _ in open_export(sys.argv[1]).items());"
                  "print(n, tracemalloc.get_traced_memory()[1])")
        out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                             check=True).stdout
        count, most = map(int, out.split())
        assert count == conversations
        return most, path.stat().st_size

    small, _ = peak(500)
    big, size = peak(4000)
    assert size > 20_000_000
    assert big < size / 8 and big < small * 1.2 + 200_000, (small, big, size)   # flat: ~2 MB either way
