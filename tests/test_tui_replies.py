"""How the chat shows the end of a reply and the model's troubles (issues 14 §2, §5, §6 and 15 §4):
replies cut at the token limit or empty, old messages that no longer fit, a GGUF without a chat
template, a template that raises, titles that would break the sidebar, and what a delete deletes."""
from __future__ import annotations

import dataclasses

import pytest
from textual.widgets import Label

from assistant.display import display_title
from assistant.engine import Engine
from assistant.tui.app import EmberApp
from assistant.tui.screens.chat import ChatScreen
from assistant.tui.screens.modals import ConfirmScreen
from assistant.tui.widgets.conversation_list import ConversationItem
from assistant.tui.widgets.message import DroppedNote, MessageView
from assistant.tui.widgets.prompt import PromptInput
from assistant.tui.widgets.status_line import StatusLine
from storage import conversations as convs
from storage import memory
from tests.conftest import N_CTX
from tests.tui_helpers import gguf_with_template, seed_conversations, type_text, wait_until

SIZE = (120, 40)
# Mistral's and Llama 2's templates refuse a conversation whose roles do not alternate, with an error
# raised from inside the template: a real way for a chat template to fail on one conversation.
ALTERNATING = (
    "{% for message in messages %}"
    "{% if loop.index0 > 0 and message['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def odd_models(model_path, tmp_path_factory):
    """Copies of the bundled model: one without a chat template, one whose template can raise."""
    folder = tmp_path_factory.mktemp("odd-models")
    return {"no-template": gguf_with_template(model_path, folder / "no-template.gguf", None),
            "alternating": gguf_with_template(model_path, folder / "alternating.gguf", ALTERNATING)}


@pytest.fixture(scope="module")
def engine_of(odd_models):
    loaded: dict[str, Engine] = {}

    def load(name: str) -> Engine:
        if name not in loaded:
            loaded[name] = Engine(odd_models[name], n_ctx=N_CTX, n_threads=2, seed=0)
        return loaded[name]

    yield load
    for engine in loaded.values():
        engine.close()


def header(view: MessageView) -> str:
    return str(view.query_one(".message-header").render())


async def send(pilot, text: str) -> None:
    await type_text(pilot, text)
    await pilot.press("enter")
    prompt = pilot.app.screen.query_one(PromptInput)
    await wait_until(pilot, lambda: not prompt.submit_pending, timeout=10)
    await wait_until(pilot, lambda: not pilot.app.screen.generating)


async def test_a_reply_cut_at_the_token_limit_is_marked_and_stored_as_length(settings, engine, db):
    app = EmberApp(dataclasses.replace(settings, max_tokens=3), engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3", "f3")           # memory off: the base model, no router
        await send(pilot, "Write a long story about a dragon who collects teapots.")
        reply = app.screen.query(MessageView)[-1]
        assert reply.status == "length" and "token limit" in header(reply) and reply.has_class("partial")
        assert convs.messages(db, app.screen.conversation_id)[-1]["status"] == "length"
        assert "reply length" in str(app.screen.query_one(StatusLine).render())


async def test_stored_length_and_empty_replies_are_marked_when_reopened(settings, engine, db):
    cid = convs.create_conversation(db)
    convs.add_message(db, cid, "user", "Say nothing.")
    convs.add_message(db, cid, "assistant", "", status="empty")
    convs.add_message(db, cid, "user", "Count to a thousand.")
    convs.add_message(db, cid, "assistant", "1, 2, 3, 4", status="length")
    app = EmberApp(settings, engine=engine, conversation_id=cid)
    async with app.run_test(size=SIZE):
        views = app.screen.query(MessageView)
        assert "empty reply" in header(views[1]) and "token limit" in header(views[3])
        assert "complete" not in header(views[3]) and views[1].has_class("partial")


async def test_old_messages_that_no_longer_fit_are_noted_above_the_reply(settings, engine, db):
    cid = convs.create_conversation(db)
    for i in range(8):
        convs.add_message(db, cid, "user", f"Note {i}: " + "the quick brown fox jumps over the lazy dog " * 30)
        convs.add_message(db, cid, "assistant", f"Noted, number {i}.")
    app = EmberApp(dataclasses.replace(settings, max_tokens=8), engine=engine, conversation_id=cid)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3", "f3")           # memory off: the conversation alone fills the context
        await send(pilot, "What was note 0 about?")
        log = list(app.screen.query_one("#log").children)
        note, reply = log[-2], log[-1]
        assert isinstance(note, DroppedNote) and isinstance(reply, MessageView) and reply.role == "assistant"
        assert log[-3].role == "user" and log[-3].content == "What was note 0 about?"
        assert 0 < note.dropped < 16 and note.dropped % 2 == 0      # whole exchanges, oldest first
        assert str(note.render()).endswith(f"{note.dropped} earlier messages no longer fit; they are in memory")


async def test_a_model_without_a_chat_template_is_said_once_in_the_status_line(settings, engine_of):
    engine = engine_of("no-template")
    assert engine.template_fallback
    app = EmberApp(dataclasses.replace(settings, max_tokens=4), engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        status = app.screen.query_one(StatusLine)
        assert "no-template.gguf has no chat template" in str(status.render())
        await pilot.press("f3", "f3")
        await send(pilot, "Hello")
        assert status.notice is None and "chat template" not in str(status.render())
        app.screen.model_ready()                # the model reported again: nothing new to say
        assert status.notice is None


async def test_a_chat_template_that_raises_is_one_line_and_the_message_stays_stored(settings, engine_of, db):
    cid = convs.create_conversation(db)
    convs.add_message(db, cid, "user", "Tell me about tides.")   # its reply was lost: two user turns follow
    app = EmberApp(settings, engine=engine_of("alternating"), conversation_id=cid)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3", "f3")           # memory off: the template is the only thing in the way
        await send(pilot, "And the moon?")
        assert app.is_running and isinstance(app.screen, ChatScreen)
        views = app.screen.query(MessageView)
        assert [v.content for v in views[:2]] == ["Tell me about tides.", "And the moon?"]
        reply = views[-1]
        assert reply.status == "failed" and reply.has_class("failed")
        assert "not answered" in header(reply) and "Conversation roles must alternate" in header(reply)
        errors = [n.message for n in app._notifications if n.severity == "error"]
        assert len(errors) == 1 and "\n" not in errors[0] and "chat template" in errors[0]
        assert app.screen.query_one(PromptInput).text == ""           # stored, so not put back
        rows = convs.messages(db, cid)
        assert [(r["role"], r["content"]) for r in rows if r["role"] == "user"] == [
            ("user", "Tell me about tides."), ("user", "And the moon?")]
        assert not [r for r in rows if r["status"] == "generating"]
        await pilot.press("f5")                 # no reply to rate: feedback says so, nothing breaks
        assert db["feedback"].count == 0


async def test_titles_that_are_empty_or_hold_control_characters_are_shown_cleanly(settings, engine, db):
    picnic, pancakes = seed_conversations(db)
    db["conversations"].update(picnic, {"title": "\x1b[2J\x1b[31mred\x07\nalert\u202e"})
    db["conversations"].update(pancakes, {"title": ""})
    app = EmberApp(settings, engine=engine, conversation_id=picnic)
    async with app.run_test(size=SIZE) as pilot:
        labels = {i.conversation_id: str(i.query_one(Label).render()) for i in app.screen.query(ConversationItem)}
        assert labels == {picnic: display_title("\x1b[2J\x1b[31mred\x07\nalert\u202e"), pancakes: "Untitled"}
        assert "red alert" in labels[picnic] and not any(ch in labels[picnic] for ch in "\x1b\x07\n\u202e")
        await pilot.pause()
        assert [item.region.height for item in app.screen.query(ConversationItem)] == [1, 1]
        assert str(app.screen.query_one("#conversation-title").render()) == labels[picnic]
        await pilot.press("ctrl+f")
        await type_text(pilot, "pancakes")
        await pilot.pause()
        hit = app.screen.query_one("#search-results").get_option_at_index(0)
        assert str(hit.prompt).startswith("Untitled — user:")


async def test_deleting_a_conversation_says_what_it_deletes_with_counts(settings, engine, db):
    picnic, pancakes = seed_conversations(db)
    memory.sync_messages(db)                    # their messages are memories too
    app = EmberApp(settings, engine=engine, conversation_id=picnic)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f8")
        assert isinstance(app.screen, ConfirmScreen)
        assert app.screen.question == ("Delete “Ideas for a picnic in the park”?\n\n"
                                       "This deletes 2 messages and 2 memories made from them.")
        await pilot.press("y")
        await pilot.pause()
        assert [c["id"] for c in convs.list_conversations(db)] == [pancakes]
        assert any(n.message == "Deleted “Ideas for a picnic in the park”: 2 messages, 2 memories."
                   for n in app._notifications)
