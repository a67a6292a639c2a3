"""`ember chat`: the Textual chat app."""
from __future__ import annotations

import click

from assistant.cli.common import model_option, settings_from
from assistant.engine import check_gguf
from assistant.errors import InvalidInput, ModelInvalid


@click.command()
@click.option("--conversation", "conversation_id", type=int, default=None,
              help="Open this conversation (default: a new one).")
@click.option("--incognito", is_flag=True,
              help="Start with a conversation saved nowhere (not the log, memory, learning or the router's log).")
@model_option
def chat(conversation_id, incognito, model):
    """The chat app: conversations, streamed Markdown replies, search."""
    if incognito and conversation_id is not None:
        raise InvalidInput("--incognito starts a new conversation saved nowhere; it cannot open --conversation")
    settings = settings_from(model=model)
    check_gguf(settings.model_path)   # a bad path fails here, in one line, before the screen opens
    from assistant.tui.app import EmberApp  # Textual loads only for this command

    app = EmberApp(settings, conversation_id=conversation_id, incognito=incognito)
    app.run()
    if app.engine_error:
        raise ModelInvalid(app.engine_error)


COMMANDS = [chat]
