"""Choose the open conversation's persona (the same store as `ember persona`), or make one the default."""
from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

from assistant.display import one_line
from assistant.tui.errors import shows_errors
from storage import personas

HELP = "Enter chooses for this conversation · d makes it the default for new ones · Esc closes"


class PersonaScreen(ModalScreen[str | None]):
    """The personas, the current one highlighted; dismisses with a name, `personas.NONE`, or None (Esc)."""

    BINDINGS = [Binding("escape", "close", "Close"), Binding("d", "make_default", "Make default")]

    def __init__(self, current: str | None) -> None:
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog search-dialog"):
            yield Label("Persona of this conversation", classes="dialog-title")
            yield OptionList(id="persona-list")
            yield Label(HELP, classes="dialog-help", id="persona-help")

    def on_mount(self) -> None:
        self.refresh_list()
        self.query_one(OptionList).focus()

    @shows_errors
    def refresh_list(self) -> None:
        """List the personas (and "no persona"), the default marked with *."""
        options = self.query_one(OptionList)
        options.clear_options()
        options.add_option(Option(Text("(no persona: the model's own system prompt)"), id=personas.NONE))
        for p in personas.list_personas(self.app.db):
            extras = ", ".join(x for x in (p["route"] and f"route {p['route']}",
                                           p["temperature"] is not None and f"temperature {p['temperature']:g}") if x)
            options.add_option(Option(Text(f"{'*' if p['default'] else ' '} {p['name']}"
                                           f"{f' ({extras})' if extras else ''} — {one_line(p['system_prompt'])[:60]}"),
                                      id=p["name"]))
        ids = [options.get_option_at_index(i).id for i in range(options.option_count)]
        wanted = (self.current or personas.NONE).lower()
        options.highlighted = next((i for i, x in enumerate(ids) if x.lower() == wanted), 0)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    @shows_errors
    def action_make_default(self) -> None:
        options = self.query_one(OptionList)
        if options.highlighted is None:
            return
        name = options.get_option_at_index(options.highlighted).id
        chosen = personas.set_default(self.app.db, name)
        self.notify(f"New conversations now start with {chosen['name']}." if chosen
                    else "New conversations now start without a persona.")
        self.current = name
        self.refresh_list()

    def action_close(self) -> None:
        self.dismiss(None)
