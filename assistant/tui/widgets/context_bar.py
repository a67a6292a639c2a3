"""Under a reply: what its context window held, as one stacked bar with a legend (Ctrl+O toggles it)."""
from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from assistant.context_view import ContextBudget

BAR = 60   # cells for the whole window
# (part, colour, bar character); the reply is drawn inside the room left for it.
PARTS = [("system", "magenta", "█"), ("memories", "green", "█"), ("history", "blue", "█"),
         ("question", "yellow", "█")]


def _cells(tokens: int, n_ctx: int) -> int:
    return 0 if tokens <= 0 else max(1, round(BAR * tokens / n_ctx))


def render_budget(b: ContextBudget) -> Text:
    """Legend line, bar, and the dropped history when there was some."""
    text = Text()
    text.append(f"context {b.prompt:,} of {b.n_ctx:,} tokens: ", style="bold")
    for i, (part, colour, _char) in enumerate(PARTS):
        tokens = getattr(b, part)
        label = f"{part} {tokens:,}"
        if part == "history":
            label += f" ({b.history_messages} message{'s' if b.history_messages != 1 else ''})"
        text.append(("" if i == 0 else " · ") + "■ ", style=colour)
        text.append(label)
    used = "" if b.reply is None else f"{b.reply:,} used of "
    text.append(" · ")
    text.append("■ ", style="cyan")
    text.append(f"reply: {used}{b.free:,} left")
    text.append("\n")
    drawn = 0
    for part, colour, char in PARTS:
        cells = _cells(getattr(b, part), b.n_ctx)
        text.append(char * cells, style=colour)
        drawn += cells
    room = max(0, BAR - drawn)
    reply = min(room, _cells(b.reply or 0, b.n_ctx))
    text.append("▓" * reply, style="cyan")
    text.append("░" * (room - reply), style="dim")
    if b.dropped_messages:
        n = b.dropped_messages
        text.append(f"\n⋯ {n} older message{'s' if n != 1 else ''} ({b.dropped_tokens:,} tokens) did not fit "
                    "and were left out; they are in memory", style="italic")
    return text


class ContextBar(Static):
    """One reply's context budget (see `assistant.context_view`)."""

    def __init__(self, budget: ContextBudget) -> None:
        super().__init__(render_budget(budget), classes="context-bar")
        self.budget = budget
