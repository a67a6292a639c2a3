"""One message in the chat log: a header line (who, route, how it ended, the user's rating) and a body
(the user's words as written; a reply as Markdown, or the user's edit of it); and the note above a reply
whose oldest messages no longer fit the model's context."""
from __future__ import annotations

import asyncio
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, Collapsible, Label, Markdown, Static
from textual.widgets.markdown import MarkdownStream

from assistant.tui.widgets.status_line import short_id

# How a reply ended, when not simply complete (statuses from storage/conversations.py, plus "failed": the
# request raised before a reply was written, which the chat shows but does not store).
MARKS = {"cancelled": "⏹ cancelled", "interrupted": "⚠ interrupted", "generating": "…",
         "length": "✂ cut off at the token limit", "empty": "∅ empty reply", "failed": "⚠ not answered"}
ENDED_SHORT = ("cancelled", "interrupted", "length", "empty")
RATING_MARKS = {"up": "👍", "down": "👎"}


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


class PageAlternative(Message):
    """The user asked for the previous (-1) or next (+1) alternative of a message."""

    def __init__(self, view: "MessageView", step: int) -> None:
        super().__init__()
        self.view = view
        self.step = step


class EditMessage(Message):
    """The user asked to edit one of their earlier messages (a new branch starts from it)."""

    def __init__(self, view: "MessageView") -> None:
        super().__init__()
        self.view = view


class DroppedNote(Label):
    """Above a reply: how many of the conversation's oldest messages the model no longer saw."""

    def __init__(self, dropped: int) -> None:
        what = (f"{dropped} earlier messages no longer fit; they are in memory" if dropped != 1
                else "1 earlier message no longer fits; it is in memory")
        super().__init__(f"⋯ {what}", classes="dropped-note", markup=False)
        self.dropped = dropped


class MessageView(Vertical, can_focus=True):
    """A user or assistant message; assistant replies can be streamed into it.

    Focused (Shift+Tab from the prompt, or a click), ↑ ↓ move between messages, ← → page through a
    message's alternatives (regenerated replies, edits of a message), Enter edits a message of the user's
    into a new branch, and Esc goes back to the prompt.
    """

    BINDINGS = [
        Binding("left", "page(-1)", "Previous alternative", show=False),
        Binding("right", "page(1)", "Next alternative", show=False),
        Binding("up", "move(-1)", "Previous message", show=False),
        Binding("down", "move(1)", "Next message", show=False),
        Binding("enter", "edit", "Edit (new branch)", show=False),
        Binding("escape", "back", "Back to the prompt", show=False),
    ]

    def __init__(self, role: str, content: str = "", *, status: str = "complete",
                 message_id: int | None = None, route: str | None = None, adapter: str | None = None,
                 memories: list[dict[str, Any]] | None = None, rating: str | None = None,
                 edit: str | None = None, alternative: int = 1, alternatives: int = 1) -> None:
        super().__init__(classes=f"message {role}")
        self.alternative = alternative       # its place among the messages sharing its parent and role
        self.alternatives = alternatives
        self.asked: tuple | None = None      # (question, memories, tokens) of a reply written in this session
        self.memories = memories or []
        self.role = role
        self.content = content       # as generated (and logged)
        self.status = status
        self.message_id = message_id
        self.route = route
        self.adapter = adapter
        self.rating = rating         # up | down | None
        self.edit = edit             # what the user wanted the reply to say, or None
        self.error: str | None = None   # why a failed request has no reply
        self._stream: MarkdownStream | None = None
        self._header_label: Label | None = None
        self.set_class(status in ENDED_SHORT, "partial")
        self.set_class(edit is not None, "edited")

    @property
    def text(self) -> str:
        """What the message shows: the user's edit of a reply, or the reply itself."""
        return self.content if self.edit is None else self.edit

    def compose(self) -> ComposeResult:
        self._header_label = Label(self._header(), classes="message-header", markup=False)
        yield self._header_label
        if self.role == "user":
            # Literally, line for line: Markdown would join a pasted list's lines into one paragraph.
            yield Static(self.text, classes="message-body", markup=False)
        else:
            yield Markdown(self.text, classes="message-body")
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

    async def show_evidence(self, lines: list[str]) -> None:
        """Quote, under the answer, the sentences of memory it rests on (date, conversation, memory id)."""
        for old in self.query(".evidence"):
            await old.remove()
        if lines:
            await self.mount(Static("\n".join(f"↳ {line}" for line in lines), classes="evidence", markup=False))

    def _header(self) -> str:
        who = "You" if self.role == "user" else "Ember"
        parts = [who]
        if self.alternatives > 1:
            parts.append(f"‹ {self.alternative}/{self.alternatives} ›")
        if self.role == "assistant" and self.route:
            uses_adapter = self.route in ("adapter", "both") and self.adapter
            parts.append(f"route: {self.route}" + (f" ({short_id(self.adapter)})" if uses_adapter else ""))
        if self.status in MARKS:
            parts.append(MARKS[self.status] + (f": {self.error}" if self.error else ""))
        if self.rating in RATING_MARKS:
            parts.append(RATING_MARKS[self.rating])
        if self.edit is not None:
            parts.append("✎ edited")
        return " · ".join(parts)

    def _update_header(self) -> None:
        # The label, not `is_mounted`: a request that fails at once ends before the view's mount does.
        if self._header_label is not None:
            self._header_label.update(self._header())

    def set_alternatives(self, alternative: int, alternatives: int) -> None:
        """Show where this message stands among its alternatives (‹ 2/3 ›)."""
        self.alternative, self.alternatives = alternative, alternatives
        self._update_header()

    def action_page(self, step: int) -> None:
        self.post_message(PageAlternative(self, step))

    def action_edit(self) -> None:
        self.post_message(EditMessage(self))

    def action_move(self, step: int) -> None:
        views = list(self.screen.query(MessageView))
        index = views.index(self) + step
        if 0 <= index < len(views):
            self.screen.set_focus(views[index])   # at once: the next key already goes to it
        elif step > 0:
            self.action_back()

    def action_back(self) -> None:
        self.screen.set_focus(self.screen.query_one("#prompt"))

    def set_status(self, status: str) -> None:
        """Show how the reply ended."""
        self.status = status
        self.set_class(status in ENDED_SHORT, "partial")
        self._update_header()

    def set_failed(self, error: str) -> None:
        """Show that the request failed before a reply was written, and why (one line)."""
        self.error = " ".join(error.split())
        self.status = "failed"
        self.remove_class("partial")
        self.add_class("failed")
        self._update_header()

    def set_rating(self, rating: str | None) -> None:
        """Show the user's rating of this reply (None: not rated)."""
        self.rating = rating
        self._update_header()

    async def set_edit(self, text: str) -> None:
        """Show the user's edit in place of the reply, marked as edited."""
        self.edit = text
        self.add_class("edited")
        self._update_header()
        await self.query_one(Markdown).update(text)

    async def append(self, piece: str) -> None:
        """Add streamed text; bursts faster than the screen can paint are combined."""
        if self._stream is None:
            self._stream = Markdown.get_stream(self.query_one(Markdown))
        self.content += piece
        await self._stream.write(piece)

    async def end_stream(self) -> None:
        """Flush what is pending; the message is final."""
        stream, self._stream = self._stream, None
        if stream is None:
            return
        try:
            await stream.stop()
        except asyncio.CancelledError:
            # Textual's MarkdownStream.stop cancels its writer task and awaits it; a task cancelled before
            # it first ran (a reply that ends within a frame of its first piece: a fast model, a short
            # reply) raises CancelledError into us, and its pending text was never written. Only a
            # cancellation of this task itself goes on.
            if asyncio.current_task().cancelling():
                raise
            await self.query_one(Markdown).update(self.content)
