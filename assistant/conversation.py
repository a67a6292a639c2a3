"""One exchange, shared by `ember ask` and the chat app: log the question, stream and log the reply."""
from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

import sqlite_utils

from adapters.errors import AdapterInvalid, AdapterMismatch
from adapters.template import TemplateError
from assistant import evidence
from assistant.config import ROUTES, Settings
from assistant.engine import Engine, Message
from assistant.errors import EmberError, InvalidInput, RouteUnavailable
from assistant.retrieval import Hit, Retriever, fit_memories, memory_message
from storage import conversations as convs
from storage import memory, personas, registry

if TYPE_CHECKING:
    from assistant.router import Decision

T = TypeVar("T")

SAVE_EVERY_SECONDS = 0.5   # how much of a streaming reply a SIGKILL can lose, at most


# Characters that print nothing: a prompt made only of these (and whitespace) is empty.
_INVISIBLE = {"Cc", "Cf", "Co", "Cn", "Zs", "Zl", "Zp"}


def check_prompt(text: str) -> str:
    """The prompt as given, or `InvalidInput` when it is empty, invisible or not encodable text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidInput("the prompt is not valid UTF-8 text") from err
    if all(ch.isspace() or unicodedata.category(ch) in _INVISIBLE for ch in text):
        raise InvalidInput("the prompt is empty (nothing visible); type a question")
    return text


@dataclasses.dataclass
class Question:
    """A user's message, committed to the log before anything else is done with it."""

    text: str
    conversation_id: int | None
    message_id: int | None          # None when not logged (`log=False`)
    history: list[Message]          # the conversation before it, as the model sees it
    history_ids: list[int] = dataclasses.field(default_factory=list)   # their message ids
    origin: str | None = None       # None: Ember's own chat or CLI; "api": a client of `ember serve`
    client: str | None = None       # which client (its User-Agent); the reply records both too
    persona: dict | None = None     # the persona it is asked of (storage.personas), None: none


def choose_persona(db: sqlite_utils.Database, persona: str | None, conversation_id: int | None,
                   origin: str | None = None) -> dict | None:
    """The persona a question is asked of: the one named (`personas.NONE`: none), else the
    conversation's own, else for a new conversation of Ember's own the default. An unknown name is
    `PersonaNotFound`. A client of `ember serve` sends its own system prompt: no default for it."""
    if persona is not None:
        return None if persona.strip().lower() == personas.NONE else personas.get_persona(db, persona)
    if conversation_id is not None:
        return personas.of_conversation(db, conversation_id)
    return personas.default_persona(db) if origin is None else None


def log_question(db: sqlite_utils.Database, text: str, *, conversation_id: int | None = None,
                 log: bool = True, history: list[Message] | None = None, origin: str | None = None,
                 client: str | None = None, persona: str | None = None, instead_of: int | None = None) -> Question:
    """Check `text` and commit it as the user's message (a new conversation when None).

    The first act of every request (CLI, chat, server, importer): routing, retrieval, probes, loading
    the model and generation all come later and may fail, or be killed, without losing it.
    `history` is the conversation before it as a stateless client sent it (an OpenAI-style request
    carries every turn); when given it is what the model reads, and only the new message is stored.
    `origin` and `client` say where the message came from (see `storage.conversations.add_message`).
    `persona` names the persona to ask (see `choose_persona`); the conversation then remembers it.
    `instead_of` is an earlier user message this one edits: the new message starts a branch beside it
    (the old branch stays stored), and the model reads the history before it.
    """
    check_prompt(text)
    rows: list[dict] = []
    parent: int | None | str = "kept"
    if instead_of is not None:
        edited = _user_message(db, instead_of)
        conversation_id, parent = edited["conversation_id"], edited["parent_id"]
        path = _history_rows(db, conversation_id, through=instead_of)
        rows = path[:[row["id"] for row in path].index(instead_of)]
    elif conversation_id is not None:
        convs.get_conversation(db, conversation_id)
        rows = _history_rows(db, conversation_id)
    chosen = choose_persona(db, persona, conversation_id, origin)   # an unknown name stores nothing
    message_id = None
    if log:
        new = conversation_id is None
        if new:
            conversation_id = convs.create_conversation(db)
        message_id = convs.add_message(db, conversation_id, "user", text, origin=origin, client=client,
                                       parent_id=parent)
        if (new and chosen is not None) or persona is not None:   # the conversation remembers it
            personas.set_for_conversation(db, conversation_id, chosen["name"] if chosen else None)
    if history is not None:
        return Question(text, conversation_id, message_id, list(history), [], origin, client, chosen)
    return Question(text, conversation_id, message_id,
                    [{"role": row["role"], "content": row["content"]} for row in rows],
                    [row["id"] for row in rows], origin, client, chosen)


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


def _history_rows(db: sqlite_utils.Database, conversation_id: int, through: int | None = None) -> list[dict]:
    return [row for row in convs.branch(db, conversation_id, through=through)
            if row["content"] and row["status"] != "generating"]


def history(db: sqlite_utils.Database, conversation_id: int) -> list[Message]:
    """The kept branch of a conversation as chat messages for the model (empty and still-streaming
    replies left out)."""
    return [{"role": row["role"], "content": row["content"]} for row in _history_rows(db, conversation_id)]


def _user_message(db: sqlite_utils.Database, message_id: int) -> dict:
    row = convs.get_message(db, message_id)
    if row["role"] != "user":
        raise InvalidInput(f"message {message_id} is a reply; give the id of one of your own messages")
    return row


def ask_question(db: sqlite_utils.Database, prompt: str | None, *, conversation_id: int | None = None,
                 log: bool = True, persona: str | None = None, regenerate: int | None = None,
                 instead_of: int | None = None) -> Question:
    """The question of an `ember ask` request, committed first: a new message (`log_question`), an
    edit of an earlier one that branches (`instead_of`), or the question of a reply to answer again
    (`regenerate`, which commits nothing new)."""
    if regenerate is not None:
        if instead_of is not None or conversation_id is not None or not log:
            raise InvalidInput("--regenerate takes a reply's id alone (no --edit, --conversation or --no-log)")
        return regenerate_question(db, regenerate)
    if instead_of is not None and (conversation_id is not None or not log):
        raise InvalidInput("--edit takes the id of your message alone (no --conversation or --no-log)")
    return log_question(db, prompt or "", conversation_id=conversation_id, log=log, persona=persona,
                        instead_of=instead_of)


def regenerate_question(db: sqlite_utils.Database, reply_id: int) -> Question:
    """The question a reply answered, ready for `respond` to answer again: the new reply becomes an
    alternative beside `reply_id` (which stays stored) and the end of the kept branch.

    Nothing new is said by the user, so there is nothing to commit first; the question was committed
    when it was asked. `InvalidInput` when `reply_id` is not a reply, or answers no stored question.
    """
    reply = convs.get_message(db, reply_id)
    if reply["role"] != "assistant":
        raise InvalidInput(f"message {reply_id} is your own; regenerate takes the id of a reply")
    if reply["status"] == "generating":
        raise InvalidInput(f"reply {reply_id} is still being written; wait for it, or cancel it")
    if reply["parent_id"] is None:
        raise InvalidInput(f"reply {reply_id} answers no question of yours; there is nothing to ask again")
    asked = _user_message(db, reply["parent_id"])
    path = _history_rows(db, reply["conversation_id"], through=reply["parent_id"])
    before = path[:next(i for i, row in enumerate(path) if row["id"] == asked["id"])]
    return Question(asked["content"], reply["conversation_id"], asked["id"],
                    [{"role": row["role"], "content": row["content"]} for row in before],
                    [row["id"] for row in before], persona=personas.of_conversation(db, reply["conversation_id"]))


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
    status: str                     # complete | length | empty | cancelled | interrupted
    tokens_per_second: float | None
    dropped_messages: int           # the oldest messages of the conversation left out to fit the context
    memories: list[Hit] = dataclasses.field(default_factory=list)
    decision: Decision | None = None     # the router's, when the route was auto
    prompt_tokens: int = 0
    # From the committed question reaching `respond` to the reply's first token: routing, memories and
    # the prompt's evaluation included, what the user waits for. None when no token came.
    first_token_seconds: float | None = None
    finish_reason: str | None = None     # stop | length | cancelled (llama.cpp's words)
    warnings: list[str] = dataclasses.field(default_factory=list)
    evidence: list[evidence.Evidence] = dataclasses.field(default_factory=list)   # what the answer rests on
    persona: str | None = None           # the persona's name, None: none

    def as_json(self) -> dict:
        return {"conversation_id": self.conversation_id, "message_id": self.message_id,
                "text": self.text, "route": self.route, "adapter": self.adapter, "tokens": self.tokens,
                "seconds": round(self.seconds, 3), "status": self.status,
                "finish_reason": self.finish_reason,
                "tokens_per_second": None if self.tokens_per_second is None
                else round(self.tokens_per_second, 1),
                "prompt_tokens": self.prompt_tokens,
                "first_token_seconds": None if self.first_token_seconds is None
                else round(self.first_token_seconds, 3),
                "dropped_messages": self.dropped_messages,
                "memories": [hit.as_json() for hit in self.memories],
                "evidence": [item.as_json() for item in self.evidence],
                "router": self.decision.as_json() if self.decision else None,
                "persona": self.persona, "warnings": self.warnings}

    @property
    def notices(self) -> list[str]:
        """What the user should be told about this reply besides its text (one line each)."""
        out = list(self.warnings)
        if self.dropped_messages:
            n = self.dropped_messages
            out.append(f"{n} earlier message{'s' if n != 1 else ''} no longer fit the model's context and "
                       "were left out; they are in memory")
        if self.status == "length":
            out.append(f"the reply stopped at the token limit ({self.tokens} tokens); raise --max-tokens "
                       "for a longer one")
        elif self.status == "empty":
            out.append("the model ended its turn without a word")
        return out

    def report(self) -> dict:
        """Everything `ember ask` prints about this reply besides its text: the --json document, the
        notices, the evidence lines and the --why line. The resident engine sends exactly this."""
        return {"json": self.as_json(), "notices": self.notices,
                "evidence": [item.line() for item in self.evidence],
                "why": f"route {self.route}: " + (self.decision.reason if self.decision else "chosen with --route")}


def reply_budget(engine: Engine, settings: Settings, max_tokens: int | None) -> int:
    """Tokens kept for the reply: `max_tokens` as asked (checked against the context), or the
    configured default capped at half the context, so that a small context still answers."""
    if max_tokens is not None:
        if max_tokens < 1 or max_tokens >= engine.n_ctx:
            raise InvalidInput(f"--max-tokens must be between 1 and {engine.n_ctx - 1} "
                               f"(the context holds {engine.n_ctx} tokens), not {max_tokens}")
        return max_tokens
    return max(1, min(settings.max_tokens, engine.n_ctx // 2))


def recall(retriever: Retriever | None, engine: Engine, settings: Settings, text: str,
           budget: int, *, found: list[Hit] | None = None, now: dt.date | None = None,
           exclude: set[int] | None = None) -> list[Hit]:
    """The best memories for `text` (or those already `found`) that fit in `budget` tokens.

    Memories that are messages already in the prompt (`exclude`, message ids) are left out: the
    model would read them twice.
    """
    if found is None:
        if retriever is None:
            raise RouteUnavailable("the rag route needs the memory index, which could not be opened")
        retriever.refresh(skip_messages=exclude or ())
        found = retriever.search(text, settings.memory_k, now=now, exclude_message_ids=exclude or ())
    if exclude:
        found = [hit for hit in found if hit.message_id is None or hit.message_id not in exclude]
    return fit_memories(found, engine.count_tokens, budget) if budget > 0 else []


def _memory_budget(engine: Engine, settings: Settings, question: str, max_tokens: int) -> int:
    """Tokens the memories may take: half of what the reply leaves, and never so much that the
    question itself (with the system prompt) would no longer fit: memories are trimmed, never refused."""
    asked = [{"role": "user", "content": question}]
    if settings.system_prompt:
        asked.insert(0, {"role": "system", "content": settings.system_prompt})
    free = engine.n_ctx - max_tokens - len(engine.tokenize_chat(asked)[0])
    # The memory block's own framing (the join with the system prompt, turn markers) takes a few more.
    return min((engine.n_ctx - max_tokens) // 2, free - 32)


def _in_prompt(engine: Engine, settings: Settings, question: Question, reserved: int) -> set[int]:
    """Ids of the messages the prompt will hold: the question and the history that still fits beside
    `reserved` tokens (the reply and the memories). Memories are not to repeat them; the older
    messages that no longer fit are exactly what memory may bring back."""
    ids = {question.message_id} if question.message_id is not None else set()
    if not question.history:
        return ids
    asked = ([{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []) + [
        *question.history, {"role": "user", "content": question.text}]
    try:
        dropped = engine.fit(asked, min(reserved, engine.n_ctx - 1))[2]
    except EmberError:   # not even the question fits beside the memories: none of the history does
        dropped = len(question.history)
    return ids | set(question.history_ids[dropped:])


def respond(db: sqlite_utils.Database, engine: Engine, settings: Settings, text: str | Question, *,
            log: bool = True, conversation_id: int | None = None, route: str | None = None,
            max_tokens: int | None = None, temperature: float | None = None, seed: int | None = None,
            top_p: float | None = None, cancel: threading.Event | None = None, retriever: Retriever | None = None,
            on_piece: Callable[[str], None] | None = None, now: dt.date | None = None,
            cancelled_as: str = "cancelled", persona: str | None = None) -> Exchange:
    """Answer `text` in a conversation (a new one if None); with `log=False` nothing is stored.

    The one request path of every front-end. Its first act is committing the user's message
    (`log_question`; a front-end with slow work to do first, like loading the model, calls it itself
    and passes the `Question`); routing, retrieval, probes and generation follow and may fail without
    losing it. The reply is saved as it streams and finally marked complete, length (the token
    limit), empty, cancelled (via `cancel`) or interrupted (Ctrl-C, SIGTERM). `now` is the date
    questions like "last week" count from (today when None). `cancelled_as` is how a reply stopped
    through `cancel` is stored: `interrupted` for `ember ask` through a resident engine whose process
    was interrupted, as it would be stored in-process.

    `temperature`, `top_p` and `seed` override the settings' for this request (None: the settings').
    The question's persona supplies the system prompt (which context trimming never drops), and the
    route and temperature when these are None.
    """
    question = text if isinstance(text, Question) else log_question(
        db, text, conversation_id=conversation_id, log=log, persona=persona)
    asked = time.perf_counter()
    text, conversation_id = question.text, question.conversation_id
    settings, route = with_persona(settings, question.persona, route)
    chosen = resolve_route(route, engine)
    max_tokens = reply_budget(engine, settings, max_tokens)
    budget, in_prompt = 0, set()
    if chosen in ("auto", "rag", "both"):   # only these may use memory: base and adapter never tokenize twice
        budget = _memory_budget(engine, settings, text, max_tokens)
        in_prompt = _in_prompt(engine, settings, question, max_tokens + max(budget, 0))
    decision = None
    if chosen == "auto":
        from assistant import router   # the auto route's alone: --route base never imports it

        decision = router.decide(text, engine=engine, retriever=retriever, db=db,
                                 system=settings.system_prompt, k=settings.memory_k, now=now,
                                 exclude_message_ids=in_prompt, asked_id=question.message_id)
        chosen = decision.route
    engine.use_adapter(chosen in ("adapter", "both"))
    memories: list[Hit] = []
    if chosen in ("rag", "both"):
        memories = recall(retriever, engine, settings, text, budget, now=now,
                          found=decision.hits if decision else None, exclude=in_prompt)
    sampling = dict(max_tokens=max_tokens, temperature=settings.temperature if temperature is None else temperature,
                    top_p=settings.top_p if top_p is None else top_p,
                    seed=settings.seed if seed is None else seed, cancel=cancel)
    gen = with_prompt(lambda messages: engine.generate(messages, **sampling), settings, question, memories)

    # Memory-block markup never reaches the screen or the log; a direct recall question gets its
    # evidence first when the answer does not carry it (assistant/evidence.py).
    cited = evidence.evidence_for(memories, text, "")
    shown = evidence.Shown(text, cited[0] if cited else None, markup=bool(memories))
    reply_id = None
    if log:
        reply_id = convs.start_reply(db, conversation_id, model=engine.name, route=chosen,
                                     adapter_id=engine.adapter, origin=question.origin, client=question.client,
                                     parent_id=question.message_id)
        if memories:
            memory.record_reply_memories(db, reply_id, [(hit.id, hit.score) for hit in memories])
        if decision is not None:
            from assistant import router

            router.record(db, decision, reply_id)
    status = "interrupted"
    first_token = None
    try:
        saved = time.monotonic()
        for piece in gen:
            if first_token is None:
                first_token = time.perf_counter() - asked
            piece = shown.feed(piece)
            if on_piece is not None and piece:
                on_piece(piece)
            if reply_id is not None and time.monotonic() - saved >= SAVE_EVERY_SECONDS:
                convs.update_reply(db, reply_id, shown.text)
                saved = time.monotonic()
        rest = shown.flush()
        if on_piece is not None and rest:
            on_piece(rest)
        status = final_status(gen.finish_reason, shown.text)
        if status == "cancelled":
            status = cancelled_as
    finally:
        if reply_id is not None:
            shown.flush()   # what was held back when the reply was interrupted is kept
            convs.finish_reply(db, reply_id, shown.text, status, tokens=gen.tokens,
                               seconds=round(gen.seconds, 3))
    if log:
        memory.sync_messages(db)   # the exchange becomes memory right away (BM25 now, vectors on use)
    return Exchange(conversation_id=conversation_id, message_id=reply_id,
                    user_message_id=question.message_id, text=shown.text, route=chosen, adapter=engine.adapter,
                    tokens=gen.tokens, seconds=gen.seconds, status=status,
                    tokens_per_second=gen.tokens_per_second, dropped_messages=gen.dropped_messages,
                    memories=memories, decision=decision, prompt_tokens=gen.prompt_tokens,
                    first_token_seconds=first_token if gen.tokens else None, finish_reason=gen.finish_reason,
                    warnings=list(engine.warnings),
                    evidence=evidence.evidence_for(memories, text, shown.text),
                    persona=question.persona["name"] if question.persona else None)


def read_ahead(db: sqlite_utils.Database, engine: Engine, settings: Settings, draft: str, *,
               conversation_id: int | None = None, route: str | None = None, persona: str | None = None,
               history: list[Message] | None = None, retriever: Retriever | None = None,
               stop: Callable[[], bool] | None = None) -> int:
    """Read a message the user is still typing, as `respond` will answer it once sent, so that sending
    it costs only its last word and the chat template's tail:
    - the engine reads the conversation so far and the draft into its KV cache (`Engine.read_ahead`),
      on every route;
    - on the rag and both routes, given the `retriever`, with the memories recalled for the draft in
      front of it, as `respond` places them: once sent, the message's memories are recalled again and
      only what differs from the draft's (from the first memory that changed on) is evaluated. Without
      a retriever, the history alone is read ahead on these routes;
    - on the auto route, the router decides for the draft (`router.decide(ahead=True)`: its search and,
      with an adapter loaded, its probe), and the draft is read as that route will answer it, memories
      included. Once sent, the decision is reused unless something it depends on changed.

    The same persona (its system prompt), route, history and reply budget as `respond`; the draft is cut
    after its last complete word (the word being typed would change its tokens). `history` is an
    incognito conversation's, held by the front-end. `stop` ends the engine's reading early
    (`Engine.read_ahead`). Nothing is stored, and a draft that cannot be
    answered as it stands (an unknown persona or route, a missing conversation, a prompt too long) reads
    no further. Returns the tokens the engine read.
    """
    cut = len(draft.rstrip()) - len(draft.rstrip().split()[-1]) if draft.strip() else 0
    words = draft[:cut].rstrip()
    read = 0
    try:
        chosen = choose_persona(db, persona, conversation_id)
        settings, route = with_persona(settings, chosen, route)
        route = resolve_route(route, engine)
        ids: list[int] = []
        if history is None:
            rows = _history_rows(db, conversation_id) if conversation_id is not None else []
            history = [{"role": row["role"], "content": row["content"]} for row in rows]
            ids = [row["id"] for row in rows]
        asked = Question(words, conversation_id, None, list(history), ids, persona=chosen)
        max_tokens = reply_budget(engine, settings, None)
        memories: list[Hit] = []
        if route in ("auto", "rag", "both") and retriever is not None:
            retriever.refresh()   # the last exchange's notes get their vectors now, not once it is sent
        if route in ("auto", "rag", "both") and draft.strip():
            # Decided and recalled for the whole draft, the word being typed too: memories come before
            # the message, so its tokens do not matter, and the draft as sent is decided the same way.
            whole = dataclasses.replace(asked, text=draft.strip())
            budget = _memory_budget(engine, settings, whole.text, max_tokens)
            exclude = _in_prompt(engine, settings, whole, max_tokens + max(budget, 0))
            decision = None
            if route == "auto":
                from assistant import router

                decision = router.decide(whole.text, engine=engine, retriever=retriever, db=db,
                                         system=settings.system_prompt, k=settings.memory_k,
                                         exclude_message_ids=exclude, ahead=True)
                route = decision.route
            if route in ("rag", "both") and retriever is not None:
                memories = recall(retriever, engine, settings, whole.text, budget, exclude=exclude,
                                  found=decision.hits if decision else None)
        if route != "auto":
            engine.use_adapter(route in ("adapter", "both"))   # as `respond` will, before it generates
        read = with_prompt(lambda messages: engine.read_ahead(messages, max_tokens, stop=stop), settings, asked,
                           memories)
    except EmberError:
        return read
    return read


def with_persona(settings: Settings, persona: dict | None, route: str | None) -> tuple[Settings, str]:
    """The settings and route of a request asked of `persona`: its system prompt replaces the configured
    one, its temperature and route apply unless the request names its own."""
    if persona is None:
        return settings, route or "auto"
    changes: dict = {"system_prompt": persona["system_prompt"]}
    if persona["temperature"] is not None:
        changes["temperature"] = persona["temperature"]
    return dataclasses.replace(settings, **changes), route or persona["route"] or "auto"


def with_prompt(use: Callable[[list[Message]], T], settings: Settings, question: Question,
                memories: list[Hit]) -> T:
    """`use(messages)` on the prompt `prompt_messages` makes; for a template that allows a system
    message only first (roles must alternate, it raises `TemplateError`), on the prompt with the notes
    in the question's own turn instead."""
    try:
        return use(prompt_messages(settings, question, memories))
    except TemplateError:
        if not (memories and question.history):
            raise
        return use(prompt_messages(settings, question, memories, inline=True))


def prompt_messages(settings: Settings, question: Question, memories: list[Hit], *,
                    inline: bool = False) -> list[Message]:
    """The messages the model reads: the system prompt, the conversation so far, then the memories just
    before the question.

    Memories sit after the history, not in the leading system message: the prompt's prefix (system
    prompt and history) is then the same turn after turn, and llama.cpp reuses its KV cache instead of
    evaluating the whole conversation again. A first question has no history, so its notes lead. With
    `inline`, the notes open the question's own turn (for templates that refuse a system message
    after the first).
    """
    head = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []
    notes = memory_message(memories)["content"] if memories else None
    if notes and not question.history and not inline:
        head = [{"role": "system", "content": "\n\n".join(p for p in (settings.system_prompt, notes) if p)}]
        notes = None
    out: list[Message] = [*head, *question.history]
    if notes and inline:
        return out + [{"role": "user", "content": f"{notes}\n\n{question.text}"}]
    if notes:
        out.append({"role": "system", "content": notes})
    return out + [{"role": "user", "content": question.text}]


def final_status(finish_reason: str | None, text: str) -> str:
    """How a reply that ran to its end is stored: cancelled, length (the token limit), empty or complete."""
    if finish_reason == "cancelled":
        return "cancelled"
    if finish_reason == "length":
        return "length"
    return "complete" if text.strip() else "empty"
