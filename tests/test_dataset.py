"""The dataset builder: loss only on what carries the user's signal, redaction, split, lineage."""
from __future__ import annotations

import pytest

from adapters import dataset
from adapters.errors import NotEnoughData
from storage import conversations as convs
from storage import feedback


def _exchange(db, question, answer, cid=None):
    cid = cid or convs.create_conversation(db)
    user = convs.add_message(db, cid, "user", question)
    reply = convs.add_message(db, cid, "assistant", answer)
    return cid, user, reply


def _loss_text(template, ex):
    return template.llm.detokenize(list(ex.tokens[ex.loss_from:]), special=True).decode()


@pytest.fixture
def log(db):
    """Twelve conversations: replies approved, rejected, edited, untouched; one excluded."""
    made = {"up": [], "down": [], "edit": [], "plain": [], "user": []}
    for i in range(12):
        cid, user, reply = _exchange(db, f"Question number {i} about my garden?", f"Plain answer {i}.")
        made["user"].append(user)
        kind = ("up", "down", "edit", "plain")[i % 4]
        if kind in ("up", "down"):
            feedback.rate(db, reply, kind)
        elif kind == "edit":
            feedback.edit(db, reply, f"Edited answer {i}, the way I like it.")
        made[kind].append(reply)
    excluded, secret_user, secret_reply = _exchange(db, "Secret plans nobody should learn", "Fine.")
    feedback.rate(db, secret_reply, "up")
    feedback.set_excluded(db, excluded)
    made["excluded"] = [secret_user, secret_reply]
    return made


def test_targets_are_user_turns_and_approved_or_edited_replies_never_rejected_ones(db, template, log):
    data = dataset.build(db, template)
    examples = data.train + data.heldout
    targets = {e.message_id: e for e in examples}
    assert set(log["user"]) <= set(targets)
    assert set(log["up"]) <= set(targets)
    assert set(log["edit"]) <= set(targets)
    assert not set(log["down"]) & set(targets)
    assert not set(log["plain"]) & set(targets)
    assert not set(log["excluded"]) & {m for m, _ in data.sources}
    assert data.skipped["rejected replies"] == 3


def test_loss_falls_on_the_target_text_and_its_end_marker_only(db, template, log):
    data = dataset.build(db, template)
    by_id = {e.message_id: e for e in data.train + data.heldout}
    edited = by_id[log["edit"][0]]
    assert _loss_text(template, edited) == "Edited answer 2, the way I like it.<|im_end|>"
    assert edited.kind == "edited"
    user = by_id[log["user"][1]]
    assert _loss_text(template, user) == "Question number 1 about my garden?<|im_end|>"
    context = template.llm.detokenize(list(user.tokens[:user.loss_from]), special=True).decode()
    assert context.endswith("<|im_start|>user\n")
    approved = by_id[log["up"][0]]
    prefix = template.llm.detokenize(list(approved.tokens[:approved.loss_from]), special=True).decode()
    assert "Question number 0 about my garden?" in prefix      # its question is context, without loss
    assert prefix.endswith("<|im_start|>assistant\n")


def test_edited_reply_replaces_the_original_in_later_context(db, template):
    cid, _, reply = _exchange(db, "First question here please?", "Original wording.")
    for i in range(8):
        _exchange(db, f"Filler question {i} with enough words?", "ok", cid)
    feedback.edit(db, reply, "Better wording.")
    data = dataset.build(db, template, max_len=512)
    texts = [template.llm.detokenize(list(e.tokens), special=True).decode() for e in data.train + data.heldout]
    assert any("Better wording." in t for t in texts)
    assert not any("Original wording." in t for t in texts)


def test_pii_is_redacted_before_tokenizing(db, template):
    for i in range(8):
        _exchange(db, f"Mail me at jane.doe{i}@example.com or call +44 20 7946 0958 about item {i}", "ok")
    data = dataset.build(db, template)
    text = " ".join(template.llm.detokenize(list(e.tokens), special=True).decode() for e in data.train + data.heldout)
    assert "example.com" not in text and "7946" not in text
    assert data.redactions.get("email", 0) + data.redactions.get("EMAIL", 0) >= 8


def test_split_is_stable_and_held_out_examples_are_never_trained_on(db, template, log):
    first = dataset.build(db, template)
    _exchange(db, "A brand new question arrives later?", "ok")
    second = dataset.build(db, template)
    held1 = {e.message_id for e in first.heldout}
    held2 = {e.message_id for e in second.heldout}
    assert held1 <= held2
    assert not held2 & {e.message_id for e in second.train}
    assert first.fingerprint != second.fingerprint
    assert dataset.build(db, template).fingerprint == second.fingerprint


def test_long_messages_are_cut_to_max_len_with_recent_context_first(db, template):
    for i in range(8):
        _exchange(db, " ".join(["word"] * 400) + f" {i}", "short")
    data = dataset.build(db, template, max_len=64)
    assert all(len(e.tokens) <= 64 and e.loss_tokens > 0 for e in data.train + data.heldout)


def test_too_little_data_is_a_clear_error(db, template):
    _exchange(db, "Only one question?", "yes")
    with pytest.raises(NotEnoughData, match="not enough to learn from"):
        dataset.build(db, template)


def test_lineage_lists_every_message_an_example_contains(db, template, log):
    data = dataset.build(db, template)
    sources = dict(data.sources)
    for ex in data.train + data.heldout:
        for mid in (*ex.context_ids, ex.message_id):
            assert mid in sources
    assert set(sources.values()) <= {"train", "heldout"}
