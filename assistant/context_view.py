"""What the model saw for one reply: its context window split into the system prompt, memories, the
history kept, the question and the room left for the reply, with the history that no longer fit.

Counted the way the request built its prompt (`conversation.prompt_messages`, then `Engine.fit`, which
drops the oldest whole exchanges), in the model's own chat template: each part is the difference in
prompt tokens it makes, so the template's own markers are counted with the part they frame (the
question's turn markers with the system prompt, which includes the template's default one). Nothing
here runs on the request path; the chat asks for it when the user opens a reply's context (Ctrl+O), and
`ember history --context REPLY_ID` prints it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import sqlite_utils

from assistant.config import Settings
from assistant.conversation import Question, _history_rows, prompt_messages, reply_budget, with_persona
from assistant.engine import Engine
from assistant.errors import InvalidInput
from assistant.retrieval import Hit
from storage import conversations as convs
from storage import memory, personas


@dataclasses.dataclass(frozen=True)
class ContextBudget:
    """Tokens of one reply's context window (`n_ctx`), by part; `dropped_messages` and
    `dropped_tokens` are the oldest history left out to make room."""

    n_ctx: int
    system: int
    memories: int
    history: int
    question: int
    reserved: int            # kept for the reply (its token limit)
    reply: int | None        # what the reply used of it, when known
    history_messages: int
    dropped_messages: int
    dropped_tokens: int

    @property
    def prompt(self) -> int:
        return self.system + self.memories + self.history + self.question

    @property
    def free(self) -> int:
        """Room the reply had: the window less the prompt."""
        return self.n_ctx - self.prompt

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"prompt": self.prompt, "free": self.free}


def budget(engine: Engine, settings: Settings, question: Question, memories: list[Hit], *,
           max_tokens: int | None = None, reply_tokens: int | None = None) -> ContextBudget:
    """Split the prompt of `question` (with these `memories`) into its parts, in tokens.

    Raises `PromptTooLong` when not even the question fits, as the request itself would have.
    """
    reserved = reply_budget(engine, settings, max_tokens)
    messages = prompt_messages(settings, question, memories)
    kept_tokens, _stop, dropped = engine.fit(messages, reserved)
    kept = question.history[dropped:]
    bare = Question(question.text, None, None, [])

    def size(q: Question, hits: list[Hit]) -> int:
        return len(engine.tokenize_chat(prompt_messages(settings, q, hits))[0])

    # The system prompt as the template writes it (with its default one, if it has one, when none is set),
    # with the frame of the question's turn; the question is then its own words.
    system_only = size(dataclasses.replace(bare, text=""), [])
    alone = size(bare, [])                                   # system prompt and question
    with_history = size(dataclasses.replace(bare, history=kept), [])
    full = size(question, memories)                          # nothing dropped
    prompt = len(kept_tokens)
    history = with_history - alone
    return ContextBudget(
        n_ctx=engine.n_ctx, system=system_only, memories=max(0, prompt - with_history),
        history=history, question=alone - system_only, reserved=reserved, reply=reply_tokens,
        history_messages=len(kept), dropped_messages=dropped, dropped_tokens=max(0, full - prompt))


def of_reply(db: sqlite_utils.Database, engine: Engine, settings: Settings, reply_id: int) -> ContextBudget:
    """The context of a stored reply, rebuilt from the log: the kept branch before its question, the
    memories it was given, its conversation's persona. `NotFound`, or `InvalidInput` for a message that
    is not a reply."""
    reply = convs.get_message(db, reply_id)
    if reply["role"] != "assistant" or reply["parent_id"] is None:
        raise InvalidInput(f"message {reply_id} is not a reply to a question of yours")
    path = _history_rows(db, reply["conversation_id"], through=reply_id)
    ids = [row["id"] for row in path]
    asked = convs.get_message(db, reply["parent_id"])
    before = path[:ids.index(asked["id"])] if asked["id"] in ids else []
    persona = personas.of_conversation(db, reply["conversation_id"])
    settings, _route = with_persona(settings, persona, None)
    hits = [Hit(id=m["id"], text=m["text"], score=m["score"] or 0.0, time=m["time"], speaker=m["speaker"],
                source=m["source"], source_id=m["source_id"], message_id=m["message_id"])
            for m in memory.reply_memories(db, reply_id)]
    question = Question(asked["content"], reply["conversation_id"], asked["id"],
                        [{"role": r["role"], "content": r["content"]} for r in before], [r["id"] for r in before])
    return budget(engine, settings, question, hits, reply_tokens=reply["tokens"])
