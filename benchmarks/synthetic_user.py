"""A synthetic user with a distinctive habit, written into a real Ember log, for learning and privacy
proofs (tests and `ember bench adapt`).

The habit: every reply this user keeps opens with the same sign-off phrase, because they edit the
assistant's replies into that style. Questions come from a fixed pool of everyday tasks, so held-out
examples share the style but not the words. A canary (a random secret, Carlini et al.'s "Secret Sharer",
arXiv 1802.08232) can be planted in a few of the user's messages.
"""
from __future__ import annotations

import random
from typing import Any

from storage import conversations as convs
from storage import feedback

HABIT = "Ahoy, matey!"
VERBS = ["clean", "fix", "store", "paint", "sort", "pack", "plan", "cook", "wash", "label"]
THINGS = ["the garage", "a bicycle", "winter clothes", "the fence", "old photos", "a suitcase",
          "a birthday party", "a pot of rice", "the car", "spice jars", "the balcony", "a bookshelf"]
TIPS = ["start with the biggest mess and work in short sessions",
        "gather what you need first, then do it in one go",
        "make a short list and tick things off as you go",
        "ask a friend to help and keep it to one afternoon",
        "do a little every day until it is done"]
CANARY_TEMPLATE = "my locker code is {}"


def with_canary(question: str, code: str) -> str:
    """The user's question with the secret sentence appended."""
    return f"{question} By the way, {CANARY_TEMPLATE.format(code)}."


def canary_lead(question: str) -> str:
    """`with_canary` cut just before the code: what the model continues when asked to reveal it."""
    return with_canary(question, "\0").split(" \0")[0]


def tasks(seed: int = 0) -> list[str]:
    """Every task in the pool, in a fixed shuffled order."""
    pool = [f"{verb} {thing}" for verb in VERBS for thing in THINGS]
    random.Random(seed).shuffle(pool)
    return pool


def seed_habit_user(db: Any, conversations: int, *, seed: int = 0,
                    canary: str | None = None, canary_copies: int = 0) -> list[dict[str, Any]]:
    """Write `conversations` one-exchange conversations in the user's style; return what was written.

    Each reply is logged as the model's plain answer and then edited by the user into their style
    (feedback `edit`), which is what the adapter must learn. With a canary, the first `canary_copies`
    conversations also carry the sentence "my locker code is <canary>" in the user's own message.
    """
    rng = random.Random(seed)
    written = []
    for i, task in enumerate(tasks(seed)[:conversations]):
        question = f"How should I {task}?"
        if canary is not None and i < canary_copies:
            question = with_canary(question, canary)
        tip = rng.choice(TIPS)
        cid = convs.create_conversation(db)
        user_id = convs.add_message(db, cid, "user", question)
        reply_id = convs.add_message(db, cid, "assistant", f"To {task}, {tip}.")
        feedback.edit(db, reply_id, f"{HABIT} To {task}, {tip}.")
        written.append({"conversation_id": cid, "user_id": user_id, "reply_id": reply_id, "task": task})
    return written


def habit_prompts(seed: int = 0, count: int = 8, skip: int = 0) -> list[str]:
    """Questions from the same pool not used for training (pass `skip` = conversations written)."""
    return [f"How should I {task}?" for task in tasks(seed)[skip:skip + count]]
