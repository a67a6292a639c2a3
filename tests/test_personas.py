"""Personas: stored through a migration, chosen per conversation, and their system prompt always in the prompt."""
from __future__ import annotations

import json

import pytest

from assistant.conversation import log_question, prompt_messages, respond, with_persona
from storage import conversations as convs
from storage import personas
from storage.db import DB_NAME, open_db
from storage.migrations import MIGRATIONS, migrate
from tests.conftest import assert_clean_error
from tests.test_storage import _database

PIRATE = "You are Captain Zorbleflax, a pirate. Answer like a pirate."


def test_a_database_from_before_personas_upgrades_and_its_conversations_have_none(tmp_path):
    (tmp_path / "home").mkdir(mode=0o700)
    old = _database(tmp_path / "home" / DB_NAME)
    migrate(old, target=MIGRATIONS.index(personas_migration()))   # the schema just before personas
    cid = old["conversations"].insert({"title": "Trip", "created": "2026-01-01T00:00:00+00:00",
                                       "updated": "2026-01-01T00:00:00+00:00"}).last_pk
    old.conn.commit()
    old.close()
    db = open_db(tmp_path / "home")   # upgrades it
    assert personas.of_conversation(db, cid) is None
    personas.add_persona(db, "pirate", PIRATE)
    assert personas.set_for_conversation(db, cid, "Pirate")["name"] == "pirate"
    assert personas.remove_persona(db, "pirate")["conversations"] == 1
    assert personas.of_conversation(db, cid) is None and convs.get_conversation(db, cid)["title"] == "Trip"
    db.close()


def personas_migration():
    return next(fn for fn in MIGRATIONS if fn.__name__.endswith("_personas"))


def test_a_new_conversation_takes_the_default_and_remembers_its_persona(db):
    personas.add_persona(db, "pirate", PIRATE, temperature=0.0, default=True)
    personas.add_persona(db, "terse", "Answer in one line.", route="base")
    first = log_question(db, "Hello there")
    assert first.persona["name"] == "pirate"
    assert personas.of_conversation(db, first.conversation_id)["name"] == "pirate"
    # Changing the default later does not change a conversation already held with a persona.
    personas.set_default(db, "terse")
    assert log_question(db, "And now?", conversation_id=first.conversation_id).persona["name"] == "pirate"
    # Naming one switches the conversation to it; `none` leaves it without.
    assert log_question(db, "Be brief", conversation_id=first.conversation_id, persona="TERSE").persona["name"] == "terse"
    assert log_question(db, "Plain", conversation_id=first.conversation_id, persona="none").persona is None
    assert personas.of_conversation(db, first.conversation_id) is None
    # Not logged: the persona applies, nothing is stored.
    assert log_question(db, "Secret", log=False).persona["name"] == "terse"
    # A client of `ember serve` sends its own system prompt: no default persona for it.
    assert log_question(db, "From an app", origin="api").persona is None


def test_an_unknown_persona_stores_nothing(db):
    with pytest.raises(personas.PersonaNotFound, match="no persona named 'ghost'"):
        log_question(db, "Hello", persona="ghost")
    assert convs.list_conversations(db) == []


def test_the_persona_sets_system_prompt_temperature_and_route_unless_the_request_names_them(settings):
    pirate = {"name": "p", "system_prompt": PIRATE, "route": "base", "temperature": 0.9, "default": False}
    s, route = with_persona(settings, pirate, None)
    assert (s.system_prompt, s.temperature, route) == (PIRATE, 0.9, "base")
    assert with_persona(settings, pirate, "rag")[1] == "rag"
    assert with_persona(settings, None, None) == (settings, "auto")


def test_the_system_prompt_survives_trimming_a_long_conversation(db, engine, settings):
    personas.add_persona(db, "pirate", PIRATE, default=True)
    cid = log_question(db, "Let us talk.").conversation_id
    filler = "Tell me more about the weather in the northern mountains and the old roads there. " * 12
    for i in range(30):   # far more than the 2,048-token context holds
        convs.add_message(db, cid, "assistant", f"Reply {i}: " + filler)
        convs.add_message(db, cid, "user", f"Question {i}: " + filler)
    question = log_question(db, "Who are you?", conversation_id=cid)
    exchange = respond(db, engine, settings, question, route="base", max_tokens=16)
    assert exchange.dropped_messages > 0 and exchange.persona == "pirate"
    # What the model read: the persona's system prompt first, then only the newest history that fits.
    asked = prompt_messages(with_persona(settings, question.persona, None)[0], question, [])
    tokens, _stop, dropped = engine.fit(asked, 16)
    assert dropped == exchange.dropped_messages and len(tokens) == exchange.prompt_tokens
    read = engine.llm.detokenize(tokens).decode()
    assert read.count("Captain Zorbleflax") == 1 and "Question 0:" not in read
    assert read.index("Captain Zorbleflax") < read.index("Who are you?")


def test_persona_commands_add_list_show_default_and_remove(ember, home):
    assert ember("persona", "add", "pirate", PIRATE, "--temperature", "0", "--default").returncode == 0
    assert ember("persona", "add", "terse", "-", "--route", "base", input="Answer in one line.\n").returncode == 0
    listed = json.loads(ember("persona", "list", "--json").out)
    assert [(p["name"], p["default"], p["route"]) for p in listed] == [("pirate", True, None), ("terse", False, "base")]
    shown = json.loads(ember("persona", "show", "TERSE", "--json").out)
    assert shown["system_prompt"] == "Answer in one line.\n" and shown["conversations"] == 0
    assert json.loads(ember("persona", "default", "terse", "--json").out) == {"default": "terse"}
    assert "default persona: terse" in ember("persona", "default").out

    asked = json.loads(ember("ask", "Who are you?", "--persona", "pirate", "--json", "--max-tokens", "8").out)
    assert asked["persona"] == "pirate"
    db = open_db(home)
    assert personas.of_conversation(db, asked["conversation_id"])["name"] == "pirate"

    # remove is destructive: it counts, previews, and off a terminal needs --yes.
    dry = json.loads(ember("persona", "remove", "pirate", "--dry-run", "--json").out)
    assert dry["would_delete"] == {"personas": 1, "conversations": 1, "default": False}
    refused = ember("persona", "remove", "pirate")
    assert_clean_error(refused, contains="pass --yes")
    assert personas.get_persona(db, "pirate")
    done = json.loads(ember("persona", "remove", "pirate", "--yes", "--json").out)
    assert done["removed"] == "pirate"
    assert personas.of_conversation(db, asked["conversation_id"]) is None
    assert convs.messages(db, asked["conversation_id"])   # the conversation keeps its messages
    db.close()


@pytest.mark.parametrize("args, message", [
    (["ask", "hi", "--persona", "ghost"], "no persona named 'ghost'"),
    (["persona", "show", "ghost"], "no persona named 'ghost'"),
    (["persona", "remove", "ghost", "--yes"], "no persona named 'ghost'"),
    (["persona", "default", "ghost"], "no persona named 'ghost'"),
    (["persona", "add", "none", "x"], "means no persona"),
    (["persona", "add", "p", "   "], "needs a system prompt"),
])
def test_bad_persona_input_is_one_clear_line(ember, args, message):
    assert_clean_error(ember(*args), contains=message)


def test_adding_a_persona_twice_needs_replace(ember):
    assert ember("persona", "add", "p", "one").returncode == 0
    assert_clean_error(ember("persona", "add", "p", "two"), contains="--replace")
    assert ember("persona", "add", "P", "two", "--replace").returncode == 0
    assert json.loads(ember("persona", "show", "p", "--json").out)["system_prompt"] == "two"


def _ember_in(home, *args):
    """The real `ember` command with another data directory."""
    import os
    import subprocess
    import sys

    environ = dict(os.environ, EMBER_HOME=str(home))
    environ.pop("EMBER_DEBUG", None)
    result = subprocess.run([sys.executable, "-m", "assistant", *args], capture_output=True, text=True,
                            timeout=120, env=environ)
    result.out, result.err = result.stdout, result.stderr
    return result


def test_personas_go_out_with_export_and_come_back_with_import(ember, home, tmp_path):
    assert ember("persona", "add", "pirate", PIRATE, "--route", "rag", "--temperature", "0.9", "--default").returncode == 0
    assert ember("persona", "add", "poet", "Answer in rhyme.\nAlways.").returncode == 0
    db = open_db(home)
    cid = convs.create_conversation(db)
    convs.add_message(db, cid, "user", "Ahoy?")
    personas.set_for_conversation(db, cid, "pirate")
    db.close()
    mine = json.loads(ember("persona", "list", "--json").out)

    # `ember persona export`: a private file, and `import` into another data directory gives them back.
    file = tmp_path / "personas.json"
    done = ember("persona", "export", "-o", str(file))
    assert done.returncode == 0 and "Exported 2 personas" in done.err and file.stat().st_mode & 0o777 == 0o600
    assert json.loads(file.read_text())["format"] == "ember-personas"
    other = tmp_path / "other"
    first = json.loads(_ember_in(other, "persona", "import", str(file), "--json").out)
    assert (first["added"], first["default"]) == (["pirate", "poet"], "pirate")
    theirs = json.loads(_ember_in(other, "persona", "list", "--json").out)
    assert [dict(p, conversations=0) for p in mine] == theirs   # name, prompt, route, temperature, default
    again = json.loads(_ember_in(other, "persona", "import", str(file), "--json").out)
    assert again["unchanged"] == ["pirate", "poet"] and not again["added"] and again["default"] is None

    # A persona of the same name that differs is the user's until --replace; --dry-run writes nothing.
    assert _ember_in(other, "persona", "add", "poet", "Plain prose.", "--replace").returncode == 0
    kept = _ember_in(other, "persona", "import", str(file))
    assert kept.returncode == 0 and "kept yours: poet" in kept.err

    def poet() -> str:
        store = open_db(other)
        try:
            return personas.get_persona(store, "poet")["system_prompt"]
        finally:
            store.close()

    assert poet() == "Plain prose."
    dry = json.loads(_ember_in(other, "persona", "import", str(file), "--replace", "--dry-run", "--json").out)
    assert dry["replaced"] == ["poet"] and dry["dry_run"] and poet() == "Plain prose."
    assert _ember_in(other, "persona", "import", str(file), "--replace").returncode == 0
    assert poet() == "Answer in rhyme.\nAlways."

    # `ember export` carries them, and each conversation's persona; `ember import` of it restores both.
    export = tmp_path / "export.json"
    assert ember("export", "-o", str(export)).returncode == 0
    document = json.loads(export.read_text())
    assert [p["name"] for p in document["personas"]] == ["pirate", "poet"]
    assert [c.get("persona") for c in document["conversations"]] == ["pirate"]
    third = tmp_path / "third"
    imported = _ember_in(third, "import", str(export), "--json")
    assert imported.returncode == 0, imported.err
    said = json.loads(imported.out)["personas"]
    assert said["added"] == ["pirate", "poet"] and said["conversations_linked"] == 1
    restored = open_db(third)
    try:
        (new_cid,) = [c["id"] for c in convs.list_conversations(restored)]
        assert personas.of_conversation(restored, new_cid)["name"] == "pirate"
        assert personas.default_persona(restored)["name"] == "pirate"
    finally:
        restored.close()


BAD_FILES = [
    ({"format": "ember-personas", "personas": [{"name": "x", "system_prompt": "hi", "route": "moon"}]},
     "persona 1 ('x'): unknown route 'moon'"),
    ({"format": "ember-personas", "personas": [{"name": "x", "system_prompt": "a"}, {"name": "X", "system_prompt": "b"}]},
     "the name 'X' comes twice"),
    ({"format": "chatgpt", "personas": []}, "not an Ember persona file or export"),
    ('{"format": "ember-personas", "personas": [{"name": "a", "system_pro', "truncated"),
]


def test_a_bad_persona_file_is_one_line_and_imports_nothing(ember, tmp_path):
    bad = tmp_path / "bad.json"
    for document, message in BAD_FILES:
        bad.write_text(document if isinstance(document, str) else json.dumps(document))
        assert_clean_error(ember("persona", "import", str(bad)), contains=message)
    assert json.loads(ember("persona", "list", "--json").out) == []
