"""The chat screen's context view: what the model saw for a reply, toggled under it (Ctrl+O).

Built on demand, never on the request path: a stored reply's context is rebuilt from the log
(`assistant.context_view.of_reply`); a reply of this session in an incognito conversation, from the
question and memories the screen kept. Counting tokens uses the model, so it runs in a worker while no
reply is being written.
"""
from __future__ import annotations

from textual import work
from textual.screen import Screen

from assistant.context_view import ContextBudget, budget, of_reply
from assistant.conversation import with_persona
from assistant.errors import EmberError
from assistant.tui.widgets.context_bar import ContextBar
from assistant.tui.widgets.message import MessageView


class ContextActions(Screen):
    """Context view, mixed into `ChatScreen`."""

    generating: bool

    def action_toggle_context(self) -> None:
        """Show or hide the context of the focused reply, else of the last one."""
        view = self.focused if isinstance(self.focused, MessageView) and self.focused.role == "assistant" else None
        if view is None:
            replies = [v for v in self.query(MessageView) if v.role == "assistant" and v.status != "generating"]
            view = replies[-1] if replies else None
        if view is None:
            self.notify("There is no reply yet whose context to show.", severity="warning")
            return
        shown = view.query(ContextBar)
        if shown:
            shown.remove()
            return
        if self.generating or self.app.engine is None:
            self.notify("The model is busy; the context can be shown when the reply is done.", severity="warning")
            return
        if view.message_id is None and view.asked is None:
            self.notify("This reply was not answered, so it had no context.", severity="warning")
            return
        self.count_context(view)

    @work(thread=True, group="context", exclusive=True)
    def count_context(self, view: MessageView) -> None:
        app = self.app
        try:
            with app.engine_lock:
                if view.message_id is not None:
                    found = of_reply(app.reply_db, app.engine, app.settings, view.message_id)
                else:
                    question, memories, tokens = view.asked
                    settings, _route = with_persona(app.settings, question.persona, None)
                    found = budget(app.engine, settings, question, memories, reply_tokens=tokens)
        except EmberError as err:
            app.call_from_thread(self.notify, str(err), severity="error", timeout=8)
            return
        app.call_from_thread(self._show_context, view, found)

    async def _show_context(self, view: MessageView, found: ContextBudget) -> None:
        if view.is_attached and not view.query(ContextBar):
            await view.mount(ContextBar(found))
            view.scroll_visible()
