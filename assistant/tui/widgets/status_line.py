"""The status line: model, active adapter, speed of the last reply, and what Ember is doing."""
from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static


class StatusLine(Static):
    """One line at the bottom of the chat."""

    model: reactive[str] = reactive("")
    adapter: reactive[str | None] = reactive(None)
    speed: reactive[float | None] = reactive(None)
    state: reactive[str] = reactive("loading model…")
    route: reactive[str] = reactive("base")

    def render(self) -> Text:
        speed = f"{self.speed:.1f} tok/s" if self.speed else "– tok/s"
        # Text, not markup: a model file name may contain brackets.
        memory = "on" if self.route == "rag" else "off"
        return Text(f"model: {self.model} │ adapter: {self.adapter or 'none'} │ memory: {memory} │ "
                    f"{speed} │ {self.state}")
