"""One exchange, shared by `ember ask` and the chat app: log the question, stream and log the reply."""
from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time
from pathlib import Path
from typing import Callable

import sqlite_utils

from adapters.errors import AdapterInvalid, AdapterMismatch
from assistant import router
from assistant.config import Settings
from assistant.engine import Engine, Message
from assistant.errors import InvalidInput, RouteUnavailable
from assistant.retrieval import Hit, Retriever, fit_memories, memory_message
from assistant.router import Decision
from storage import conversations as convs
from storage import memory, registry

ROUTES = ("auto", "base", "rag", "adapter", "both")
SAVE_EVERY_SECONDS = 0.5   # how much of a streaming reply a SIGKILL can lose, at most


def check_prompt(text: str) -> str:
    """The prompt as given, or `InvalidInput` when it is empty or not encodable text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidInput("the prompt is not valid UTF-8 text") from err
    if not text.strip():
        raise InvalidInput("the prompt is empty; type a question")
    return text


def resolve_route(route: str, engine: Engine) -> str:
    """The route this request takes, given what exists (a loaded adapter, the memory index).

    `auto` is left to the router (assistant/router.py), which weighs memory against the adapter per
    request; `rag` and `both` put retrieved memories in front of the model; `base` and `rag` leave the
    adapter out.
    """
    if route not in ROUTES:
        raise InvalidInput(f"unknown route {route!r}; choose one of {', '.join(ROUTES)}")
    if route in ("adapter", "both") and not engine.loaded_adapter:
        raise RouteUnavailable(f"route {route!r} needs an active adapter and none is in use; run "
                               "`ember adapt` to train one, or use --route base or rag")
    return route


def sync_adapter(db: sqlite_utils.Database, engine: Engine) -> str | None:
    """Load the registry's active adapter into the engine if it changed (hot-swap).

    Returns a one-line warning when the active adapter's file is refused (corrupt, another model):
    the engine then keeps the adapter it had, and the same file is not retried.
    """
    active = registry.active(db)
    wanted = active["id"] if active else None
    if wanted == engine.loaded_adapter or (wanted is not None and wanted == engine.refused_adapter):
        return None
    try:
        engine.load_adapter(Path(active["path"]) if active else None, wanted)
    except (AdapterInvalid, AdapterMismatch) as err:
        engine.refused_adapter = wanted
        kept = f"still using {engine.loaded_adapter}" if engine.loaded_adapter else "using the base model"
        return f"adapter {wanted} not used ({err}); {kept}"
    return None


def history(db: sqlite_utils.Database, conversation_id: int) -> list[Message]:
    """A conversation as chat messages for the model (empty and still-streaming replies left out)."""
    return [{"role": row["role"], "content": row["content"]}
            for row in convs.messages(db, conversation_id)
            if row["content"] and row["status"] != "generating"]


@dataclasses.dataclass
class Exchange:
    """What one question produced; `as_json` is the contract of `ember ask --json`."""

    conversation_id: int | None
    message_id: int | None
    user_message_id: int | None
    text: str
    route: str
    adapter: str | None
    tokens: int
    seconds: float
    status: str
    tokens_per_second: float | None
    dropped_messages: int
    memories: list[Hit] = dataclasses.field(default_factory=list)
    decision: Decision | None = None     # the router's, when the route was auto

    def as_json(self) -> dict:
        return {"conversation_id": self.conversation_id, "message_id": self.message_id,
                "text": self.text, "route": self.route, "adapter": self.adapter, "tokens": self.tokens,
                "seconds": round(self.seconds, 3), "status": self.status,
                "tokens_per_second": None if self.tokens_per_second is None
                else round(self.tokens_per_second, 1),
                "memories": [hit.as_json() for hit in self.memories],
                "router": self.decision.as_json() if self.decision else None}


def recall(retriever: Retriever | None, engine: Engine, settings: Settings, text: str,
           max_tokens: int, *, found: list[Hit] | None = None, now: dt.date | None = None) -> list[Hit]:
    """The best memories for `text` (or those already `found`) that fit in half of what the prompt may take."""
    if found is None:
        if retriever is None:
            raise RouteUnavailable("the rag route needs the memory index, which could not be opened")
        retriever.refresh()
        found = retriever.search(text, settings.memory_k, now=now)
    budget = (engine.n_ctx - max_tokens) // 2
    return fit_memories(found, engine.count_tokens, budget)


def respond(db: sqlite_utils.Database, engine: Engine, settings: Settings, text: str, *,
            log: bool = True, conversation_id: int | None = None, route: str = "auto",
            max_tokens: int | None = None, temperature: float | None = None, seed: int | None = None,
            cancel: threading.Event | None = None, retriever: Retriever | None = None,
            on_piece: Callable[[str], None] | None = None, now: dt.date | None = None) -> Exchange:
    """Answer `text` in a conversation (a new one if None); with `log=False` nothing is stored.

    The user's message is committed before generation starts; the reply is saved as it streams and
    finally marked complete, cancelled (via `cancel`) or interrupted (Ctrl-C, SIGTERM). `now` is the
    date questions like "last week" count from (today when None).
    """
    check_prompt(text)
    chosen = resolve_route(route, engine)
    decision = None
    if chosen == "auto":
        decision = router.decide(text, engine=engine, retriever=retriever, db=db,
                                 system=settings.system_prompt, k=settings.memory_k, now=now)
        chosen = decision.route
    engine.use_adapter(chosen in ("adapter", "both"))
    max_tokens = max_tokens or settings.max_tokens
    context: list[Message] = []
    memories = (recall(retriever, engine, settings, text, max_tokens, now=now,
                       found=decision.hits if decision else None)
                if chosen in ("rag", "both") else [])
    system = "\n\n".join(part for part in (
        settings.system_prompt, memory_message(memories)["content"] if memories else None) if part)
    if system:
        context.append({"role": "system", "content": system})
    if conversation_id is not None:
        convs.get_conversation(db, conversation_id)
        context += history(db, conversation_id)
    context.append({"role": "user", "content": text})
    gen = engine.generate(
        context, max_tokens=max_tokens,
        temperature=settings.temperature if temperature is None else temperature,
        top_p=settings.top_p, seed=settings.seed if seed is None else seed, cancel=cancel)

    user_id = reply_id = None
    if log:
        if conversation_id is None:
            conversation_id = convs.create_conversation(db)
        user_id = convs.add_message(db, conversation_id, "user", text, model=engine.name)
        reply_id = convs.start_reply(db, conversation_id, model=engine.name, route=chosen,
                                     adapter_id=engine.adapter)
        if memories:
            memory.record_reply_memories(db, reply_id, [(hit.id, hit.score) for hit in memories])
        if decision is not None:
            router.record(db, decision, reply_id)
    status = "interrupted"
    try:
        saved = time.monotonic()
        for piece in gen:
            if on_piece is not None:
                on_piece(piece)
            if reply_id is not None and time.monotonic() - saved >= SAVE_EVERY_SECONDS:
                convs.update_reply(db, reply_id, gen.text)
                saved = time.monotonic()
        status = "cancelled" if gen.finish_reason == "cancelled" else "complete"
    finally:
        if reply_id is not None:
            convs.finish_reply(db, reply_id, gen.text, status, tokens=gen.tokens,
                               seconds=round(gen.seconds, 3))
    if log:
        memory.sync_messages(db)   # the exchange becomes memory right away (BM25 now, vectors on use)
    return Exchange(conversation_id=conversation_id, message_id=reply_id, user_message_id=user_id,
                    text=gen.text, route=chosen, adapter=engine.adapter, tokens=gen.tokens,
                    seconds=gen.seconds, status=status, tokens_per_second=gen.tokens_per_second,
                    dropped_messages=gen.dropped_messages, memories=memories, decision=decision)
