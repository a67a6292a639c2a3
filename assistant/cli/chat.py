"""`ember chat`: the Textual chat app."""
from __future__ import annotations

import click

from assistant.cli.common import model_option, settings_from
from assistant.engine import check_gguf
from assistant.errors import ModelInvalid


@click.command()
@click.option("--conversation", "conversation_id", type=int, default=None,
              help="Open this conversation (default: a new one).")
@model_option
def chat(conversation_id, model):
    """The chat app: conversations, streamed Markdown replies, search."""
    settings = settings_from(model=model)
    check_gguf(settings.model_path)   # a bad path fails here, in one line, before the screen opens
    from assistant.tui.app import EmberApp  # Textual loads only for this command

    app = EmberApp(settings, conversation_id=conversation_id)
    app.run()
    if app.engine_error:
        raise ModelInvalid(app.engine_error)


COMMANDS = [chat]
