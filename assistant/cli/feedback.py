"""`ember feedback`: what the user thinks of replies, and which conversations not to learn from."""
from __future__ import annotations

import click

from assistant.cli.ask import read_stdin
from assistant.cli.common import json_option, model_option, open_store, print_json, settings_from
from assistant.errors import InvalidInput
from storage import feedback as store


@click.group()
def feedback() -> None:
    """Rate or edit replies, exclude conversations from learning."""


@feedback.command()
@click.argument("message_id", type=int)
@click.argument("rating", type=click.Choice(store.RATINGS))
@model_option
@json_option
def rate(message_id, rating, model, as_json):
    """Rate reply MESSAGE_ID up or down (clear withdraws the rating)."""
    db = open_store(settings_from(model=model))
    store.rate(db, message_id, rating)
    if as_json:
        return print_json({"message_id": message_id, "rating": None if rating == "clear" else rating})
    click.echo(f"reply {message_id}: " + ("rating cleared" if rating == "clear" else f"rated {rating}"))
    return None


@feedback.command()
@click.argument("message_id", type=int)
@click.argument("text", required=False)
@model_option
@json_option
def edit(message_id, text, model, as_json):
    """Replace reply MESSAGE_ID with TEXT (or standard input): what you wanted it to say."""
    if text is None or text == "-":
        if click.get_text_stream("stdin").isatty():
            raise InvalidInput("no text: pass the corrected reply as an argument or on standard input")
        text = read_stdin()
    db = open_store(settings_from(model=model))
    store.edit(db, message_id, text)
    if as_json:
        return print_json({"message_id": message_id, "edit": text})
    click.echo(f"reply {message_id}: edit kept; adaptation learns from it")
    return None


@feedback.command()
@click.argument("conversation_id", type=int)
@click.option("--undo", is_flag=True, help="Include the conversation in learning again.")
@model_option
@json_option
def exclude(conversation_id, undo, model, as_json):
    """Keep conversation CONVERSATION_ID out of learning (it stays in your log and memory)."""
    db = open_store(settings_from(model=model))
    store.set_excluded(db, conversation_id, not undo)
    if as_json:
        return print_json({"conversation_id": conversation_id, "excluded": not undo})
    click.echo(f"conversation {conversation_id} " + ("is learned from again" if undo else "is excluded from learning"))
    return None


COMMANDS = [feedback]
