"""The status line: model, adapter in use, memory, route, speed of the last reply, what Ember is doing;
below it, while there is one, a warning about the model (once, at start) and an adaptation's progress."""
from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static


def short_id(adapter_id: str) -> str:
    """`lora-20261123-142501-9f3a` → `lora…9f3a`: the method and the random tail tell adapters apart."""
    head, _, tail = adapter_id.rpartition("-")
    if len(adapter_id) <= 16 or not head:
        return adapter_id
    return f"{head.split('-')[0]}…{tail}"


def duration(seconds: float) -> str:
    """A rough, readable time left: `40s`, `12m`, `1h 05m`."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{round(seconds / 60)}m"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def progress(run: dict[str, Any]) -> str:
    """An adaptation run's progress in one line, from its row in `adapt_runs`."""
    parts = [f"adapting ({run['method']}) {run['step']}/{run['steps']}"]
    if run.get("loss") is not None:
        parts.append(f"loss {run['loss']:.2f}")
    if run.get("epsilon_spent") is not None:
        parts.append(f"ε {run['epsilon_spent']:.1f}")
    if run.get("eta_seconds") is not None:
        parts.append(f"{duration(run['eta_seconds'])} left")
    return " · ".join(parts)


class StatusLine(Static):
    """The line at the bottom of the chat (one more line for a notice, one for an adaptation running)."""

    model: reactive[str] = reactive("")
    adapter: reactive[str | None] = reactive(None)
    speed: reactive[float | None] = reactive(None)
    state: reactive[str] = reactive("loading model…")
    memory: reactive[str] = reactive("auto")     # auto (the router decides) | on | off
    route: reactive[str] = reactive("auto")     # the route the next reply takes (auto: decided per reply)
    adapting: reactive[str | None] = reactive(None, layout=True)
    notice: reactive[str | None] = reactive(None, layout=True)   # e.g. the model has no chat template
    persona: reactive[str | None] = reactive(None)   # the open conversation's persona
    incognito: reactive[bool] = reactive(False)     # the open conversation is saved nowhere

    def render(self) -> Text:
        speed = f"{self.speed:.1f} tok/s" if self.speed else "– tok/s"
        adapter = short_id(self.adapter) if self.adapter else "none"
        # Text, not markup: a model file name may contain brackets.
        text = Text()
        if self.incognito:
            text.append("INCOGNITO", style="bold reverse")
            text.append(" │ ")
        if self.persona:
            text.append(f"persona: {self.persona} │ ")
        text.append(f"model: {self.model} │ adapter: {adapter} │ "
                    f"memory: {self.memory} │ route: {self.route} │ {speed} │ {self.state}")
        if self.notice:
            text.append(f"\n⚠ {self.notice}", style="bold")
        if self.adapting:
            text.append(f"\n{self.adapting}", style="italic")
        return text
