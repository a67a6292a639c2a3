"""Switch the chat's model: the models Ember knows (`assistant.models.catalogue`), or any GGUF by path."""
from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList
from textual.widgets.option_list import Option

from assistant import models
from assistant.tui.errors import shows_errors

HELP = "Enter switches · type a .gguf path (or a registered name) below · Esc closes"
KINDS = {"bundled": "bundled default", "registered": "ember compress", "given": "--model", "recent": "recent"}


def shortened(path: Path) -> str:
    """A path as a person types it: `~` for the home directory."""
    try:
        return f"~/{path.relative_to(Path.home())}"
    except ValueError:
        return str(path)


class ModelScreen(ModalScreen[Path | None]):
    """The known models, the active one marked ●; dismisses with the chosen GGUF's path, or None (Esc).

    The bundled model and those `ember compress` registered are named (they live in the package and the
    data directory); the others show their path."""

    BINDINGS = [Binding("escape", "close", "Close")]

    def __init__(self, active: Path | None, given: Path | None) -> None:
        super().__init__()
        self.active = active
        self.given = given

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog search-dialog"):
            yield Label("Switch model", classes="dialog-title")
            yield OptionList(id="model-list")
            yield Input(placeholder="or a GGUF path: ~/models/other.gguf", id="model-path")
            yield Label(HELP, classes="dialog-help", id="model-help")

    @shows_errors
    def on_mount(self) -> None:
        options = self.query_one(OptionList)
        active = self.active.resolve() if self.active is not None and self.active.exists() else self.active
        known = models.catalogue(self.app.settings, self.app.db, given=self.given)
        for model in known:
            path = Path(model["path"])
            here = path.exists() and path.resolve() == active
            mark = "●" if here else " "
            what = KINDS[model["kind"]] + ("" if model["exists"] else ", file missing")
            where = "" if model["kind"] in ("bundled", "registered") else f"  {shortened(path)}"
            options.add_option(Option(Text(f"{mark} {model['name']}  ({what}){where}"),
                                      id=model["path"], disabled=not model["exists"]))
            if here:
                options.highlighted = options.option_count - 1
        options.focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(Path(event.option.id))

    @shows_errors
    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(models.resolve(self.app.settings, event.value))

    def action_close(self) -> None:
        self.dismiss(None)
