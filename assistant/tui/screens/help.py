"""Every key of the chat, in one table (F1). Read from the bindings themselves, so it cannot go stale."""
from __future__ import annotations

from typing import Iterable

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label

# Keys handled by hand rather than by a binding (the prompt's own, see widgets/prompt.py).
PROMPT_KEYS = [
    ("enter", "Send the message"),
    ("ctrl+j", "New line (Shift+Enter, Alt+Enter too, where the terminal has them)"),
    ("up", "In an empty prompt: go up to the messages"),
]


class HelpScreen(ModalScreen[None]):
    """The keys of the chat, of a focused message, of the prompt and of the app; Esc or F1 closes."""

    BINDINGS = [Binding("escape,f1,q", "close", "Close")]

    def __init__(self, sections: list[tuple[str, Iterable[tuple[str, str]]]]) -> None:
        super().__init__()
        self.sections = [(where, list(keys)) for where, keys in sections]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog help-dialog"):
            yield Label("Keys", classes="dialog-title")
            yield DataTable(id="help-keys", cursor_type="row", zebra_stripes=True)
            yield Label("Esc closes · every action is also in the command palette (Ctrl+P)", classes="dialog-help")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("key", "does", "where")
        for where, keys in self.sections:
            for key, does in keys:
                table.add_row(self.app.get_key_display(Binding(key, "")), does, where)
        table.focus()

    def action_close(self) -> None:
        self.dismiss(None)


def keys_of(bindings: Iterable[Binding | tuple]) -> list[tuple[str, str]]:
    """(key, what it does) for each key of each binding, its tooltip when it has one."""
    out = []
    for binding in Binding.make_bindings(bindings):
        for key in binding.key.split(","):
            out.append((key.strip(), binding.tooltip or binding.description or binding.action))
    return out
