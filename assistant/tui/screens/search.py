"""Search across past conversations (full-text, as you type)."""
from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList
from textual.widgets.option_list import Option

from assistant.display import display_title, one_line
from assistant.tui.errors import shows_errors
from storage import conversations as convs


class SearchScreen(ModalScreen[int | None]):
    """Type to search every message; Enter on a hit opens its conversation."""

    BINDINGS = [Binding("escape", "close", "Close"), Binding("down", "focus_results", show=False)]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog search-dialog"):
            yield Label("Search conversations", classes="dialog-title")
            yield Input(placeholder="words to find…", id="search-input")
            yield OptionList(id="search-results")
            yield Label("Enter opens, Esc closes", classes="dialog-help", id="search-help")

    @shows_errors
    def on_input_changed(self, event: Input.Changed) -> None:
        hits = convs.search_messages(self.app.db, event.value, limit=50)
        results = self.query_one(OptionList)
        results.clear_options()
        results.add_options(
            Option(Text(f"{display_title(hit['title'])} — {hit['role']}: {one_line(hit['snippet'])}"),
                   id=f"{hit['conversation_id']}:{hit['message_id']}")
            for hit in hits)
        self.query_one("#search-help", Label).update(
            f"{len(hits)} found · Enter opens, Esc closes" if event.value.strip() else "Enter opens, Esc closes")

    def on_input_submitted(self, _event: Input.Submitted) -> None:
        results = self.query_one(OptionList)
        if results.option_count:
            results.highlighted = results.highlighted or 0
            self._open(results.get_option_at_index(results.highlighted).id)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self._open(event.option.id)

    def _open(self, option_id: str | None) -> None:
        if option_id:
            self.dismiss(int(option_id.split(":")[0]))

    def action_focus_results(self) -> None:
        self.query_one(OptionList).focus()

    def action_close(self) -> None:
        self.dismiss(None)
