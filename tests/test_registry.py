"""The adapter registry, the privacy ledger, run records and forgetting's taint."""
from __future__ import annotations

import pytest

from storage import conversations as convs
from storage import feedback, ledger, registry, runs
from storage.errors import InvalidInput, NotFound


def _adapter(db, adapter_id, sources, *, activate=True, created=None):
    row = {"id": adapter_id, "path": f"/nonexistent/{adapter_id}.gguf", "kind": "lora", "method": "lora",
           "base_sha256": "abc", "base_name": "m.gguf", "params": {"rank": 8}, "eval": {"heldout_loss": 1.0},
           "status": "inactive", "epsilon": 8.0, "delta": 1e-6, "examples": len(sources)}
    if created:
        row["created"] = created
    registry.register(db, row, [(m, "train") for m in sources], activate=activate)


@pytest.fixture
def messages(db):
    cid = convs.create_conversation(db)
    return cid, [convs.add_message(db, cid, "user", f"message {i}") for i in range(4)]


def test_registering_with_activate_makes_it_the_only_active_adapter(db, messages):
    _, ids = messages
    _adapter(db, "a1", ids[:2])
    _adapter(db, "a2", ids[2:])
    assert registry.active(db)["id"] == "a2"
    assert [a["status"] for a in registry.list_adapters(db)].count("active") == 1
    assert {s["message_id"] for s in registry.sources(db, "a1")} == set(ids[:2])


def test_use_and_rollback_walk_back_through_what_was_used(db, messages):
    _, ids = messages
    _adapter(db, "a1", ids)
    _adapter(db, "a2", ids)
    _adapter(db, "a3", ids, activate=False)
    registry.use(db, "a3")
    assert registry.rollback(db)["id"] == "a2"
    assert registry.rollback(db)["id"] == "a1"
    assert registry.rollback(db) is None
    with pytest.raises(InvalidInput, match="nothing to roll back"):
        registry.rollback(db)


def test_forgetting_a_source_message_taints_and_withdraws_the_adapter(db, messages):
    cid, ids = messages
    _adapter(db, "old", ids[2:])
    _adapter(db, "new", ids[:2])
    counts = convs.forget_message(db, ids[0])
    assert counts["adapters_tainted"] == 1
    new = registry.get(db, "new")
    assert new["status"] == "tainted" and str(ids[0]) in new["reason"]
    assert registry.active(db) is None
    assert registry.get(db, "old")["status"] == "inactive"
    with pytest.raises(InvalidInput, match="tainted"):
        registry.use(db, "new")
    assert convs.forget_all(db)["adapters_tainted"] == 1     # "old" too, now


def test_an_adapter_whose_sources_vanished_while_training_registers_tainted(db, messages):
    _, ids = messages
    convs.forget_message(db, ids[1])
    _adapter(db, "late", ids)
    assert registry.get(db, "late")["status"] == "tainted"
    assert registry.active(db) is None


def test_remove_deletes_record_and_lineage(db, messages):
    _, ids = messages
    _adapter(db, "a1", ids)
    registry.remove(db, "a1")
    with pytest.raises(NotFound):
        registry.get(db, "a1")
    assert db["adapter_sources"].count == 0


def test_ledger_adds_up_dp_runs_and_counts_the_others(db):
    ledger.record(db, "r1", method="lora", dp=True, epsilon=8.0, delta=1e-6, sigma=1.1, clip=1.0,
                  sample_rate=0.1, steps=80, examples=50)
    ledger.record(db, "r1", method="lora", dp=True, epsilon=8.0, delta=1e-6, sigma=1.1, clip=1.0,
                  sample_rate=0.1, steps=80, examples=50)      # a resumed run is entered once
    ledger.record(db, "r2", method="lora", dp=False, epsilon=None, delta=None, sigma=None, clip=None,
                  sample_rate=None, steps=10, examples=50)
    assert ledger.spent(db) == {"epsilon": 8.0, "delta": 1e-6, "dp_runs": 1, "non_dp_runs": 1}


def test_a_run_whose_process_died_is_resumable(db):
    runs.start(db, "r1", method="lora", steps=10, fingerprint="f")
    db["adapt_runs"].update("r1", {"pid": 2 ** 22 + 12345})   # no such process
    assert runs.current(db) is None
    assert [r["id"] for r in runs.resumable(db)] == ["r1"]
    assert runs.get(db, "r1")["status"] == "interrupted"


def test_feedback_latest_event_wins_and_forgetting_removes_it(db, messages):
    cid, ids = messages
    reply = convs.add_message(db, cid, "assistant", "an answer")
    feedback.rate(db, reply, "up")
    feedback.rate(db, reply, "down")
    feedback.edit(db, reply, "better answer")
    assert feedback.state(db, cid)[reply] == {"rating": "down", "edit": "better answer"}
    feedback.rate(db, reply, "clear")
    assert feedback.state(db, cid)[reply]["rating"] is None
    with pytest.raises(InvalidInput, match="only replies"):
        feedback.rate(db, ids[0], "up")
    feedback.set_excluded(db, cid)
    assert feedback.is_excluded(db, cid)
    feedback.set_excluded(db, cid, False)
    assert not feedback.is_excluded(db, cid)
    convs.forget_message(db, reply)
    assert db["feedback"].count_where("message_id = ?", [reply]) == 0
    convs.delete_conversation(db, cid)
    assert db["feedback"].count == 0
