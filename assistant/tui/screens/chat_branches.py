"""The chat screen's branches: regenerate a reply, page through alternatives, edit an earlier message.

A conversation is a tree (storage: `messages.parent_id`, `conversations.current_id`). Regenerating keeps
the old reply as an alternative beside the new one; editing one of the user's messages starts a branch
from it, and the old branch stays. The screen shows the kept branch, each message with alternatives
marked ‹ 2/3 ›; paging to another alternative keeps the branch through it. Requests go through
`assistant.conversation.respond`, as every other reply does (the CLI: `ember ask --regenerate/--edit`,
`ember history --choose`).
"""
from __future__ import annotations

import functools

from textual.screen import Screen

from assistant.conversation import Question, log_question, regenerate_question
from assistant.tui.errors import shows_errors
from assistant.tui.screens.chat_reply import BUSY
from assistant.tui.screens.edit_reply import EditReplyScreen
from assistant.tui.widgets.message import EditMessage, MessageView, PageAlternative
from storage import conversations as convs

INCOGNITO_BRANCHES = "Incognito keeps no alternatives: nothing of it is stored."


class BranchActions(Screen):
    """Regenerate, alternatives and edits, mixed into `ChatScreen` (which provides the log and sending)."""

    conversation_id: int | None
    incognito: bool
    private_history: list
    generating: bool
    persona_asked: str | None

    def _ready_to_reply(self) -> bool:
        if self.generating:
            self.notify(BUSY, severity="warning")
            return False
        if self.app.engine_error:
            self.notify(self.app.engine_error, severity="error")
            return False
        return True

    def _last_reply_view(self) -> MessageView | None:
        replies = [v for v in self.query(MessageView) if v.role == "assistant"]
        return replies[-1] if replies else None

    @shows_errors
    async def action_regenerate(self) -> None:
        """Answer the last question again; the old reply stays as an alternative (← → pages them)."""
        if not self._ready_to_reply():
            return
        view = self._last_reply_view()
        if view is None:
            self.notify("There is no reply to regenerate yet.", severity="warning")
            return
        if self.incognito:
            # Stored nowhere, so nothing to keep beside it: the reply is replaced.
            if not self.private_history or self.private_history[-1]["role"] != "assistant":
                self.notify("There is no finished reply to regenerate yet.", severity="warning")
                return
            self.private_history.pop()
            asked = self.private_history[-1]["content"]
            question = log_question(self.app.db, asked, log=False, history=list(self.private_history[:-1]),
                                    persona=self.persona_asked)
            await view.remove()
            self.notify(INCOGNITO_BRANCHES + " The new reply replaces the old one.")
            self.begin_reply(question)
            return
        if view.message_id is None:
            self.notify("That reply was not stored (it failed); send the question again.", severity="warning")
            return
        question = regenerate_question(self.app.db, view.message_id)
        await view.remove()
        self.begin_reply(question)

    def action_previous_alternative(self) -> None:
        """Show the previous alternative of the focused message, else of the last reply."""
        self._page(-1)

    def action_next_alternative(self) -> None:
        """Show the next alternative of the focused message, else of the last reply."""
        self._page(1)

    def _page(self, step: int) -> None:
        view = self.focused if isinstance(self.focused, MessageView) else self._last_reply_view()
        if view is not None:
            self.page_alternative(view, step)

    def on_page_alternative(self, message: PageAlternative) -> None:
        message.stop()
        self.page_alternative(message.view, message.step)

    @shows_errors
    def page_alternative(self, view: MessageView, step: int) -> None:
        """Keep the branch through `view`'s previous or next alternative, and show it."""
        if self.incognito:
            self.notify(INCOGNITO_BRANCHES)
            return
        if self.generating:
            self.notify(BUSY, severity="warning")
            return
        if view.message_id is None:
            return
        ids = convs.alternatives(self.app.db, view.message_id)
        index = ids.index(view.message_id) + step
        if len(ids) == 1:
            self.notify("This message has no alternatives: Ctrl+G regenerates a reply, Enter on your "
                        "message edits it.")
            return
        if not 0 <= index < len(ids):
            self.notify("That is the first alternative." if index < 0 else "That is the last alternative.")
            return
        convs.choose(self.app.db, ids[index])
        was_focused = self.focused is view
        self.open_conversation(self.conversation_id)
        shown = [v for v in self.query(MessageView) if v.message_id == ids[index]]
        if shown and was_focused:
            self.call_after_refresh(shown[0].focus)

    @shows_errors
    def action_edit_message(self) -> None:
        """Edit the focused message of yours, else your last one: a new branch starts from it."""
        view = self.focused if isinstance(self.focused, MessageView) and self.focused.role == "user" else None
        if view is None:
            mine = [v for v in self.query(MessageView) if v.role == "user"]
            view = mine[-1] if mine else None
        if view is None:
            self.notify("You have not written anything here yet.", severity="warning")
            return
        self.edit_message(view)

    def on_edit_message(self, message: EditMessage) -> None:
        message.stop()
        if message.view.role == "user":
            self.edit_message(message.view)
        else:
            self.notify("That is Ember's reply: F7 edits the last reply into what you wanted.")

    @shows_errors
    def edit_message(self, view: MessageView) -> None:
        if self.incognito:
            self.notify(INCOGNITO_BRANCHES)
            return
        if not self._ready_to_reply() or view.message_id is None:
            return
        screen = EditReplyScreen(view.text, title="Edit your message: the conversation goes on from it",
                                 help="Ctrl+S sends it, Esc cancels · the old branch stays (← → on the message pages them)",
                                 save="Send")
        self.app.push_screen(screen, functools.partial(self._message_edited, view.message_id))

    @shows_errors
    def _message_edited(self, message_id: int, text: str | None) -> None:
        if text is None or not self._ready_to_reply():
            return
        original = convs.get_message(self.app.db, message_id)["content"]
        if text.strip() == original.strip():
            return
        question = log_question(self.app.db, text, instead_of=message_id)   # stored before anything else
        self.open_conversation(question.conversation_id)
        self.begin_reply(question, show_question=False)

    def open_conversation(self, conversation_id: int | None) -> None:   # provided by ChatScreen
        raise NotImplementedError

    def begin_reply(self, question: Question, *, show_question: bool = False) -> None:   # ReplyActions
        raise NotImplementedError
