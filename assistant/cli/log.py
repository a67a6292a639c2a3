"""`ember history`, `ember export`, `ember forget`: the user's own log, read, carried away, erased."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from assistant.cli.common import json_option, model_option, open_store, print_json, settings_from
from assistant.display import display_time, display_title, one_line
from assistant.errors import InvalidInput
from storage import conversations as convs


@click.command()
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="How many conversations, most recent first.")
@click.option("--conversation", "conversation_id", type=int, default=None,
              help="Show this conversation's messages in full.")
@click.option("--search", "query", default=None, help="Find messages containing these words.")
@model_option
@json_option
def history(limit, conversation_id, query, model, as_json):
    """Conversations and their messages."""
    db = open_store(settings_from(model=model))
    if query is not None:
        hits = convs.search_messages(db, query, limit=limit)
        if as_json:
            return print_json(hits)
        for hit in hits:
            click.echo(f"#{hit['conversation_id']} {display_title(hit['title'])}  "
                       f"[{hit['role']} {hit['message_id']}] {one_line(hit['snippet'])}")
        return None
    chosen = ([convs.get_conversation(db, conversation_id)] if conversation_id is not None
              else convs.list_conversations(db, limit=limit))
    result = [dict(c, messages=convs.messages(db, c["id"])) for c in chosen]
    if as_json:
        return print_json(result)
    if not result:
        click.echo("No conversations yet. Start one with `ember chat` or `ember ask`.")
    for conv in result:
        click.secho(f"#{conv['id']} {display_title(conv['title'])}  ({display_time(conv['updated'])}, "
                    f"{len(conv['messages'])} messages)", bold=True)
        shown = conv["messages"] if conversation_id is not None else conv["messages"][-2:]
        for msg in shown:
            mark = "" if msg["status"] == "complete" else f" [{msg['status']}]"
            text = msg["content"] if conversation_id is not None else one_line(msg["content"])[:100]
            click.echo(f"  {msg['role']:>9} {msg['id']}{mark}: {text}")
    return None


def to_markdown(conversations: list[dict]) -> str:
    """The log as a readable Markdown document."""
    lines = ["# Ember conversations", ""]
    for conv in conversations:
        lines += [f"## {display_title(conv['title'])}", "",
                  f"*Conversation {conv['id']}, started {display_time(conv['created'])}*", ""]
        for msg in conv["messages"]:
            mark = "" if msg["status"] == "complete" else f" ({msg['status']})"
            lines += [f"**{msg['role']}**{mark} — {display_time(msg['created'])}", "", msg["content"], ""]
    return "\n".join(lines)


@click.command()
@click.option("--format", "fmt", type=click.Choice(["json", "md"]), default="json", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write to this file (created private, mode 0600) instead of stdout.")
@model_option
@json_option
def export(fmt, output, model, as_json):
    """Everything the user has, in a portable form."""
    db = open_store(settings_from(model=model))
    conversations = convs.export_all(db)
    if as_json:
        fmt = "json"
    if fmt == "json":
        text = json.dumps({"format": "ember-export", "version": 1,
                           "exported": convs.now(), "conversations": conversations},
                          ensure_ascii=False, indent=2) + "\n"
    else:
        text = to_markdown(conversations)
    if output is None:
        sys.stdout.write(text)
        return
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        output.chmod(0o600)
    except OSError as err:
        raise InvalidInput(f"cannot write {output}: {err.strerror}") from err
    click.echo(f"Exported {len(conversations)} conversations to {output}", err=True)


@click.command()
@click.option("--message", "message_id", type=int, default=None, help="Delete one message.")
@click.option("--conversation", "conversation_id", type=int, default=None, help="Delete a conversation.")
@click.option("--match", "text", default=None, help="Delete every message containing TEXT.")
@click.option("--all", "everything", is_flag=True, help="Delete every conversation.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@model_option
@json_option
def forget(message_id, conversation_id, text, everything, yes, model, as_json):
    """Delete messages for good, and withdraw (taint) the adapters trained on them."""
    chosen = [x for x in (message_id, conversation_id, text, everything or None) if x is not None]
    if len(chosen) != 1:
        raise InvalidInput("say what to forget: exactly one of --message ID, --conversation ID, "
                           "--match TEXT or --all")
    if text is not None and not text.strip():
        raise InvalidInput("--match needs some text")
    settings = settings_from(model=model)
    db = open_store(settings)
    if everything and not yes and sys.stdin.isatty():
        click.confirm("Delete every conversation and message?", abort=True, err=True)
    if message_id is not None:
        counts = convs.forget_message(db, message_id)
    elif conversation_id is not None:
        counts = convs.delete_conversation(db, conversation_id)
    elif text is not None:
        counts = convs.forget_matching(db, text)
    else:
        counts = convs.forget_all(db)
    # A paused adaptation run keeps copies of its examples; one that holds a forgotten message goes too.
    from adapters.pipeline import drop_runs_on_forgotten

    counts["runs_dropped"] = drop_runs_on_forgotten(db, settings.cache_dir)
    if as_json:
        print_json({"deleted": counts})
    else:
        click.echo(f"Forgot {counts['messages']} messages; removed {counts['conversations']} conversations"
                   + (f"; withdrew {counts['adapters_tainted']} adapters trained on them"
                      if counts["adapters_tainted"] else "")
                   + (f"; dropped {counts['runs_dropped']} paused adaptation runs that held them"
                      if counts["runs_dropped"] else "") + ".")


COMMANDS = [history, export, forget]
