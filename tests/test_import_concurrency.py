"""`ember import` beside the chat: a large export is written in short transactions, so another process's
writes never wait out the busy timeout; bad input anywhere still imports nothing; a killed import is
completed by running it again. Real SQLite files and real processes; the export is the synthetic one
`ember bench import` uses."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.imports import write_export
from storage import imports
from storage.db import open_db
from tests.conftest import assert_clean_error

CONVERSATIONS, PER = 800, 20            # 16,000 messages, 6 MB: one transaction held the lock for ~3 s
BUSY_MS = 1000                          # every process here waits at most this long for the lock

# A stand-in for the chat: logs a message, every 20 ms, until `stop` exists; reports what it logged.
WRITER = """
import json, sys, time
from pathlib import Path
from storage import conversations as convs
from storage.db import open_db
from storage.errors import DatabaseLocked

db = open_db(Path(sys.argv[1]), busy_timeout_ms=int(sys.argv[2]))
conversation = convs.create_conversation(db, "beside the import")
print("ready", flush=True)
logged, failed, slowest = [], [], 0.0
while not Path(sys.argv[3]).exists():
    started = time.perf_counter()
    try:
        logged.append(convs.add_message(db, conversation, "user", f"message {len(logged)}"))
    except DatabaseLocked as err:
        failed.append(str(err))
    slowest = max(slowest, time.perf_counter() - started)
    time.sleep(0.02)
print(json.dumps({"logged": logged, "failed": failed, "slowest": slowest}), flush=True)
"""

# `ember import` without the indexing after it (embedding 16,000 messages takes minutes): the same
# settings (EMBER_HOME, EMBER_BUSY_TIMEOUT_MS), the same store, the same `merge`.
IMPORTER = """
import json, sys
from pathlib import Path
from assistant.cli.common import open_store, settings_from
from assistant.importers import open_export
from assistant.importing import merge

print(json.dumps(merge(open_store(settings_from()), open_export(Path(sys.argv[1])))), flush=True)
"""


@pytest.fixture(scope="module")
def big_export(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("export") / "conversations.json"
    write_export(path, CONVERSATIONS, PER)
    return path


def environ(home: Path) -> dict[str, str]:
    env = dict(os.environ, EMBER_HOME=str(home), EMBER_BUSY_TIMEOUT_MS=str(BUSY_MS))
    env.pop("EMBER_DEBUG", None)
    return env


def start_importer(home: Path, export: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", IMPORTER, str(export)], env=environ(home),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class Writer:
    """Another process logging messages into `home` for as long as the `with` block lasts."""

    def __init__(self, home: Path, tmp_path: Path):
        self.stop = tmp_path / "stop-writing"
        self.process = subprocess.Popen([sys.executable, "-c", WRITER, str(home), str(BUSY_MS), str(self.stop)],
                                        env=environ(home), stdout=subprocess.PIPE, text=True)
        self.report: dict = {}

    def __enter__(self) -> "Writer":
        assert self.process.stdout.readline().strip() == "ready"
        return self

    def __exit__(self, *exc) -> None:
        self.stop.touch()
        out, _ = self.process.communicate(timeout=60)
        self.report = json.loads(out)


def imported(db) -> tuple[int, int]:
    """Imported conversations and messages in the log."""
    return (db.execute("SELECT COUNT(*) FROM conversations WHERE import_id IS NOT NULL").fetchone()[0],
            db.execute("SELECT COUNT(*) FROM messages WHERE import_id IS NOT NULL").fetchone()[0])


def test_another_process_logs_every_message_while_a_large_import_runs(db, home, tmp_path, big_export):
    with Writer(home, tmp_path) as writer:
        importer = start_importer(home, big_export)
        out, err = importer.communicate(timeout=120)
    assert importer.returncode == 0, err
    result, logged = json.loads(out), writer.report["logged"]
    assert writer.report["failed"] == [] and writer.report["slowest"] < BUSY_MS / 1000
    assert result["messages"]["added"] == CONVERSATIONS * PER and imported(db) == (CONVERSATIONS, CONVERSATIONS * PER)
    assert result["write_lock"]["longest_ms"] < BUSY_MS / 2
    # The chat's messages went in between the import's batches, not only before or after them.
    ids = [r[0] for r in db.execute("SELECT id FROM messages WHERE import_id IS NOT NULL ORDER BY id")]
    assert sum(ids[0] < i < ids[-1] for i in logged) >= 5, (len(logged), ids[0], ids[-1])
    assert db.execute("SELECT COUNT(*) FROM messages WHERE import_id IS NULL").fetchone()[0] == len(logged)
    assert imports.sources(db)[0]["complete"]


def truncated_at_the_end(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-200])


def dangling_parent_in_the_last_conversation(path: Path) -> None:
    last = {"id": "last", "title": "Broken", "create_time": 1.8e9, "current_node": "m1", "mapping": {
        "m1": {"id": "m1", "parent": "gone", "children": [], "message": {
            "id": "m1", "author": {"role": "user"}, "create_time": 1.8e9,
            "content": {"content_type": "text", "parts": ["Hello"]}, "metadata": {}}}}}
    path.write_bytes(path.read_bytes()[:-1] + b"," + json.dumps(last).encode() + b"]")


@pytest.mark.parametrize("spoil, place", [
    (truncated_at_the_end, "truncated"),
    (dangling_parent_in_the_last_conversation, f"conversation {CONVERSATIONS + 1}")])
def test_bad_input_at_the_end_of_a_large_export_imports_nothing_and_blocks_no_one(
        spoil, place, db, ember, home, tmp_path, big_export):
    export = tmp_path / "conversations.json"
    export.write_bytes(big_export.read_bytes())
    spoil(export)
    with Writer(home, tmp_path) as writer:
        result = ember("import", str(export), env={"EMBER_BUSY_TIMEOUT_MS": str(BUSY_MS)})
    assert_clean_error(result, contains=place)
    assert "conversations.json" in result.err and "nothing was imported" in result.err
    assert imported(db) == (0, 0) and db["imports"].count == 0
    # Found by reading, before any write: the other process never waited for the lock.
    assert writer.report["failed"] == [] and writer.report["slowest"] < BUSY_MS / 1000
    assert len(writer.report["logged"]) >= 5


def wait_for_a_committed_batch(db, importer: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while imported(db)[0] == 0:
        assert importer.poll() is None, "the import ended before any batch was seen"
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_killed_import_is_listed_incomplete_and_running_it_again_completes_it(db, ember, home, big_export):
    importer = start_importer(home, big_export)
    wait_for_a_committed_batch(db, importer)
    os.kill(importer.pid, signal.SIGKILL)
    importer.wait(timeout=10)
    conversations, messages = imported(db)
    assert 0 < conversations < CONVERSATIONS
    # Each conversation is there whole and excluded from learning, from the batch that brought it.
    assert messages == conversations * PER
    assert db.execute("SELECT COUNT(DISTINCT conversation_id) FROM feedback WHERE kind = 'exclude'"
                      ).fetchone()[0] == conversations
    status = ember("status", "--json")
    assert [s["complete"] for s in json.loads(status.out)["imports"]["sources"]] == [False], status.err
    assert "incomplete: #1" in ember("status").out

    again = start_importer(home, big_export)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    result = json.loads(out)
    assert result["source"]["import_id"] == 1 and db["imports"].count == 1 and imports.sources(db)[0]["complete"]
    assert result["conversations"]["added"] + result["conversations"]["unchanged"] == CONVERSATIONS
    assert imported(db) == (CONVERSATIONS, CONVERSATIONS * PER)
    for table in ("conversations", "messages"):
        assert db.execute(f"SELECT COUNT(*) FROM (SELECT 1 FROM {table} WHERE external_id IS NOT NULL "
                          "GROUP BY external_id HAVING COUNT(*) > 1)").fetchone()[0] == 0
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# `ember memory import` without the embedding after it: the same store and the same upsert.
NOTES_IMPORTER = """
import json, sys
from pathlib import Path
from assistant.cli.common import open_store, settings_from
from assistant.memory_import import read_records
from storage import memory

records, _ = read_records(Path(sys.argv[1]))
db = open_store(settings_from())
print(json.dumps(memory.upsert_records(db, records, per_transaction=memory.RECORDS_PER_TRANSACTION)), flush=True)
"""


def test_a_large_memory_import_lets_another_process_log_beside_it(db, home, tmp_path):
    notes = tmp_path / "notes.jsonl"
    notes.write_text("".join(json.dumps({"id": f"n{i}", "text": f"Note {i}: the heron came back to pond {i} "
                                         "at dawn, and the reeds were full of wrens. " * 6}) + "\n"
                             for i in range(12_000)))
    with Writer(home, tmp_path) as writer:
        importer = subprocess.Popen([sys.executable, "-c", NOTES_IMPORTER, str(notes)], env=environ(home),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = importer.communicate(timeout=180)
    assert importer.returncode == 0, err
    assert json.loads(out)["added"] == 12_000
    assert writer.report["failed"] == [] and writer.report["slowest"] < BUSY_MS / 1000
    assert db.execute("SELECT COUNT(DISTINCT source_id) FROM memory_chunks WHERE source = 'import'").fetchone()[0] == 12_000
