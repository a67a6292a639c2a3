"""Where the user types: a multi-line box that keeps every character typed or pasted.

Enter sends; Shift+Enter, Alt+Enter or Ctrl+J start a new line (many terminals send Shift+Enter as a plain
Enter; Ctrl+J is a line feed in every terminal). A bracketed paste arrives whole and keeps its lines. A paste
without brackets arrives as keys: its line feeds are Ctrl+J, and its carriage returns are Enters followed
at once by more text, which are taken as line breaks rather than as "send". ↑ in an empty box goes up
to the messages (to page alternatives, or edit one of yours).
"""
from __future__ import annotations

from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.timer import Timer
from textual.widgets import TextArea

NEWLINE_KEYS = ("shift+enter", "alt+enter", "ctrl+j")
HINT = "Enter sends · Ctrl+J or Shift+Enter: new line · F1 keys · Ctrl+P commands"
# An Enter followed by more keys within this time was a line break inside a paste, not "send". People
# take far longer between pressing Enter and typing on; a terminal delivers a paste in one burst.
PASTE_GAP = 0.05
# Keys the chat screen binds: the text area's own bindings for them (F6 select line, F7 select all,
# Ctrl+Y redo) would hide the screen's actions while the prompt has focus.
SCREEN_KEYS = {"f2", "f3", "f4", "f5", "f6", "f7", "f8", "ctrl+y", "ctrl+n", "ctrl+f", "ctrl+r", "ctrl+b",
               "f9", "ctrl+t", "ctrl+g", "alt+left", "alt+right", "f1", "ctrl+o", "ctrl+l"}


def _without_screen_keys(bindings: list) -> list[Binding]:
    kept = []
    for binding in Binding.make_bindings(bindings):
        keys = [key for key in binding.key.split(",") if key.strip() not in SCREEN_KEYS]
        if keys:
            kept.append(binding if len(keys) == len(binding.key.split(",")) else
                        Binding(",".join(keys), binding.action, binding.description, show=binding.show))
    return kept


class PromptInput(TextArea, inherit_bindings=False):
    """The prompt: grows with its text up to a few lines, then scrolls."""

    BINDINGS = _without_screen_keys(TextArea.BINDINGS)

    class Submitted(Message):
        """The user pressed Enter to send `text` (exactly as in the box)."""

        def __init__(self, prompt: PromptInput, text: str) -> None:
            super().__init__()
            self.prompt = prompt
            self.text = text

        @property
        def control(self) -> PromptInput:
            return self.prompt

    def __init__(self) -> None:
        super().__init__(id="prompt", soft_wrap=True, show_line_numbers=False, tab_behavior="focus",
                         placeholder="Message Ember…")
        # Always in sight, also while typing (a placeholder goes with the first key).
        self.border_subtitle = HINT
        self._enter_at: float | None = None   # when a pending Enter was pressed
        self._submit_timer: Timer | None = None

    @property
    def submit_pending(self) -> bool:
        """An Enter was pressed and is about to send (unless more keys follow at once: a paste)."""
        return self._submit_timer is not None

    def take(self, text: str) -> None:
        """Remove `text`, just sent, from the start of the box; anything typed after it stays."""
        if self.text.startswith(text):
            self.delete((0, 0), self.document.get_location_from_index(len(text)),
                        maintain_selection_offset=False)
        else:
            self.clear()

    def on_paste(self, event: events.Paste) -> None:
        # TextArea has inserted it: it goes no further, so a paste that reaches the chat screen is one
        # the prompt did not take (see ChatScreen.on_paste).
        event.stop()

    def set_text(self, text: str) -> None:
        """Put `text` in the box (replacing what is there), cursor at its end."""
        self.load_text(text)
        self.move_cursor(self.document.end)

    async def _on_key(self, event: events.Key) -> None:
        # Runs before TextArea's own handler, which inserts printable keys (and a newline for Enter).
        focused = self.screen.focused
        if focused is not None and focused is not self and focused.has_class("message"):
            # Typed right behind a key that moved the focus (↑ to the messages), so queued here: it is
            # the focused widget's; left to bubble, the bindings of the focus chain as it is now take it.
            event.prevent_default()
            return
        if self._enter_at is not None and (event.is_printable or event.key in ("enter", *NEWLINE_KEYS)):
            pasted = event.time - self._enter_at < PASTE_GAP
            self._cancel_submit()
            if pasted:
                self._newline()
            else:   # the loop was slow to fire the timer: the Enter still meant "send"
                self._submit()
        if event.key == "up" and not self.text:
            event.stop()
            event.prevent_default()
            # Focus moves now, not after the queue: keys typed right behind this one go to the message.
            messages = self.screen.query("MessageView")
            if messages:
                self.screen.set_focus(messages.last())
        elif event.key == "enter":
            event.stop()
            event.prevent_default()
            self._enter_at = event.time
            self._submit_timer = self.set_timer(PASTE_GAP, self._submit)
        elif event.key in NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self._newline()

    def _newline(self) -> None:
        self.replace("\n", *self.selection, maintain_selection_offset=False)
        self.scroll_cursor_visible()

    def _cancel_submit(self) -> None:
        if self._submit_timer is not None:
            self._submit_timer.stop()
        self._submit_timer = self._enter_at = None

    def _submit(self) -> None:
        self._cancel_submit()
        self.post_message(self.Submitted(self, self.text))
