"""The chat screen's sending and streaming: the user's words are stored first, then the reply streams.

The message is committed (`log_question`) the moment the user sends it, before the model has even
loaded; everything after (routing, memories, the chat template, generation) may fail without losing it.
The reply streams from a worker thread through the app's second connection, and shows how it ended:
its status mark, a note when old messages no longer fit, or the one-line error that stopped it.
An incognito conversation goes the same way with `log=False`: its messages are kept only on the screen.

While the user types, a worker reads the words typed so far into the model's KV cache
(`conversation.read_ahead`): the conversation, the draft, and on the rag and both routes the memories
recalled for it; on auto, the router decides the route for the draft, and the draft is read as that
route answers it. When the message is sent, the decision is reused unless something it depends on
changed, and only its last word, the memories that changed and the template's tail are left to read.
It runs only between replies, never waits for the engine, and stores nothing.
"""
from __future__ import annotations

import os
import threading
import time

from textual import on, work
from textual.containers import VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import TextArea

from assistant.conversation import Exchange, Question, check_prompt, log_question, read_ahead, respond
from assistant.errors import EmberError
from assistant.tui.errors import shows_errors
from assistant.tui.widgets.message import DroppedNote, MessageView
from assistant.tui.widgets.prompt import PromptInput
from assistant.tui.widgets.status_line import StatusLine
from storage import conversations as convs

PAINT_INTERVAL = 0.1   # seconds between repaints of a streaming reply
BUSY = "Ember is still replying; Esc cancels the reply."


class ReplyPiece(Message):
    """A piece of a streaming reply, posted from the generation thread."""

    def __init__(self, view: MessageView, piece: str) -> None:
        super().__init__()
        self.view = view
        self.piece = piece


class ReplyActions(Screen):
    """Sending and streaming, mixed into `ChatScreen` (which provides the log, title and sidebar)."""

    conversation_id: int | None
    cancel: threading.Event | None
    route: str
    incognito: bool
    private_history: list
    persona_asked: str | None
    _draft = ""             # the prompt's text as last typed
    _draft_read: str | None = ""   # the draft last read ahead (None: read it again, the conversation moved on)
    _reading_ahead = False  # a read-ahead worker is running
    _draft_lock = threading.Lock()

    @property
    def generating(self) -> bool:
        """A reply is being written (Esc cancels it)."""
        return self.cancel is not None

    @shows_errors
    def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        # Until the message is stored, every refusal leaves the text in the box.
        text = event.text
        try:
            check_prompt(text)
        except EmberError as err:
            self.notify(str(err), severity="warning")
            return
        if self.generating:
            self.notify(BUSY, severity="warning")
            return
        if self.app.engine_error:
            self.notify(self.app.engine_error, severity="error")
            return
        if self.incognito:   # stored nowhere: the model reads the history kept on this screen
            question = log_question(self.app.db, text, log=False, history=self.private_history,
                                    persona=self.persona_asked)
            self.private_history.append({"role": "user", "content": text})
        else:
            question = log_question(self.app.db, text, conversation_id=self.conversation_id,
                                    persona=self.persona_asked)
            self.conversation_id = question.conversation_id
        event.prompt.take(text)
        self.begin_reply(question, show_question=True)

    def begin_reply(self, question: Question, *, show_question: bool = False) -> None:
        """Show the reply to `question` (already committed) as it streams; `show_question` shows the
        question above it first."""
        log = self.query_one("#log", VerticalScroll)
        reply = MessageView("assistant", status="generating")
        shown = [MessageView("user", question.text, message_id=question.message_id)] if show_question else []
        log.mount_all([*shown, reply])
        log.anchor()
        self.cancel = threading.Event()
        self.refresh_bindings()
        self.query_one(StatusLine).state = "thinking…" if self.app.engine else "waiting for the model…"
        self.show_title()
        self.refresh_sidebar()
        self.stream_reply(question, reply, self.cancel, not self.incognito)

    @on(TextArea.Changed, "#prompt")
    def draft_changed(self, event: TextArea.Changed) -> None:
        with self._draft_lock:
            self._draft = event.text_area.text
        self.start_reading_ahead()

    def start_reading_ahead(self) -> None:
        """Read the draft ahead (`read_draft_ahead`) unless that is running already or cannot run now."""
        with self._draft_lock:
            if self._reading_ahead or self.generating or self.app.engine is None:
                return
            self._reading_ahead = True
        self.read_draft_ahead()

    @work(thread=True, group="read-ahead")
    def read_draft_ahead(self) -> None:
        """Read the draft ahead until it stops changing; give way at once to a reply or an adapter swap."""
        app = self.app
        while True:
            with self._draft_lock:
                draft = self._draft
                if draft == self._draft_read or self.generating or not app.engine_lock.acquire(blocking=False):
                    self._reading_ahead = False
                    return
            try:
                read_ahead(app.reply_db, app.engine, app.settings, draft, conversation_id=self.conversation_id,
                           route=self.route, persona=self.persona_asked, retriever=app.retriever,
                           history=list(self.private_history) if self.incognito else None,
                           stop=lambda: self.generating or self._draft != draft)
            except Exception:
                # Only a head start: the probe after sending reads the message itself, and reports.
                if os.environ.get("EMBER_DEBUG"):
                    raise
            finally:
                app.engine_lock.release()
            self._draft_read = draft

    @work(thread=True, group="reply")
    def stream_reply(self, question: Question, view: MessageView, cancel: threading.Event, log: bool) -> None:
        """Generate off the UI thread, with the app's second database connection (`log=False`: store nothing)."""
        app = self.app
        app.engine_ready.wait()
        pending: list[str] = []
        flushed = 0.0

        def flush() -> None:
            if pending:
                self.post_message(ReplyPiece(view, "".join(pending)))
                pending.clear()

        def on_piece(piece: str) -> None:
            # Paint at most ~16 times a second: per-token repaints take CPU from generation.
            nonlocal flushed
            pending.append(piece)
            if time.monotonic() - flushed >= PAINT_INTERVAL:
                flush()
                flushed = time.monotonic()

        try:
            if app.engine is None:
                raise EmberError(app.engine_error or "the model is not loaded")
            with app.engine_lock:   # no adapter swap while the model writes
                app.sync_adapter_locked(app.reply_db)   # a newly promoted adapter answers this one
                exchange = respond(app.reply_db, app.engine, app.settings, question, route=self.route,
                                   retriever=app.retriever, cancel=cancel, on_piece=on_piece, log=log)
        except EmberError as err:
            app.call_from_thread(self._reply_failed, view, str(err))
        except Exception as err:
            # A bug, not the user's doing: one line, as `ember` prints it. Textual's crash report would
            # print the worker's locals, the user's message among them. EMBER_DEBUG=1 shows it all.
            if os.environ.get("EMBER_DEBUG"):
                raise
            app.call_from_thread(self._reply_failed, view,
                                 f"internal error: {type(err).__name__}: {err} (EMBER_DEBUG=1 for details)")
        else:
            flush()
            app.call_from_thread(self._reply_done, view, exchange, question)

    async def on_reply_piece(self, message: ReplyPiece) -> None:
        if message.view.is_attached:
            self.query_one(StatusLine).state = "replying… (Esc cancels)"
            await message.view.append(message.piece)

    @shows_errors
    async def _reply_done(self, view: MessageView, exchange: Exchange, question: Question) -> None:
        self.cancel = None
        self.refresh_bindings()
        view.message_id, view.route, view.adapter = exchange.message_id, exchange.route, exchange.adapter
        view.asked = (question, exchange.memories, exchange.tokens)   # for its context view (Ctrl+O)
        if exchange.message_id is not None:   # a regenerated reply stands beside the ones before it
            ids = convs.alternatives(self.app.db, exchange.message_id)
            view.set_alternatives(ids.index(exchange.message_id) + 1, len(ids))
        if exchange.message_id is None and self.incognito and exchange.text:
            self.private_history.append({"role": "assistant", "content": exchange.text})
        if view.is_attached:
            await view.end_stream()
            view.set_status(exchange.status)
            await view.show_memories([dict(h.as_json(), id=h.id) for h in exchange.memories])
            await view.show_evidence([item.line() for item in exchange.evidence])
            if exchange.dropped_messages:
                await self.query_one("#log", VerticalScroll).mount(DroppedNote(exchange.dropped_messages),
                                                                  before=view)
        status = self.query_one(StatusLine)
        status.state = "ready" if exchange.status == "complete" else f"reply {exchange.status}"
        status.speed = exchange.tokens_per_second or status.speed
        status.notice = None   # a warning shown at start-up has been seen by now
        self.show_engine_state()
        if exchange.conversation_id == self.conversation_id:
            self.show_title()
        self.refresh_sidebar()
        # The engine is free again: read this reply's end and whatever is typed already ahead of the next.
        self._draft_read = None
        self.start_reading_ahead()

    def _reply_failed(self, view: MessageView, error: str) -> None:
        # The user's message is stored (it was committed before the request began): it stays on screen,
        # and the reply says in one line why there is none.
        self.cancel = None
        self.refresh_bindings()
        if view.is_attached:
            view.set_failed(error)
        self.query_one(StatusLine).state = "ready" if self.app.engine else "model not loaded"
        self.notify(error, severity="error", timeout=8)
        self.refresh_sidebar()

    def show_title(self) -> None:   # provided by ChatScreen
        raise NotImplementedError

    def refresh_sidebar(self) -> None:   # provided by ChatScreen
        raise NotImplementedError

    def show_engine_state(self) -> None:   # provided by ChatScreen
        raise NotImplementedError
