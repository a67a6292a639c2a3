"""The log, turned into training examples that carry the user's signal (see DESIGN: "What the adapter
learns from").

One example per target message: the user's own turns, and assistant replies the user rated up,
edited (the edit replaces the reply) or preferred (among regenerated alternatives, the one the user
went on from). Only the branch the user kept counts: a regenerated-away reply or an edited-away
message is never read. A reply rated down is never a target; it may still appear in the
context of a later turn, because the user's next message answers it. Conversations the user excluded are
skipped entirely, and so, when the user says so (`learn_from_api = false`), are conversations that came
through `ember serve` from other apps. Every text is redacted (emails, phones, cards, accounts, addresses) before it is
tokenized. Personal facts the user states ("my locker code is …") stay in memory only: those sentences
are cut from every text before it is tokenized (`adapters/facts.py`; `keep_facts=True` trains on them
too). Examples are split into train and held-out by a stable hash of the target message id, so a
message stays on the same side across runs and the gate never scores an adapter on its own training data.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import TYPE_CHECKING, Iterable

from adapters import facts as personal_facts
from adapters.errors import NotEnoughData
from adapters.redact import redact_counts
from adapters.template import ChatTemplate, Message
from storage import conversations as convs
from storage import feedback

if TYPE_CHECKING:
    import sqlite_utils

CONTEXT_MESSAGES = 4       # earlier messages shown before a target (two exchanges)
HELDOUT_PERCENT = 20
MIN_TRAIN = 4
MAX_EXAMPLES = 1000        # the newest targets; bounds training time and memory on a long log
FACTS_SKIPPED = "personal facts kept in memory only"


@dataclasses.dataclass(frozen=True)
class Example:
    """One training sequence: loss falls only on `tokens[loss_from:]` (the target and its end marker)."""

    tokens: tuple[int, ...]
    loss_from: int
    message_id: int                   # the target message
    context_ids: tuple[int, ...]      # the earlier messages shown before it
    kind: str                         # user | approved | edited | preferred
    split: str                        # train | heldout

    @property
    def loss_tokens(self) -> int:
        """How many tokens carry loss."""
        return len(self.tokens) - self.loss_from


@dataclasses.dataclass
class Dataset:
    """Examples for one adaptation run, with what they came from."""

    train: list[Example]
    heldout: list[Example]
    redactions: dict[str, int]
    skipped: dict[str, int]

    @property
    def sources(self) -> list[tuple[int, str]]:
        """(message id, split) for every message whose text any example contains (lineage)."""
        seen: dict[int, str] = {}
        for ex in self.train + self.heldout:
            for mid in (*ex.context_ids, ex.message_id):
                if seen.get(mid) != "train":
                    seen[mid] = ex.split
        return sorted(seen.items())

    @property
    def fingerprint(self) -> str:
        """Identifies the exact examples, so a resumed run can check it trains on the same data."""
        digest = hashlib.sha256()
        for ex in self.train + self.heldout:
            digest.update(repr((ex.message_id, ex.split, ex.loss_from, ex.tokens)).encode())
        return digest.hexdigest()[:16]


def heldout(message_id: int) -> bool:
    """Stable split: the same message is held out in every run."""
    digest = hashlib.sha256(f"ember-split:{message_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT


def build(db: sqlite_utils.Database, template: ChatTemplate, *, max_len: int = 192,
          min_train: int = MIN_TRAIN, max_examples: int = MAX_EXAMPLES, keep_facts: bool = False,
          learn_from_api: bool = True) -> Dataset:
    """Training and held-out examples from every conversation the user has not excluded (nor, with
    `learn_from_api=False`, any conversation holding a message that came through `ember serve`).

    At most `max_examples` targets, the newest; older ones are counted in `skipped`, as are the personal
    fact sentences left to memory (unless `keep_facts`).
    """
    excluded = feedback.excluded_conversations(db)
    from_api = set() if learn_from_api else convs.api_conversations(db)
    redactions: collections.Counter[str] = collections.Counter()
    skipped: collections.Counter[str] = collections.Counter()
    examples: list[Example] = []
    for conv in convs.list_conversations(db):
        if conv["id"] in excluded:
            skipped["excluded conversation messages"] += conv["messages"]
            continue
        if conv["id"] in from_api:
            skipped["API conversation messages"] += conv["messages"]
            continue
        rows = convs.branch(db, conv["id"])
        others = conv["messages"] - len(rows)
        if others:
            skipped["messages on branches not kept"] += others
        opinions = feedback.state(db, conv["id"])
        shown: list[tuple[int, Message]] = []
        for index, row in enumerate(rows):
            row = dict(row, continued=index + 1 < len(rows))
            opinion = opinions.get(row["id"], {})
            text, found = redact_counts(opinion.get("edit") or row["content"])
            redactions.update(found)
            if not keep_facts and row["role"] == "user":
                text, moved = personal_facts.split(text)
                if moved:
                    skipped[FACTS_SKIPPED] += len(moved)
            kind = _target_kind(row, opinion)
            if kind is None and row["role"] == "assistant" and opinion.get("rating") == "down":
                skipped["rejected replies"] += 1
            if kind is not None and text.strip():
                example = _example(template, shown[-CONTEXT_MESSAGES:], row, text, kind, max_len)
                if example is None:
                    skipped["too long"] += 1
                else:
                    examples.append(example)
            if row["role"] != "system" and (row["content"] or opinion.get("edit")):
                shown.append((row["id"], {"role": row["role"], "content": text}))
    if len(examples) > max_examples:
        examples.sort(key=lambda e: e.message_id)
        skipped["older than the newest %d" % max_examples] += len(examples) - max_examples
        examples = examples[-max_examples:]
    train = [e for e in examples if e.split == "train"]
    held = [e for e in examples if e.split == "heldout"]
    if len(train) < min_train or not held:
        raise NotEnoughData(
            f"not enough to learn from yet: {len(train)} training and {len(held)} held-out examples "
            f"(need at least {min_train} and 1); chat more, or rate replies you like")
    return Dataset(train, held, dict(redactions), dict(skipped))


def _target_kind(row: dict, opinion: dict) -> str | None:
    """Why a message is a training target, or None when it carries no user signal."""
    if row["role"] == "user":
        return "user"
    if row["role"] != "assistant":
        return None
    if opinion.get("edit"):
        return "edited"
    if opinion.get("rating") == "up" and row["status"] == "complete":
        return "approved"
    if (opinion.get("rating") != "down" and row["status"] == "complete" and row.get("alternatives", 1) > 1
            and row.get("continued")):
        return "preferred"   # the user saw alternatives for this question, kept this one and went on
    return None


def _example(template: ChatTemplate, shown: list[tuple[int, Message]], row: dict, text: str, kind: str,
             max_len: int) -> Example | None:
    """Fit the target with as much recent context as `max_len` allows (oldest messages dropped first)."""
    message = {"role": row["role"], "content": text}
    split = "heldout" if heldout(row["id"]) else "train"
    for start in range(len(shown) + 1):
        context = shown[start:]
        prefix, target = template.target([m for _, m in context], message)
        if len(prefix) + len(target) <= max_len:
            return Example(tuple(prefix + target), len(prefix), row["id"],
                           tuple(mid for mid, _ in context), kind, split)
    # Even alone the target is too long: keep its beginning, which still carries the user's words.
    prefix, target = template.target([], message)
    room = max_len - len(prefix)
    if room < 8:
        return None
    return Example(tuple(prefix + target[:room]), len(prefix), row["id"], (), kind, split)


def counts(examples: Iterable[Example]) -> dict[str, int]:
    """How many examples of each kind (user, approved, edited, preferred)."""
    return dict(collections.Counter(e.kind for e in examples))
