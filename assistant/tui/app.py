"""EmberApp: the Textual application. The model loads in a background thread; the UI never waits.

The app owns the engine, so it also watches the registry: a newly promoted adapter is hot-swapped into
the running chat (between replies, never during one), and an adaptation in progress is reported. It
also switches the model (palette: "Switch model") under the same lock, and remembers the theme.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from textual import events, work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from assistant.config import Settings
from assistant.conversation import sync_adapter
from assistant.embedder import Embedder
from assistant.engine import Engine
from assistant.errors import EmberError
from assistant.retrieval import retriever_for
from assistant.tui.driver import PrivateOutputDriver
from assistant.tui.screens.chat import ACTIONS, ChatScreen
from assistant.tui.widgets.status_line import progress
from storage import activity, preferences, registry, runs
from storage import conversations as convs
from storage.db import connections

if TYPE_CHECKING:
    import sqlite_utils

WATCH_SECONDS = 2.0   # how often the registry and the adaptation run are checked
PRESENCE_SECONDS = 20.0   # typing is recorded as presence at most this often


class EmberApp(App):
    """Chat with the local model. `engine` and `embedder` may be passed in (tests share them)."""

    CSS_PATH = "ember.tcss"
    TITLE = "Ember"
    # Quit in the footer (Textual hides it by default); the chat screen's keys come before it.
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", priority=True,
                        tooltip="Leave Ember (a reply being written is kept, marked cancelled)")]

    def __init__(self, settings: Settings, *, conversation_id: int | None = None, incognito: bool = False,
                 engine: Engine | None = None, embedder: Embedder | None = None) -> None:
        # On Linux and macOS the screen is written through a descriptor of its own (see tui/driver.py).
        super().__init__(driver_class=PrivateOutputDriver if os.name == "posix" else None)
        self.settings = settings
        self.initial_conversation = conversation_id
        self.incognito = incognito   # start with a conversation saved nowhere (`ember chat --incognito`)
        self.engine = engine
        self.engine_error: str | None = None
        self.engine_ready = threading.Event()
        # llama.cpp is not thread-safe: a reply and an adapter swap each hold this while they use the engine.
        self.engine_lock = threading.Lock()
        self._swapping = False
        self.switching_model = False   # a model chosen in the palette is loading
        # The model the run was started with by name (`--model`, EMBER_MODEL, config.toml): listed to switch back to.
        self.given_model: Path | None = settings.model_path if settings.model is not None else None
        self.warned: set[str] = set()   # the engine's warnings already shown (each is shown once)
        self._run_seen: str | None = None   # the adaptation run last shown as in progress
        self._loading = False
        self._present_at = time.monotonic()
        self.painted_at: float | None = None   # perf_counter() at the first paint, for `ember bench`
        # One owner for the process's connections: the UI thread's and the reply worker's.
        self.connections = connections(settings.home, busy_timeout_ms=settings.busy_timeout_ms)
        self.db = self.connections.get("ui")
        convs.recover_interrupted(self.db)
        activity.record(self.db, "chat_open")   # the idle-time daemon pauses when the user comes back
        if conversation_id is not None:
            convs.get_conversation(self.db, conversation_id)   # fail before the screen opens
        # Replies stream from a worker thread; it writes through its own connection.
        self.reply_db = self.connections.get("reply")
        # Memory search runs in the reply worker too; the embedding model loads on first use.
        self.retriever = retriever_for(settings, self.reply_db, embedder)

    async def on_event(self, event: events.Event) -> None:
        # Every key reaches the app here first, before the focused widget consumes it.
        if isinstance(event, events.Key):
            self.note_presence()
        await super().on_event(event)

    def note_presence(self) -> None:
        """Typing counts as presence: the idle-time daemon pauses for a user writing a long message."""
        if time.monotonic() - self._present_at >= PRESENCE_SECONDS:
            self._present_at = time.monotonic()
            try:
                activity.record(self.db, "typing")
            except EmberError as err:   # a locked database must never cost the user a keystroke
                self.log.warning(f"presence not recorded: {err}")

    def on_mount(self) -> None:
        self.restore_theme()
        self.push_screen(ChatScreen(self.initial_conversation, incognito=self.incognito))
        if self.engine is not None:
            self.engine_ready.set()
            self.start_swap(announce=False)
        self.set_interval(WATCH_SECONDS, self.poll_adaptation)

    @property
    def chat_screen(self) -> ChatScreen | None:
        """The chat screen, also while a modal screen is above it."""
        return next((s for s in self.screen_stack if isinstance(s, ChatScreen)), None)

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
            self.engine = Engine(s.model_path, n_ctx=s.n_ctx, n_threads=s.threads, seed=s.seed or 0,
                                 cache_dir=s.cache_dir)
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
        if self.chat_screen is not None:
            self.chat_screen.model_ready()
        self.start_swap(announce=False)   # the adapter in use comes with the model

    # ---- theme -------------------------------------------------------------------------------
    def restore_theme(self) -> None:
        """Start in the theme chosen last time (palette: "Theme"), then remember every change."""
        try:
            saved = preferences.get(self.db, preferences.THEME)
        except EmberError as err:
            self.log.warning(f"theme not restored: {err}")
            saved = None
        if isinstance(saved, str) and saved in self.available_themes:
            self.theme = saved
        self.theme_changed_signal.subscribe(self, self._remember_theme)

    def _remember_theme(self, theme: Any) -> None:
        try:
            if preferences.get(self.db, preferences.THEME) != theme.name:
                preferences.put(self.db, preferences.THEME, theme.name)
        except EmberError as err:   # a locked database must not cost the user the theme they see
            self.notify(f"Theme {theme.name} not remembered: {err}", severity="warning")

    # ---- switching the model ---------------------------------------------------------------
    def switch_model(self, path: Path) -> None:
        """Load the GGUF at `path` in place of the current model (in a worker; see `load_model`)."""
        self.switching_model = True
        self.load_model(path)

    @work(thread=True, group="model")
    def load_model(self, path: Path) -> None:
        """Load another model under the engine lock, so never while a reply is being written (a reply
        sent meanwhile waits for it). On failure the old model stays and one line says why; on success
        the registry's adapter is applied only if it was made for this model's file (else said so)."""
        s = self.settings
        old = self.engine
        before = old.path.name if old is not None else s.model_path.name
        try:
            with self.engine_lock:
                try:
                    new = Engine(path, n_ctx=s.n_ctx, n_threads=s.threads, seed=s.seed or 0, cache_dir=s.cache_dir)
                except EmberError as err:
                    self.call_from_thread(self._model_switched, f"Model not switched: {err}; still using {before}.",
                                          True)
                    return
                self.engine, self.settings = new, dataclasses.replace(s, model=new.path)
                self.engine_error = None
                self.engine_ready.set()
                if old is not None:
                    old.close()
                try:
                    warning = sync_adapter(self.reply_db, new)
                except EmberError as err:   # the registry could not be read: the new model runs without one
                    warning = f"adapter not applied: {err}"
        finally:
            self.switching_model = False
        text = f"Model: {new.path.name} (was {before})."
        if new.loaded_adapter:
            text += f" Adapter {new.loaded_adapter} applies to it and is in use."
        elif warning:
            text += f" {warning[0].upper()}{warning[1:]}."
        try:
            preferences.add_recent_model(self.reply_db, str(new.path))
        except EmberError as err:
            self.log.warning(f"recent model not recorded: {err}")
        self.call_from_thread(self._model_switched, text, False)

    def _model_switched(self, text: str, failed: bool) -> None:
        self.switching_model = False
        chat = self.chat_screen
        if chat is not None:
            chat.model_switched(text, failed=failed)
        if failed:
            self.notify(text, severity="error", timeout=10)

    # ---- adapters and adaptation ------------------------------------------------------------
    def sync_adapter_locked(self, db: sqlite_utils.Database, *, announce: bool = True) -> None:
        """Load the registry's active adapter if it changed; call from a worker holding `engine_lock`."""
        before = self.engine.loaded_adapter
        warning = sync_adapter(db, self.engine)
        if warning or self.engine.loaded_adapter != before:
            self.call_from_thread(self._adapter_changed, warning, announce)

    def start_swap(self, *, announce: bool = True) -> None:
        """Bring the engine in line with the registry, in a worker (one at a time)."""
        self._swapping = True
        self.swap_adapter(announce)

    @work(thread=True, group="adapter")
    def swap_adapter(self, announce: bool = True) -> None:
        """Hot-swap the adapter off the UI thread, between replies (the lock waits for one to end).

        Loading takes ~10 ms, but the first load hashes the model file to check the adapter's base.
        """
        try:
            with self.engine_lock:
                self.sync_adapter_locked(self.reply_db, announce=announce)
        except EmberError as err:
            self.call_from_thread(self.notify, str(err), severity="error", timeout=8)
        finally:
            self._swapping = False

    def _adapter_changed(self, warning: str | None, announce: bool) -> None:
        if warning:
            self.notify(warning, severity="warning", timeout=10)
        elif announce:
            loaded = self.engine.loaded_adapter
            self.notify(f"New adapter {loaded} in use." if loaded
                        else "No adapter is active now; replies come from the base model.")
        if self.chat_screen is not None:
            self.chat_screen.show_engine_state()

    def poll_adaptation(self) -> None:
        """Every few seconds: show an adaptation in progress, and swap in a newly promoted adapter."""
        try:
            run = runs.current(self.db)
            wanted = registry.active(self.db)
        except EmberError as err:
            # A database locked for a moment is checked again on the next tick, not reported every 2 s.
            self.log.warning(f"adapter watch skipped: {err}")
            return
        self._show_run(run, wanted)
        engine = self.engine
        if engine is None or self._swapping or self.engine_lock.locked():
            return   # no model yet, or a reply is using it: the reply syncs the adapter itself
        wanted_id = wanted["id"] if wanted else None
        refused = wanted_id is not None and wanted_id == engine.refused_adapter   # warned once already
        if wanted_id != engine.loaded_adapter and not refused:
            self.start_swap()

    def _show_run(self, run: dict[str, Any] | None, active: dict[str, Any] | None) -> None:
        chat = self.chat_screen
        if chat is not None:
            chat.show_adaptation(progress(run) if run else None)
        if run is not None:
            self._run_seen = run["id"]
            return
        if self._run_seen is None:
            return
        ended, self._run_seen = runs.get(self.db, self._run_seen), None
        if ended is None or (ended["status"] == "done" and active and active["id"] == ended["adapter_id"]):
            return   # promoted: the hot-swap says so
        detail = f": {ended['message']}" if ended["message"] else ""
        if ended["status"] == "done":
            self.notify(f"Adaptation finished{detail}")
        elif ended["status"] == "interrupted" and (ended["message"] or "").startswith("paused"):
            self.notify("Learning paused while you are here; it picks up where it stopped when you are away.")
        elif ended["status"] == "running":   # its process is gone without saying so
            self.notify("Adaptation stopped (its process ended); `ember adapt` resumes it.",
                        severity="warning", timeout=10)
        else:
            self.notify(f"Adaptation {ended['status']}{detail}",
                        severity="error" if ended["status"] == "failed" else "warning", timeout=10)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        chat = self.chat_screen
        if chat is not None:
            for action, title, help_text in ACTIONS:
                yield SystemCommand(title, help_text, getattr(chat, f"action_{action}"))
