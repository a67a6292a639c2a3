"""The chat screen's feedback actions: rate the last reply, edit it, keep a conversation out of learning.

They store through `storage.feedback`, the same calls as `ember feedback`; what the user said shows on
the reply (👍/👎, ✎ edited) and on the conversation (⊘), and again when it is reopened.
"""
from __future__ import annotations

import functools

from textual.screen import Screen

from assistant.tui.errors import shows_errors
from assistant.tui.screens.edit_reply import EditReplyScreen
from assistant.tui.widgets.message import MessageView
from storage import feedback

RATED = {"up": "Rated the last reply up.", "down": "Rated the last reply down.",
         "clear": "Cleared the rating of the last reply."}


class FeedbackActions(Screen):
    """Feedback actions, mixed into `ChatScreen` (which provides the title, sidebar and log)."""

    conversation_id: int | None
    generating: bool
    incognito: bool

    def last_reply(self) -> MessageView | None:
        """The open conversation's newest finished reply; None (and a notification) when there is none.

        A reply cut short (cancelled, interrupted) counts: it is the one the user just read. While one is
        being written, feedback waits, rather than landing on the reply before it.
        """
        if self.incognito:
            self.notify("Incognito: nothing is stored, so there is no reply to rate or edit.",
                        severity="warning")
            return None
        if self.generating:
            self.notify("Ember is still replying; give feedback when the reply is done (Esc cancels it).",
                        severity="warning")
            return None
        replies = [v for v in self.query(MessageView) if v.role == "assistant" and v.message_id is not None]
        if not replies:
            self.notify("There is no finished reply here yet to give feedback on.", severity="warning")
            return None
        return replies[-1]

    @shows_errors
    def action_rate_up(self) -> None:
        """Rate the last reply up; rating it up again clears the rating."""
        self._rate("up")

    @shows_errors
    def action_rate_down(self) -> None:
        """Rate the last reply down; rating it down again clears the rating."""
        self._rate("down")

    def _rate(self, rating: str) -> None:
        view = self.last_reply()
        if view is None:
            return
        rating = "clear" if view.rating == rating else rating
        feedback.rate(self.app.db, view.message_id, rating)
        view.set_rating(None if rating == "clear" else rating)
        self.notify(RATED[rating])

    @shows_errors
    def action_edit_reply(self) -> None:
        """Open the last reply (or the user's earlier edit of it) in an editor."""
        view = self.last_reply()
        if view is not None:
            self.app.push_screen(EditReplyScreen(view.text), functools.partial(self._edited, view))

    @shows_errors
    async def _edited(self, view: MessageView, text: str | None) -> None:
        if text is None or text.strip() == view.text.strip():
            return
        feedback.edit(self.app.db, view.message_id, text)
        if view.is_attached:
            await view.set_edit(text)
        self.notify("Saved your edit of the reply; Ember learns from what you wanted.")

    @shows_errors
    def action_toggle_exclude(self) -> None:
        """Keep the open conversation out of learning, or let Ember learn from it again."""
        if self.incognito:
            self.notify("Incognito: this conversation is stored nowhere, so nothing learns from it.")
            return
        if self.conversation_id is None:
            self.notify("Send a message first: a new conversation is saved when it has one.",
                        severity="warning")
            return
        excluded = not feedback.is_excluded(self.app.db, self.conversation_id)
        feedback.set_excluded(self.app.db, self.conversation_id, excluded)
        self.show_title()
        self.refresh_sidebar()
        self.notify("Ember will not learn from this conversation." if excluded
                    else "Ember may learn from this conversation again.")

    def show_title(self) -> None:   # provided by ChatScreen
        raise NotImplementedError

    def refresh_sidebar(self) -> None:   # provided by ChatScreen
        raise NotImplementedError
