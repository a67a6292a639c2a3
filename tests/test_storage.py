"""Storage: permissions, WAL, migrations, the conversation log, forgetting, locks and corruption."""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import sqlite_utils

from storage import conversations as convs
from storage import memory, registry
from storage.driver import sqlite3
from storage.db import DB_NAME, integrity_ok, load_vector_extension, open_db, transaction
from storage.errors import DatabaseCorrupt, DatabaseLocked, DataDirError, EmberError, NotFound
from storage.migrations import MIGRATIONS, current_version, migrate
from tests.conftest import another_process_holds_the_lock, without_root_overrides


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_data_dir_is_0700_and_every_database_file_0600(home, db):
    cid = convs.create_conversation(db)
    convs.add_message(db, cid, "user", "hello")
    assert mode(home) == 0o700
    files = sorted(p.name for p in home.iterdir())
    assert {DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"} <= set(files)
    for name in files:
        assert mode(home / name) == 0o600, name


def test_existing_loose_data_dir_is_tightened(home):
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    open_db(home).close()
    assert mode(home) == 0o700


def test_wal_and_foreign_keys_are_on(db):
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    with pytest.raises(sqlite3.IntegrityError):
        with transaction(db):
            db["messages"].insert({"conversation_id": 999, "role": "user", "content": "x", "created": "t"})


def test_data_dir_that_is_a_file_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DataDirError, match="not a directory|cannot create"):
        open_db(blocker)


def test_unreadable_data_dir_is_a_clear_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        result = subprocess.run(
            [*without_root_overrides(), sys.executable, "-c",
             "import sys; from pathlib import Path; from storage.db import open_db\n"
             "from storage.errors import DataDirError\n"
             "try: open_db(Path(sys.argv[1]))\n"
             "except DataDirError as e: print(e); sys.exit(3)", str(locked)],
            capture_output=True, text=True, cwd=Path(__file__).parents[1])
        assert result.returncode == 3, result.stderr
        assert "not readable" in result.stdout
    finally:
        locked.chmod(0o700)


def test_a_file_that_is_not_sqlite_is_reported_as_corrupt(home):
    home.mkdir()
    (home / DB_NAME).write_bytes(b"this is not a database" * 100)
    with pytest.raises(DatabaseCorrupt, match="unreadable"):
        open_db(home)


def _fill(db: sqlite_utils.Database) -> None:
    """Data written with whatever schema version `db` is at."""
    db["conversations"].insert({"id": 1, "title": "Trip", "created": "2026-01-01T00:00:00+00:00",
                                "updated": "2026-01-01T00:00:00+00:00"})
    db["messages"].insert({"id": 1, "conversation_id": 1, "role": "user",
                           "content": "Book the train to Lyon", "created": "2026-01-01T00:00:00+00:00"})


def _database(path) -> sqlite_utils.Database:
    conn = sqlite3.connect(path)
    load_vector_extension(conn)
    return sqlite_utils.Database(conn)


def _schema(db: sqlite_utils.Database) -> dict[str, str]:
    """Every table's schema, leaving out the shadow tables virtual tables keep for themselves."""
    virtual = [t.name for t in db.tables if t.schema.upper().startswith("CREATE VIRTUAL")]
    return {t.name: t.schema for t in db.tables
            if not any(t.name.startswith(v + "_") for v in virtual)}


@pytest.mark.parametrize("start", range(1, len(MIGRATIONS)))
def test_upgrade_from_every_earlier_version_keeps_data(tmp_path, start):
    old = _database(tmp_path / "old.db")
    assert migrate(old, target=start) == start
    _fill(old)
    old.close()

    db = _database(tmp_path / "old.db")
    assert migrate(db) == len(MIGRATIONS)
    fresh = _database(":memory:")
    migrate(fresh)
    assert _schema(db) == _schema(fresh)
    row = db["messages"].get(1)
    assert row["content"] == "Book the train to Lyon" and row["status"] == "complete"
    assert row["origin"] is None and row["client"] is None   # typed into Ember, before the API existed
    assert [h["message_id"] for h in convs.search_messages(db, "lyon")] == [1]


def test_migrations_run_once_and_are_recorded(db):
    names = [r["name"] for r in db["schema_version"].rows_where(order_by="version")]
    assert names == [fn.__name__ for fn in MIGRATIONS]
    assert migrate(db) == len(MIGRATIONS)
    assert db["schema_version"].count == len(MIGRATIONS)


def test_a_database_from_a_newer_ember_is_refused(db):
    db["schema_version"].insert({"version": len(MIGRATIONS) + 1, "name": "future", "applied": "x"})
    with pytest.raises(EmberError, match="newer"):
        migrate(db)


def test_first_user_message_titles_the_conversation(db):
    cid = convs.create_conversation(db)
    convs.add_message(db, cid, "user", "  Plan my week\nwith three gym sessions  ")
    convs.add_message(db, cid, "user", "Something else")
    assert convs.get_conversation(db, cid)["title"] == "Plan my week with three gym sessions"
    convs.rename_conversation(db, cid, "Gym")
    assert convs.list_conversations(db)[0]["title"] == "Gym"


def test_reply_streams_into_its_row_and_is_finished(db):
    cid = convs.create_conversation(db)
    rid = convs.start_reply(db, cid, model="m", route="base")
    assert db["messages"].get(rid)["status"] == "generating"
    convs.update_reply(db, rid, "Hel")
    assert db["messages"].get(rid)["content"] == "Hel"
    convs.finish_reply(db, rid, "Hello", "cancelled", tokens=2, seconds=0.1)
    row = db["messages"].get(rid)
    assert (row["content"], row["status"], row["writer_pid"]) == ("Hello", "cancelled", None)


@contextlib.contextmanager
def running(*command: str) -> Iterator[int]:
    """A real process for the duration; yields its pid once it is ready (it prints a line)."""
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def ember_writer(home: Path):
    """A process with Ember's database open, as a chat writing a reply has."""
    return running(sys.executable, "-c", "import sys\nfrom pathlib import Path\nfrom storage.db import open_db\n"
                   f"db = open_db(Path({str(home)!r}))\nprint('ready', flush=True)\nsys.stdin.read()")


def not_ember():
    """A live process that is not Ember: what a writer's pid can be reused by."""
    return running(sys.executable, "-c", "import sys\nprint('ready', flush=True)\nsys.stdin.read()")


def _ago(minutes: float) -> str:
    return (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=minutes)).isoformat(timespec="milliseconds")


def test_replies_of_dead_writers_are_marked_interrupted_but_live_ones_are_not(db, home):
    cid = convs.create_conversation(db)
    dead = convs.start_reply(db, cid)
    live = convs.start_reply(db, cid)
    db["messages"].update(dead, {"writer_pid": 2 ** 22 + 12345})   # beyond pid_max: never alive
    with ember_writer(home) as pid:
        db["messages"].update(live, {"writer_pid": pid})
        assert convs.recover_interrupted(db) == 1
        assert db["messages"].get(dead)["status"] == "interrupted"
        assert db["messages"].get(live)["status"] == "generating"


def test_a_reply_whose_writer_pid_was_reused_by_another_program_is_interrupted(db):
    cid = convs.create_conversation(db)
    reply = convs.start_reply(db, cid)
    with not_ember() as pid:
        db["messages"].update(reply, {"writer_pid": pid})
        assert convs.recover_interrupted(db) == 1
    assert db["messages"].get(reply)["status"] == "interrupted"


def test_ember_processes_are_told_by_command_line_or_by_holding_the_database(home, tmp_path, db):
    script = tmp_path / "ember"                           # what the console script runs as
    script.write_text("import sys\nprint('ready', flush=True)\nsys.stdin.read()\n")
    with running(sys.executable, str(script)) as pid:
        assert convs.is_ember_process(pid)
    with ember_writer(home) as pid:
        assert not convs.is_ember_process(pid) and convs.is_ember_process(pid, home / DB_NAME)
    with not_ember() as pid:
        assert not convs.is_ember_process(pid, home / DB_NAME)


def test_a_reply_silent_for_longer_than_a_reply_can_take_is_interrupted(db, home):
    cid = convs.create_conversation(db)
    stalled, streaming = convs.start_reply(db, cid), convs.start_reply(db, cid)
    with ember_writer(home) as pid:
        for reply in (stalled, streaming):
            db["messages"].update(reply, {"writer_pid": pid, "created": _ago(30)})
        convs.update_reply(db, streaming, "still going")       # heard from just now
        assert db["messages"].get(streaming)["seconds"] >= 29 * 60
        assert convs.recover_interrupted(db) == 1
        assert db["messages"].get(stalled)["status"] == "interrupted"
        assert db["messages"].get(streaming)["status"] == "generating"
        # A row with an odd date cannot be judged by silence; its live Ember writer keeps it.
        db["messages"].update(streaming, {"created": "sometime"})
        assert convs.recover_interrupted(db) == 0


def test_search_finds_words_across_conversations_and_ignores_fts_syntax(db):
    a = convs.create_conversation(db)
    convs.add_message(db, a, "user", "My sister's birthday is on 3 May")
    b = convs.create_conversation(db)
    convs.add_message(db, b, "user", "Remind me to water the plants")
    hits = convs.search_messages(db, "birthday")
    assert [h["conversation_id"] for h in hits] == [a]
    assert "«birthday»" in hits[0]["snippet"]
    assert [h["conversation_id"] for h in convs.search_messages(db, "plan")] == [b]   # prefix
    assert convs.search_messages(db, 'AND "( NEAR') == []
    assert convs.search_messages(db, "   ") == []


def test_forget_message_conversation_match_and_all(db):
    a = convs.create_conversation(db)
    m1 = convs.add_message(db, a, "user", "my card is 4111 1111")
    m2 = convs.add_message(db, a, "assistant", "noted")
    b = convs.create_conversation(db)
    convs.add_message(db, b, "user", "100% sure about the_file")
    c = convs.create_conversation(db)
    convs.add_message(db, c, "user", "keep me")

    nothing = {"messages": 0, "conversations": 0, "memories": 0, "adapters_tainted": 0}
    one = dict(nothing, messages=1)
    assert convs.forget_message(db, m1) == one
    assert convs.search_messages(db, "4111") == []            # gone from the index too
    assert convs.forget_message(db, m2) == dict(one, conversations=1)
    with pytest.raises(NotFound):
        convs.get_conversation(db, a)
    # LIKE wildcards in the user's text are literal.
    assert convs.forget_matching(db, "0% SURE about the_") == dict(one, conversations=1)
    assert convs.forget_matching(db, "_") == nothing
    assert convs.delete_conversation(db, c) == dict(one, conversations=1)
    with pytest.raises(NotFound):
        convs.forget_message(db, 12345)
    d = convs.create_conversation(db)
    convs.add_message(db, d, "user", "x")
    convs.create_conversation(db)                            # a conversation with no messages goes too
    assert convs.forget_all(db) == dict(one, conversations=2)
    assert db.execute("SELECT count(*) FROM messages_fts").fetchone()[0] == 0
    assert integrity_ok(db)


def test_forget_match_takes_whole_exchanges_and_previews_count_what_delete_does(db):
    a = convs.create_conversation(db)
    ids = [convs.add_message(db, a, role, text) for role, text in (
        ("system", "Be brief."), ("user", "Plan a picnic"), ("assistant", "Bring bread and cheese."),
        ("assistant", "And a blanket."), ("user", "What about drinks?"), ("assistant", "Lemonade."))]
    b = convs.create_conversation(db)
    convs.add_message(db, b, "user", "Is cheese healthy?")
    memory.sync_messages(db)
    registry.register(db, {"id": "a1", "path": "/nowhere", "kind": "lora", "method": "lora", "base_sha256": "x",
                           "status": "inactive"}, [(ids[2], "train")], activate=True)
    # A reply matches: its question and the whole reply go; so does a lone question with its (no) reply.
    selected = convs.select_matching(db, "cheese")
    assert set(selected.message_ids) == {ids[1], ids[2], ids[3]} | {
        m["id"] for m in convs.messages(db, b)}
    assert convs.select_matching(db, "cheese", whole_exchanges=False).message_ids == (
        ids[2], convs.messages(db, b)[0]["id"])
    expected = {"messages": 4, "conversations": 1, "memories": 4, "adapters_tainted": 1}
    assert convs.preview(db, selected) == expected
    assert [m["id"] for m in convs.selected_messages(db, selected)][:3] == ids[1:4]
    assert convs.preview_delete(db, a) == {"messages": 6, "conversations": 1, "memories": 6,
                                           "adapters_tainted": 1}
    assert convs.delete(db, selected) == expected
    assert [m["content"] for m in convs.messages(db, a)] == ["Be brief.", "What about drinks?", "Lemonade."]
    assert registry.get(db, "a1")["status"] == "tainted"


def test_a_write_while_another_process_holds_the_lock_is_a_clear_error(home):
    db = open_db(home, busy_timeout_ms=200)
    cid = convs.create_conversation(db)
    with another_process_holds_the_lock(home):
        with pytest.raises(DatabaseLocked, match="locked by another process"):
            convs.add_message(db, cid, "user", "hello")
    convs.add_message(db, cid, "user", "hello")
    assert [m["content"] for m in convs.messages(db, cid)] == ["hello"]


def test_export_all_has_every_message_in_order(db):
    a = convs.create_conversation(db)
    convs.add_message(db, a, "user", "one")
    convs.add_message(db, a, "assistant", "two")
    exported = convs.export_all(db)
    assert [m["content"] for m in exported[0]["messages"]] == ["one", "two"]
    assert current_version(db) == len(MIGRATIONS)


def test_preferences_keep_one_value_per_key_and_the_recent_models_newest_first(db):
    from storage import preferences

    assert preferences.get(db, preferences.THEME) is None and preferences.recent_models(db) == []
    preferences.put(db, preferences.THEME, "nord")
    preferences.put(db, preferences.THEME, "dracula")
    assert preferences.get(db, preferences.THEME) == "dracula"
    for n in range(preferences.RECENT_KEPT + 2):
        preferences.add_recent_model(db, f"/m/{n}.gguf")
    preferences.add_recent_model(db, "/m/5.gguf")                 # again: moves to the front, once
    recent = preferences.recent_models(db)
    assert recent[0] == "/m/5.gguf" and recent.count("/m/5.gguf") == 1 and len(recent) == preferences.RECENT_KEPT
    assert recent[1:3] == ["/m/9.gguf", "/m/8.gguf"]
    db.execute("UPDATE preferences SET value = 'not json' WHERE key = ?", [preferences.THEME])   # edited by hand
    assert preferences.get(db, preferences.THEME, "fallback") == "fallback"
