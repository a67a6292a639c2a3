"""Where the user types."""
from __future__ import annotations

from textual.widgets import Input


class PromptInput(Input):
    """Single-line prompt; Enter sends."""

    def __init__(self) -> None:
        super().__init__(placeholder="Message Ember… (Enter to send, Ctrl+P for commands)",
                         id="prompt")
