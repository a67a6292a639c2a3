"""The chat screen's model switch (palette: "Switch model"): pick a known model or any GGUF; the app
loads it under the engine lock, and one line in the chat says what happened."""
from __future__ import annotations

from pathlib import Path

from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Label

from assistant.tui.errors import shows_errors
from assistant.tui.screens.chat_reply import BUSY
from assistant.tui.screens.models import ModelScreen
from assistant.tui.widgets.status_line import StatusLine


class ModelNote(Label):
    """A line in the chat: the model switched (and what became of the adapter), or why it did not."""

    def __init__(self, text: str, *, failed: bool = False) -> None:
        super().__init__(text, classes="model-note failed" if failed else "model-note", markup=False)


class ModelActions(Screen):
    """Mixed into `ChatScreen`."""

    generating: bool

    @shows_errors
    def action_switch_model(self) -> None:
        """Choose another model from the ones Ember knows, or by path."""
        if self.generating:
            self.notify(BUSY, severity="warning")
            return
        if self.app.switching_model:
            self.notify("A model is loading; wait for it.", severity="warning")
            return
        engine = self.app.engine
        self.app.push_screen(ModelScreen(engine.path if engine is not None else self.app.settings.model_path,
                                         self.app.given_model), self._model_chosen)

    def _model_chosen(self, path: Path | None) -> None:
        if path is None:
            return
        if self.generating:   # a reply started while the list was open: the switch waits for none
            self.notify(BUSY, severity="warning")
            return
        engine = self.app.engine
        if engine is not None and path.exists() and path.resolve() == engine.path.resolve():
            self.notify(f"{path.name} is the model in use.")
            return
        self.query_one(StatusLine).state = f"loading {path.name}…"
        self.app.switch_model(path)

    def model_switched(self, text: str, *, failed: bool) -> None:
        """Called by the app when a switch ended: one line in the chat, the status line up to date."""
        log = self.query_one("#log", VerticalScroll)
        log.mount(ModelNote(text, failed=failed))
        log.scroll_end(animate=False)
        status = self.query_one(StatusLine)
        if self.app.engine is not None:
            status.model = self.app.engine.path.name
        if not self.generating:   # a reply sent while the model loaded is being written now
            status.state = "ready"
        self.show_engine_state()
        if not failed:
            self.show_engine_warnings()
            # The new engine's KV cache is empty: read what is typed already into it.
            self._draft_read = None
            self.start_reading_ahead()

    def show_engine_state(self) -> None:   # provided by ChatScreen
        raise NotImplementedError

    def start_reading_ahead(self) -> None:   # provided by ChatScreen (ReplyActions)
        raise NotImplementedError

    def show_engine_warnings(self) -> None:   # provided by ChatScreen
        raise NotImplementedError
