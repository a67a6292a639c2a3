"""The sidebar: conversations, most recent first."""
from __future__ import annotations

from typing import Any, Collection

from textual.widgets import Label, ListItem, ListView

from assistant.display import display_title

EXCLUDED_MARK = "⊘"   # kept out of learning


class ConversationItem(ListItem):
    """One conversation in the sidebar; a mark shows it is kept out of learning."""

    def __init__(self, conversation: dict[str, Any], *, excluded: bool = False) -> None:
        # Shown sanitised: an empty title, or one with escapes or line breaks, would break the list.
        title = display_title(conversation["title"])
        super().__init__(Label(f"{EXCLUDED_MARK} {title}" if excluded else title, markup=False))
        self.conversation_id: int = conversation["id"]
        self.title = title
        self.excluded = excluded


class ConversationList(ListView):
    """Conversations to switch between; selecting one opens it."""

    def show(self, conversations: list[dict[str, Any]], current: int | None,
             excluded: Collection[int] = ()) -> None:
        """Replace the items, keeping the current conversation highlighted."""
        self.clear()
        self.extend(ConversationItem(c, excluded=c["id"] in excluded) for c in conversations)
        ids = [c["id"] for c in conversations]
        if current in ids:
            self.index = ids.index(current)
        else:
            self.index = None
