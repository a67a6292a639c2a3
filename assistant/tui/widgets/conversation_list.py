"""The sidebar: conversations, most recent first."""
from __future__ import annotations

from typing import Any

from textual.widgets import Label, ListItem, ListView


class ConversationItem(ListItem):
    """One conversation in the sidebar."""

    def __init__(self, conversation: dict[str, Any]) -> None:
        super().__init__(Label(conversation["title"], markup=False))
        self.conversation_id: int = conversation["id"]
        self.title = conversation["title"]


class ConversationList(ListView):
    """Conversations to switch between; selecting one opens it."""

    def show(self, conversations: list[dict[str, Any]], current: int | None) -> None:
        """Replace the items, keeping the current conversation highlighted."""
        self.clear()
        self.extend(ConversationItem(c) for c in conversations)
        ids = [c["id"] for c in conversations]
        if current in ids:
            self.index = ids.index(current)
        else:
            self.index = None
