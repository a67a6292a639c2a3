"""One message in the chat log: a header line (who, how it ended) and a Markdown body."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Markdown
from textual.widgets.markdown import MarkdownStream

MARKS = {"cancelled": "⏹ cancelled", "interrupted": "⚠ interrupted", "generating": "…"}


class MessageView(Vertical):
    """A user or assistant message; assistant replies can be streamed into it."""

    def __init__(self, role: str, content: str = "", *, status: str = "complete",
                 message_id: int | None = None, route: str | None = None) -> None:
        super().__init__(classes=f"message {role}")
        self.role = role
        self.content = content
        self.status = status
        self.message_id = message_id
        self.route = route
        self._stream: MarkdownStream | None = None

    def compose(self) -> ComposeResult:
        yield Label(self._header(), classes="message-header")
        yield Markdown(self.content, classes="message-body")

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
