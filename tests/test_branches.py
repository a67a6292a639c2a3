"""Conversations as trees (issue 22 §1): the migration, the kept branch, what history, memory, learning,
`ember ask --regenerate/--edit`, `ember history --choose` and export/import make of alternatives."""
from __future__ import annotations

import json

import pytest
import sqlite_utils

from adapters import dataset
from storage import conversations as convs
from storage import feedback, memory
from storage.db import load_vector_extension, open_db
from storage.driver import sqlite3
from storage.migrations import MIGRATIONS, migrate
from tests.conftest import assert_clean_error
from tests.test_import import ember_at

TREE = MIGRATIONS.index(next(fn for fn in MIGRATIONS if fn.__name__ == "m014_message_tree")) + 1


@pytest.mark.parametrize("start", range(1, TREE))
def test_an_upgraded_log_is_one_line_per_conversation_ending_at_its_newest_message(tmp_path, start):
    conn = sqlite3.connect(tmp_path / "old.db")
    load_vector_extension(conn)
    old = sqlite_utils.Database(conn)
    migrate(old, target=start)
    stamp = "2026-01-01T00:00:00+00:00"
    for cid in (1, 2):
        old["conversations"].insert({"id": cid, "title": f"c{cid}", "created": stamp, "updated": stamp})
    # Interleaved, as two conversations written at the same time are.
    for mid, cid, role in [(1, 1, "user"), (2, 2, "user"), (3, 1, "assistant"), (4, 2, "assistant"),
                           (5, 1, "user"), (6, 1, "assistant")]:
        old["messages"].insert({"id": mid, "conversation_id": cid, "role": role, "content": f"m{mid}",
                                "created": stamp})
    assert migrate(old) == len(MIGRATIONS)
    parents = {r["id"]: r["parent_id"] for r in old["messages"].rows}
    assert parents == {1: None, 3: 1, 5: 3, 6: 5, 2: None, 4: 2}
    assert [r["id"] for r in convs.branch(old, 1)] == [1, 3, 5, 6]
    assert [r["id"] for r in convs.branch(old, 2)] == [2, 4]
    # New messages follow the kept branch.
    new = convs.add_message(old, 2, "user", "next")
    assert old["messages"].get(new)["parent_id"] == 4 and old["conversations"].get(2)["current_id"] == new


def _tree(db):
    """A question answered twice (the second answer kept), then edited into a new branch."""
    cid = convs.create_conversation(db)
    q = convs.add_message(db, cid, "user", "Suggest a name for my cat.")
    a1 = convs.add_message(db, cid, "assistant", "Whiskers is a fine name.")
    a2 = convs.add_message(db, cid, "assistant", "Call her Marmalade.", parent_id=q)
    return cid, q, a1, a2


def test_alternatives_are_kept_and_choosing_one_moves_history_and_memory(db):
    cid, q, a1, a2 = _tree(db)
    assert [m["id"] for m in convs.branch(db, cid)] == [q, a2]
    assert convs.alternatives(db, a1) == [a1, a2]
    memory.sync_messages(db)
    in_memory = {r[0] for r in db.execute("SELECT DISTINCT message_id FROM memory_chunks")}
    assert in_memory == {q, a2}        # the reply regenerated away is not memory
    assert convs.choose(db, a1) == a1
    assert [m["id"] for m in convs.branch(db, cid)] == [q, a1]
    assert {r[0] for r in db.execute("SELECT DISTINCT message_id FROM memory_chunks")} == {q}
    memory.sync_messages(db)
    assert {r[0] for r in db.execute("SELECT DISTINCT message_id FROM memory_chunks")} == {q, a1}
    # Forgetting the kept reply keeps the tree whole: the branch ends at its question again.
    convs.forget_message(db, a1)
    assert [m["id"] for m in convs.branch(db, cid)] == [q, a2]
    follow = convs.add_message(db, cid, "user", "Thanks!")
    assert db["messages"].get(follow)["parent_id"] == a2


def test_learning_reads_the_kept_branch_and_a_reply_kept_over_alternatives_counts_as_preferred(db, template):
    cid, q, a1, a2 = _tree(db)
    going_on = convs.add_message(db, cid, "user", "Marmalade it is.")
    # An edit of the question starts a branch, then the user goes back to the first one.
    edited = convs.add_message(db, cid, "user", "Suggest a name for my dog.", parent_id=None)
    dog = convs.add_message(db, cid, "assistant", "Rex.")
    convs.choose(db, going_on)
    for i in range(6):   # enough other examples for a dataset
        other = convs.create_conversation(db)
        convs.add_message(db, other, "user", f"Filler question {i} about the weather?")
    data = dataset.build(db, template, min_train=1)
    targets = {e.message_id: e.kind for e in data.train + data.heldout}
    assert targets[a2] == "preferred" and targets[q] == "user" and targets[going_on] == "user"
    assert a1 not in targets and edited not in targets and dog not in targets
    assert not {a1, edited, dog} & {m for m, _ in data.sources}
    assert data.skipped["messages on branches not kept"] == 3
    # A reply with no alternatives, or one the user did not go on from, is no target unless rated.
    feedback.rate(db, a2, "down")
    assert a2 not in {e.message_id for e in (lambda d: d.train + d.heldout)(dataset.build(db, template, min_train=1))}


def test_cli_regenerate_edit_choose_and_export_import_keep_the_tree(ember, home, tmp_path):
    first = json.loads(ember("ask", "Name one colour.", "--route", "base", "--max-tokens", "4", "--json").out)
    cid, question, reply = first["conversation_id"], None, first["message_id"]
    again = ember("ask", "--regenerate", str(reply), "--route", "base", "--max-tokens", "4", "--seed", "7", "--json")
    assert again.returncode == 0, again.err
    second = json.loads(again.out)
    assert second["conversation_id"] == cid and second["message_id"] != reply
    tree = json.loads(ember("history", "--conversation", str(cid), "--json").out)[0]
    by_id = {m["id"]: m for m in tree["messages"]}
    question = by_id[reply]["parent_id"]
    assert by_id[second["message_id"]]["parent_id"] == question and by_id[question]["parent_id"] is None
    assert tree["branch"] == [question, second["message_id"]] and tree["current_id"] == second["message_id"]
    assert "[2/2]" in ember("history", "--conversation", str(cid)).out

    edit = json.loads(ember("ask", "Name one animal.", "--edit", str(question), "--route", "base",
                            "--max-tokens", "4", "--json").out)
    tree = json.loads(ember("history", "--conversation", str(cid), "--json").out)[0]
    assert len(tree["messages"]) == 5 and tree["branch"][-1] == edit["message_id"]
    chosen = json.loads(ember("history", "--choose", str(reply), "--json").out)[0]
    assert chosen["branch"] == [question, reply]

    context = json.loads(ember("history", "--context", str(edit["message_id"]), "--json").out)
    assert context["history_messages"] == 0 and context["question"] > 0 and context["reserved"] > 0
    assert context["prompt"] == context["system"] + context["memories"] + context["history"] + context["question"]
    assert context["reply"] == edit["tokens"] and context["free"] == context["n_ctx"] - context["prompt"]
    assert_clean_error(ember("history", "--context", str(question)), contains="not a reply")

    assert_clean_error(ember("ask", "--regenerate", str(question)), contains="regenerate takes the id of a reply")
    assert_clean_error(ember("ask", "x", "--edit", str(reply)), contains="give the id of one of your own")
    assert_clean_error(ember("ask", "--regenerate", "999"), contains="no message with id 999")

    exported = tmp_path / "tree.json"
    assert ember("export", "-o", str(exported)).returncode == 0
    elsewhere = tmp_path / "elsewhere"
    assert ember_at(elsewhere, "import", str(exported), "--learn").returncode == 0
    moved = open_db(elsewhere)
    (moved_cid,) = [c["id"] for c in convs.list_conversations(moved)]

    def shape(db, conversation_id):
        rows = convs.messages(db, conversation_id)
        place = {m["id"]: i for i, m in enumerate(rows)}
        return ([(m["role"], m["content"], place.get(m["parent_id"])) for m in rows],
                [place[m["id"]] for m in convs.branch(db, conversation_id)])

    source = open_db(home)
    assert shape(moved, moved_cid) == shape(source, cid)
    assert shape(moved, moved_cid)[1] == [0, 1]      # the kept branch: the question and its first reply
    markdown = ember("export", "--format", "md").out
    assert "Name one colour." in markdown and "Name one animal." not in markdown
    # Importing the same export again changes nothing.
    repeat = json.loads(ember_at(elsewhere, "import", str(exported), "--json").stdout)
    assert repeat["conversations"] == {"added": 0, "updated": 0, "unchanged": 1}
    assert shape(open_db(elsewhere), moved_cid) == shape(source, cid)
