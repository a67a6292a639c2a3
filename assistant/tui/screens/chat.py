"""The main screen: conversations on the left, the chat on the right, status and keys below."""
from __future__ import annotations

import functools
import threading

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Footer, Label, ListView

from assistant.conversation import resolve_route, with_persona
from assistant.engine import Message
from assistant.display import display_title, one_line
from assistant.tui.errors import shows_errors
from assistant.tui.screens.chat_branches import BranchActions
from assistant.tui.screens.chat_context import ContextActions
from assistant.tui.screens.chat_feedback import FeedbackActions
from assistant.tui.screens.chat_models import ModelActions
from assistant.tui.screens.chat_reply import BUSY, ReplyActions
from assistant.tui.screens.help import PROMPT_KEYS, HelpScreen, keys_of
from assistant.tui.screens.modals import ConfirmScreen, RenameScreen
from assistant.tui.screens.persona import PersonaScreen
from assistant.tui.screens.search import SearchScreen
from assistant.tui.widgets.conversation_list import EXCLUDED_MARK, ConversationItem, ConversationList
from assistant.tui.widgets.message import ForgetMemory, MessageView
from assistant.tui.widgets.prompt import PromptInput
from assistant.tui.widgets.status_line import StatusLine
from storage import conversations as convs
from storage import feedback, memory, personas, routing

INCOGNITO_BANNER = ("Incognito: nothing of this conversation is saved (not the log, memory, learning or the "
                    "router's log). It is gone when you close it or start another.")

# Every action here also appears in the command palette (see EmberApp.get_system_commands).
ACTIONS = [
    ("new_conversation", "New conversation", "Start a new, empty conversation"),
    ("toggle_incognito", "Incognito conversation on/off",
     "Start a conversation that is saved nowhere (again: back to a normal one)"),
    ("choose_persona", "Choose persona", "Pick the persona of this conversation, or the default for new ones"),
    ("switch_model", "Switch model",
     "Load another model: the bundled one, those `ember compress` made, recent ones, or any GGUF by path"),
    ("help", "Help: every key", "List every key of the chat"),
    ("learning", "Learning", "Adapters, the privacy budget spent, training curves, what each adapter learned "
                             "from, the daemon; adapt now"),
    ("toggle_context", "Show the reply's context",
     "What the model saw for the last reply: system prompt, memories, history kept and dropped, room left"),
    ("rename_conversation", "Rename conversation", "Give the open conversation a new title"),
    ("delete_conversation", "Delete conversation", "Delete the open conversation and its messages"),
    ("cancel_reply", "Cancel reply", "Stop the reply being written; the partial reply is kept"),
    ("regenerate", "Regenerate reply", "Answer the last question again; the old reply stays as an alternative"),
    ("previous_alternative", "Previous alternative",
     "Show the previous alternative of the last reply (or of the focused message)"),
    ("next_alternative", "Next alternative", "Show the next alternative of the last reply (or of the focused message)"),
    ("edit_message", "Edit my message (new branch)",
     "Edit your last message (or the focused one); the conversation goes on from the edit, the old branch stays"),
    ("copy_last_reply", "Copy last reply", "Copy Ember's last reply to the clipboard"),
    ("search", "Search conversations", "Find words in every past conversation"),
    ("toggle_sidebar", "Toggle conversation list", "Show or hide the list of conversations"),
    ("toggle_memory", "Memory: auto / on / off",
     "Let the router decide when memories help, always use them, or never"),
    ("why_route", "Why this route", "Say why the last reply used memory, the adapter, both or neither"),
    ("rate_up", "Rate last reply up", "Mark Ember's last reply as good (again: clear the rating)"),
    ("rate_down", "Rate last reply down", "Mark Ember's last reply as bad (again: clear the rating)"),
    ("edit_reply", "Edit last reply", "Correct Ember's last reply into what you wanted it to say"),
    ("toggle_exclude", "Exclude conversation from learning on/off",
     "Keep the open conversation out of what Ember learns from"),
]


class ChatScreen(ReplyActions, FeedbackActions, BranchActions, ContextActions, ModelActions):
    """Chat with the model; every exchange is logged as it happens (sending and streaming: `ReplyActions`;
    feedback: `FeedbackActions`)."""

    # The footer shows the most used keys, quit included, and fits in 100 columns; F1 lists every key,
    # and every action is in the palette (Ctrl+P).
    BINDINGS = [
        Binding("ctrl+n", "new_conversation", "New"),
        Binding("escape", "cancel_reply", "Cancel reply"),   # shown while a reply is being written
        Binding("ctrl+g", "regenerate", "Regenerate", tooltip="Answer again; the old reply stays as an alternative"),
        Binding("f5", "rate_up", "Good", tooltip="Rate the last reply up (again: clear the rating)"),
        Binding("f6", "rate_down", "Bad", tooltip="Rate the last reply down (again: clear the rating)"),
        Binding("f7", "edit_reply", "Edit", tooltip="Edit the last reply into what you wanted"),
        Binding("ctrl+f", "search", "Search", tooltip="Search every past conversation"),
        Binding("f1", "help", "Help", tooltip="Every key, in one table"),
        Binding("alt+left", "previous_alternative", "Previous alternative", show=False,
                tooltip="The last reply's previous alternative"),
        Binding("alt+right", "next_alternative", "Next alternative", show=False,
                tooltip="The last reply's next alternative"),
        Binding("ctrl+l", "learning", "Learning", show=False,
                tooltip="What Ember learned, from what, at what privacy cost; adapt now"),
        Binding("ctrl+o", "toggle_context", "Context", show=False,
                tooltip="What the model saw for the last (or focused) reply: tokens by part"),
        Binding("f3", "toggle_memory", "Memory", show=False, tooltip="Memory: auto / on / off"),
        Binding("f2", "why_route", "Why", show=False, tooltip="Why the last reply took its route"),
        Binding("f4", "toggle_exclude", "Exclude", show=False, tooltip="Keep this conversation out of learning"),
        Binding("ctrl+y", "copy_last_reply", "Copy", show=False, tooltip="Copy the last reply"),
        Binding("ctrl+r", "rename_conversation", "Rename", show=False, tooltip="Rename the conversation"),
        Binding("f8", "delete_conversation", "Delete", show=False, tooltip="Delete the conversation"),
        Binding("ctrl+b", "toggle_sidebar", "Sidebar", show=False, tooltip="Show or hide the conversation list"),
        Binding("f9", "toggle_incognito", "Incognito", show=False, tooltip="A conversation saved nowhere"),
        Binding("ctrl+t", "choose_persona", "Persona", show=False, tooltip="The persona of this conversation"),
        Binding("f10", "switch_model", "Model", show=False,
                tooltip="Switch model: a known one (bundled, compressed, recent) or any GGUF path"),
    ]

    def __init__(self, conversation_id: int | None = None, *, incognito: bool = False) -> None:
        super().__init__()
        self.conversation_id = conversation_id
        self.cancel: threading.Event | None = None
        self.memory = "auto"   # F3: auto (the router decides), on (always memories), off (never)
        # F9: a conversation written nowhere; its messages live only here, in `private_history`.
        self.incognito = incognito
        self.private_history: list[Message] = []
        self.persona: dict | None = None   # the open conversation's (storage.personas), None: none

    # ---- layout and start-up -------------------------------------------------------------
    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            yield ConversationList(id="sidebar")
            with Vertical(id="chat-pane"):
                yield Label("New conversation", id="conversation-title", markup=False)
                yield Label(INCOGNITO_BANNER, id="incognito-banner", markup=False)
                yield VerticalScroll(id="log")
                yield PromptInput()
        yield StatusLine(id="status")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        status = self.query_one(StatusLine)
        status.model = self.app.settings.model_path.name
        status.state = "ready" if self.app.engine is not None else "loading model…"
        self.show_engine_state()
        self.refresh_sidebar()
        self.open_conversation(self.conversation_id)
        self.query_one(PromptInput).focus()
        if self.app.engine is not None:
            self.show_engine_warnings()
        self.call_after_refresh(self.app.chat_painted)

    def on_unmount(self) -> None:
        # Leaving the app: a reply still streaming is cancelled so its worker can mark it and finish.
        # (The app's own unmount comes after its screens are gone.)
        if self.cancel is not None:
            self.cancel.set()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Esc (and its footer key) only means something while a reply is being written.
        return self.generating if action == "cancel_reply" else True

    @property
    def route(self) -> str:
        """The route asked for: the persona's route, else the router's choice (auto), or by hand with
        memory on or off; by hand, the adapter is used whenever one is loaded."""
        if self.memory == "auto":
            return with_persona(self.app.settings, self.persona, None)[1]   # the persona's, else auto
        adapter = self.app.engine is not None and self.app.engine.loaded_adapter
        if self.memory == "on":
            return "both" if adapter else "rag"
        return "adapter" if adapter else "base"

    def show_engine_state(self) -> None:
        """Show the adapter in use and the route the next reply takes."""
        engine = self.app.engine
        status = self.query_one(StatusLine)
        status.adapter = engine.loaded_adapter if engine is not None else None
        status.memory = self.memory
        status.route = resolve_route(self.route, engine) if engine is not None else self.route
        status.persona = self.persona["name"] if self.persona else None
        status.incognito = self.incognito

    def show_adaptation(self, progress: str | None) -> None:
        """Show an adaptation run's progress (None: none is running)."""
        for status in self.query(StatusLine):   # none while the app is closing: the timer may still tick
            status.adapting = progress

    @shows_errors
    def refresh_sidebar(self) -> None:
        """Reload the conversation list from the database."""
        self.query_one(ConversationList).show(convs.list_conversations(self.app.db), self.conversation_id,
                                              feedback.excluded_conversations(self.app.db))

    @shows_errors
    def open_conversation(self, conversation_id: int | None) -> None:
        """Show a conversation's messages (None: a new, empty one, incognito when `self.incognito`)."""
        self.conversation_id = conversation_id
        self.private_history = []   # an incognito conversation left is gone
        self._draft_read = None     # what was read ahead belonged to the conversation before
        self.persona = (personas.of_conversation(self.app.db, conversation_id) if conversation_id is not None
                        else personas.default_persona(self.app.db))
        self.query_one("#incognito-banner", Label).display = self.incognito
        self.show_engine_state()
        log = self.query_one("#log", VerticalScroll)
        log.remove_children()
        self.show_title()   # also raises NotFound for an id that does not exist
        if conversation_id is not None:
            said = feedback.state(self.app.db, conversation_id)
            log.mount_all(MessageView(m["role"], m["content"], status=m["status"], message_id=m["id"],
                                      route=m["route"], adapter=m["adapter_id"],
                                      memories=memory.reply_memories(self.app.db, m["id"])
                                      if m["route"] in ("rag", "both") else None,
                                      rating=said.get(m["id"], {}).get("rating"),
                                      edit=said.get(m["id"], {}).get("edit"),
                                      alternative=m["alternative"], alternatives=m["alternatives"])
                          for m in convs.branch(self.app.db, conversation_id))   # the branch kept
        log.scroll_end(animate=False)
        log.anchor()

    def show_title(self) -> None:
        """Show the open conversation's title as stored (titles change on the first message), and
        whether it is kept out of learning."""
        if self.incognito:
            self.query_one("#conversation-title", Label).update("Incognito conversation (not saved)")
            return
        title = ("New conversation" if self.conversation_id is None
                 else display_title(convs.get_conversation(self.app.db, self.conversation_id)["title"]))
        excluded = self.conversation_id is not None and feedback.is_excluded(self.app.db, self.conversation_id)
        label = self.query_one("#conversation-title", Label)
        label.update(f"{title}  {EXCLUDED_MARK} not used for learning" if excluded else title)
        label.set_class(excluded, "excluded")

    def model_ready(self) -> None:
        """Called by the app when the model has loaded."""
        if not self.generating:
            self.query_one(StatusLine).state = "ready"
        self.show_engine_warnings()

    def show_engine_warnings(self) -> None:
        """Say once, in the status line, what the user should know about the model (e.g. that its GGUF
        has no chat template, so replies use a fallback format); the first reply clears it."""
        warnings = [w for w in self.app.engine.warnings if w not in self.app.warned]
        if warnings:
            self.app.warned.update(warnings)
            self.query_one(StatusLine).notice = "; ".join(one_line(w) for w in warnings)

    def on_paste(self, event: events.Paste) -> None:
        # A paste while the sidebar (say) has focus goes to the prompt, whole, rather than nowhere. It
        # reaches here only when the prompt did not take it (the prompt stops the pastes it inserts).
        # Asking "is the prompt focused now?" instead lost pastes: the app routes a paste by the focus at
        # the moment it arrives, and the focus may move to the prompt before the paste reaches here
        # (focus() is applied later, e.g. at start-up).
        event.stop()
        prompt = self.query_one(PromptInput)
        prompt.focus()
        prompt.replace(event.text, *prompt.selection, maintain_selection_offset=False)

    # ---- actions ----------------------------------------------------------------------------
    def action_cancel_reply(self) -> None:
        """Stop the reply being written; what was said so far is kept and marked."""
        if self.cancel is not None:
            self.cancel.set()
            self.query_one(StatusLine).state = "cancelling…"

    @shows_errors
    def action_new_conversation(self) -> None:
        if self.generating:
            self.notify(BUSY, severity="warning")
            return
        self.leave_incognito()
        self.open_conversation(None)
        self.refresh_sidebar()
        self.query_one(PromptInput).focus()

    def on_list_view_selected(self, event: ListView.Selected) -> None:
        if isinstance(event.item, ConversationItem) and event.item.conversation_id != self.conversation_id:
            self.switch_to(event.item.conversation_id)

    @shows_errors
    def switch_to(self, conversation_id: int) -> None:
        """Open another conversation (not while a reply is being written)."""
        if self.generating:
            self.notify(BUSY, severity="warning")
            self.refresh_sidebar()
            return
        self.leave_incognito()
        self.open_conversation(conversation_id)
        self.refresh_sidebar()
        self.query_one(PromptInput).focus()

    def leave_incognito(self) -> None:
        """Close an incognito conversation: its messages, held only here, are dropped."""
        if self.incognito:
            self.incognito = False
            self.notify("Incognito conversation closed; nothing of it was kept.")

    @shows_errors
    def action_toggle_incognito(self) -> None:
        """Start an incognito conversation (saved nowhere), or close one and start a normal one."""
        if self.generating:
            self.notify(BUSY, severity="warning")
            return
        if self.incognito:
            self.leave_incognito()
        else:
            self.incognito = True
            self.notify("Incognito: nothing of this conversation will be saved.")
        self.open_conversation(None)
        self.refresh_sidebar()
        self.query_one(PromptInput).focus()

    @shows_errors
    def action_choose_persona(self) -> None:
        """Pick the open conversation's persona (or make one the default) from a list."""
        if self.generating:
            self.notify(BUSY, severity="warning")
            return
        self.app.push_screen(PersonaScreen(self.persona["name"] if self.persona else None), self._persona_chosen)

    @shows_errors
    def _persona_chosen(self, name: str | None) -> None:
        if name is None:
            return
        if self.conversation_id is not None and not self.incognito:
            self.persona = personas.set_for_conversation(self.app.db, self.conversation_id, name)
        else:   # stored with the conversation's first message (never, when incognito)
            self.persona = None if name == personas.NONE else personas.get_persona(self.app.db, name)
        self.show_engine_state()
        self.notify(f"Persona: {self.persona['name']}." if self.persona else "No persona in this conversation.")

    @property
    def persona_asked(self) -> str | None:
        """The persona to name with the next message: the one shown, for a conversation not stored yet;
        None (the conversation's own) once it is stored."""
        if self.conversation_id is not None and not self.incognito:
            return None
        return self.persona["name"] if self.persona else personas.NONE

    @shows_errors
    def action_rename_conversation(self) -> None:
        if self.incognito:
            self.notify("An incognito conversation is not saved, so it has no title to change.")
            return
        if self.conversation_id is None:
            self.notify("Send a message first: a new conversation is saved when it has one.")
            return
        current = one_line(convs.get_conversation(self.app.db, self.conversation_id)["title"])
        self.app.push_screen(RenameScreen(current), self._renamed)

    @shows_errors
    def _renamed(self, title: str | None) -> None:
        if title and self.conversation_id is not None:
            convs.rename_conversation(self.app.db, self.conversation_id, title)
            self.show_title()
            self.refresh_sidebar()

    @shows_errors
    def action_delete_conversation(self) -> None:
        if self.conversation_id is None:
            return
        if self.generating:
            self.notify(BUSY, severity="warning")
            return
        title = display_title(convs.get_conversation(self.app.db, self.conversation_id)["title"])
        counts = convs.preview_delete(self.app.db, self.conversation_id)
        what = f"This deletes {counted(counts['messages'], 'message')} and {counted(counts['memories'], 'memory')}"
        what += " made from them." if counts["messages"] else "."
        if counts.get("adapters_tainted"):
            what += f" {counted(counts['adapters_tainted'], 'adapter')} trained on them will be withdrawn."
        self.app.push_screen(ConfirmScreen(f"Delete “{title}”?\n\n{what}"),
                             functools.partial(self._delete_answered, self.conversation_id))

    @shows_errors
    def _delete_answered(self, conversation_id: int, yes: bool | None) -> None:
        if yes:
            title = display_title(convs.get_conversation(self.app.db, conversation_id)["title"])
            done = convs.delete_conversation(self.app.db, conversation_id)
            self.notify(f"Deleted “{title}”: {counted(done['messages'], 'message')}, "
                        f"{counted(done['memories'], 'memory')}.")
            self.open_conversation(None)
            self.refresh_sidebar()

    def action_copy_last_reply(self) -> None:
        replies = [v for v in self.query(MessageView) if v.role == "assistant" and v.text]
        if not replies:
            self.notify("No reply to copy yet.")
            return
        self.app.copy_to_clipboard(replies[-1].text)
        self.notify("Copied the last reply.")

    def action_search(self) -> None:
        def chosen(conversation_id: int | None) -> None:
            if conversation_id is not None:
                self.switch_to(conversation_id)

        self.app.push_screen(SearchScreen(), chosen)

    def action_toggle_memory(self) -> None:
        """Cycle memory use: auto (the router decides per reply) → on (always) → off (never)."""
        self.memory = {"auto": "on", "on": "off", "off": "auto"}[self.memory]
        self.show_engine_state()
        self.notify({"on": "Every reply now uses your memories.",
                     "off": "Replies no longer use your memories.",
                     "auto": "Ember now decides per reply whether memories or your adapter help "
                             "(F2 says why)."}[self.memory])

    @shows_errors
    def action_why_route(self) -> None:
        """Explain the route of the last reply: the router's reason, or that it was chosen by hand."""
        views = [v for v in self.query(MessageView) if v.role == "assistant" and v.message_id is not None]
        if self.incognito:
            self.notify("Incognito: the router's reasons are not kept.")
            return
        if not views:
            self.notify("No reply yet: the route is decided for each reply.")
            return
        view = views[-1]
        decision = routing.decision_for(self.app.db, view.message_id)
        if decision is None:
            self.notify(f"Route {view.route or 'base'}: chosen by hand (F3 memory on/off), not by the router.")
            return
        self.notify(f"Route {decision['route']}: {decision['reason']} "
                    f"(decided in {decision['seconds'] * 1000:.0f} ms)", timeout=15)

    def on_forget_memory(self, message: ForgetMemory) -> None:
        found = memory.chunks_by_id(self.app.db, [message.chunk_id]).get(message.chunk_id)
        if found is None:
            return
        what = ("This memory is a message you sent; forgetting it deletes that message."
                if found["source"] == "message" else "Forget this imported note?")
        self.app.push_screen(ConfirmScreen(f"{what}\n\n{' '.join(found['text'].split())[:200]}"),
                             functools.partial(self._forget_answered, message.chunk_id))

    @shows_errors
    def _forget_answered(self, chunk_id: int, yes: bool | None) -> None:
        if yes:
            memory.delete_chunk(self.app.db, chunk_id)
            self.notify("Forgotten.")
            if self.incognito:   # reopening would close the incognito conversation
                return
            self.open_conversation(self.conversation_id)
            self.refresh_sidebar()

    def action_help(self) -> None:
        """Show every key: the chat's, a focused message's, the prompt's and the app's."""
        self.app.push_screen(HelpScreen([
            ("chat", keys_of(self.BINDINGS)),
            ("a focused message", keys_of(MessageView.BINDINGS)),
            ("prompt", PROMPT_KEYS),
            ("app", [("ctrl+p", "Command palette: every action, Switch model, and Theme (remembered)"),
                     *keys_of(self.app.BINDINGS)]),
        ]))

    def action_learning(self) -> None:
        """Open the Learning screen."""
        from assistant.tui.screens.learning import LearningScreen   # plotext: only when it is opened

        self.app.push_screen(LearningScreen())

    def action_toggle_sidebar(self) -> None:
        sidebar = self.query_one(ConversationList)
        sidebar.display = not sidebar.display


def counted(n: int, word: str) -> str:
    """`1 message`, `3 messages`, `2 memories`."""
    if n == 1:
        return f"1 {word}"
    return f"{n} {word[:-1]}ies" if word.endswith("y") else f"{n} {word}s"
