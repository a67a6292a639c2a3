"""EmberApp: the Textual application. The model loads in a background thread; the UI never waits."""
from __future__ import annotations

import threading
import time
from typing import Iterable

from textual import work
from textual.app import App, SystemCommand
from textual.screen import Screen

from assistant.config import Settings
from assistant.embedder import Embedder
from assistant.engine import Engine
from assistant.errors import EmberError
from assistant.retrieval import retriever_for
from assistant.tui.screens.chat import ACTIONS, ChatScreen
from storage import conversations as convs
from storage.db import open_db


class EmberApp(App):
    """Chat with the local model. `engine` and `embedder` may be passed in (tests share them)."""

    CSS_PATH = "ember.tcss"
    TITLE = "Ember"

    def __init__(self, settings: Settings, *, conversation_id: int | None = None,
                 engine: Engine | None = None, embedder: Embedder | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.initial_conversation = conversation_id
        self.engine = engine
        self.engine_error: str | None = None
        self.engine_ready = threading.Event()
        self._loading = False
        self.painted_at: float | None = None   # perf_counter() at the first paint, for `ember bench`
        self.db = open_db(settings.home, busy_timeout_ms=settings.busy_timeout_ms)
        convs.recover_interrupted(self.db)
        if conversation_id is not None:
            convs.get_conversation(self.db, conversation_id)   # fail before the screen opens
        # Replies stream from a worker thread; it writes through its own connection.
        self.reply_db = open_db(settings.home, busy_timeout_ms=settings.busy_timeout_ms)
        # Memory search runs in the reply worker too; the embedding model loads on first use.
        self.retriever = retriever_for(settings, self.reply_db, embedder)

    def on_mount(self) -> None:
        self.push_screen(ChatScreen(self.initial_conversation))
        if self.engine is not None:
            self.engine_ready.set()

    def chat_painted(self) -> None:
        """The chat screen is on screen and ready to type in: now load the model.

        Loading waits for the first paint because importing llama.cpp holds the GIL and would delay it.
        """
        if self.painted_at is None:
            self.painted_at = time.perf_counter()
        if not self.engine_ready.is_set() and not self._loading:
            self._loading = True
            self.load_engine()

    @work(thread=True, group="model")
    def load_engine(self) -> None:
        """Load the model off the UI thread."""
        s = self.settings
        try:
            self.engine = Engine(s.model_path, n_ctx=s.n_ctx, n_threads=s.threads, seed=s.seed or 0)
        except EmberError as err:
            self.engine_error = str(err)
        finally:
            self.engine_ready.set()
        self.call_from_thread(self._engine_loaded)

    def _engine_loaded(self) -> None:
        if self.engine_error:
            # Without a model there is no chat: leave, and `ember chat` prints the reason on stderr.
            self.exit(return_code=1)
            return
        if isinstance(self.screen, ChatScreen):
            self.screen.model_ready()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        chat = next((s for s in self.screen_stack if isinstance(s, ChatScreen)), None)
        if chat is not None:
            for action, title, help_text in ACTIONS:
                yield SystemCommand(title, help_text, getattr(chat, f"action_{action}"))

    def on_unmount(self) -> None:
        # A reply still streaming is cancelled so its worker can mark it and finish.
        chat = next((s for s in self.screen_stack if isinstance(s, ChatScreen)), None)
        if chat is not None and chat.cancel is not None:
            chat.cancel.set()
