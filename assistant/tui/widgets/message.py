"""One message in the chat log: a header line (who, how it ended) and a Markdown body."""
from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, Collapsible, Label, Markdown
from textual.widgets.markdown import MarkdownStream

MARKS = {"cancelled": "⏹ cancelled", "interrupted": "⚠ interrupted", "generating": "…"}


class ForgetMemory(Message):
    """The user asked to forget a memory shown under a reply."""

    def __init__(self, chunk_id: int) -> None:
        super().__init__()
        self.chunk_id = chunk_id


class MemoryItem(Horizontal):
    """One memory a reply was given: when, what, and a button to forget it."""

    def __init__(self, index: int, memory: dict[str, Any]) -> None:
        super().__init__(classes="memory-item")
        self.index = index
        self.memory = memory

    def compose(self) -> ComposeResult:
        when = (self.memory.get("time") or "")[:10] or "undated"
        text = " ".join(self.memory["text"].split())
        yield Label(f"[{self.index}] {when} · {text}", classes="memory-text", markup=False)
        yield Button("Forget", classes="memory-forget", variant="error", compact=True)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.post_message(ForgetMemory(self.memory["id"]))


class MessageView(Vertical):
    """A user or assistant message; assistant replies can be streamed into it."""

    def __init__(self, role: str, content: str = "", *, status: str = "complete",
                 message_id: int | None = None, route: str | None = None,
                 memories: list[dict[str, Any]] | None = None) -> None:
        super().__init__(classes=f"message {role}")
        self.memories = memories or []
        self.role = role
        self.content = content
        self.status = status
        self.message_id = message_id
        self.route = route
        self._stream: MarkdownStream | None = None

    def compose(self) -> ComposeResult:
        yield Label(self._header(), classes="message-header")
        yield Markdown(self.content, classes="message-body")
        if self.memories:
            yield self._memories_panel()

    def _memories_panel(self) -> Collapsible:
        items = [MemoryItem(i, m) for i, m in enumerate(self.memories, start=1)]
        return Collapsible(*items, title=f"Memories used ({len(self.memories)})", collapsed=True,
                           classes="memories")

    async def show_memories(self, memories: list[dict[str, Any]]) -> None:
        """List the memories this reply was given, collapsed until the user opens them."""
        for panel in self.query(Collapsible):
            await panel.remove()
        self.memories = memories
        if memories:
            await self.mount(self._memories_panel())

    def _header(self) -> str:
        who = "You" if self.role == "user" else "Ember"
        parts = [who]
        if self.role == "assistant" and self.route:
            parts.append(f"route: {self.route}")
        if self.status in MARKS:
            parts.append(MARKS[self.status])
        return " · ".join(parts)

    def set_status(self, status: str) -> None:
        """Show how the reply ended."""
        self.status = status
        self.set_class(status != "complete", "partial")
        self.query_one(".message-header", Label).update(self._header())

    async def append(self, piece: str) -> None:
        """Add streamed text; bursts faster than the screen can paint are combined."""
        if self._stream is None:
            self._stream = Markdown.get_stream(self.query_one(Markdown))
        self.content += piece
        await self._stream.write(piece)

    async def end_stream(self) -> None:
        """Flush what is pending; the message is final."""
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
