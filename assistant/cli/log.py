"""`ember history`, `ember export`, `ember forget`: the user's own log, read, carried away, erased."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from assistant.cli.common import (Preview, carry_out, destructive_options, json_option, model_option, open_store,
                                 plural, print_json, settings_from, write_private)
from assistant.display import display_time, display_title, one_line
from assistant.errors import InvalidInput
from storage import conversations as convs


@click.command()
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="How many conversations, most recent first.")
@click.option("--conversation", "conversation_id", type=int, default=None,
              help="Show this conversation's messages in full.")
@click.option("--search", "query", default=None, help="Find messages containing these words.")
@click.option("--choose", "choose", type=int, default=None, metavar="MESSAGE_ID",
              help="Keep the branch through this message (an alternative reply, or an edit of yours), "
                   "and show its conversation.")
@click.option("--context", "context_of", type=int, default=None, metavar="REPLY_ID",
              help="What the model saw for this reply: tokens of the system prompt, memories, history kept "
                   "and dropped, the question, and the room left (loads the model to count).")
@model_option
@json_option
def history(limit, conversation_id, query, choose, context_of, model, as_json):
    """Conversations and their messages.

    The text shows each conversation's kept branch (a message with alternatives is marked `[2/3]`);
    `--json` gives every message, each with the `parent_id` it follows, `current_id` (where the kept
    branch ends) and `branch` (the kept branch's message ids, oldest first).
    """
    settings = settings_from(model=model)
    db = open_store(settings)
    if context_of is not None:
        return _context(db, settings, context_of, as_json)
    if query is not None:
        hits = convs.search_messages(db, query, limit=limit)
        if as_json:
            return print_json(hits)
        for hit in hits:
            click.echo(f"#{hit['conversation_id']} {display_title(hit['title'])}  "
                       f"[{hit['role']} {hit['message_id']}] {one_line(hit['snippet'])}")
        return None
    if choose is not None:
        convs.choose(db, choose)
        conversation_id = convs.get_message(db, choose)["conversation_id"]
    chosen = ([convs.get_conversation(db, conversation_id)] if conversation_id is not None
              else convs.list_conversations(db, limit=limit))
    result = []
    for c in chosen:
        kept = convs.branch(db, c["id"])
        result.append(dict(c, messages=convs.messages(db, c["id"]), branch=[m["id"] for m in kept],
                           kept=kept))
    if as_json:
        return print_json([{k: v for k, v in conv.items() if k != "kept"} for conv in result])
    if not result:
        click.echo("No conversations yet. Start one with `ember chat` or `ember ask`.")
    for conv in result:
        others = len(conv["messages"]) - len(conv["kept"])
        more = f", {others} on other branches" if others else ""
        click.secho(f"#{conv['id']} {display_title(conv['title'])}  ({display_time(conv['updated'])}, "
                    f"{len(conv['kept'])} messages{more})", bold=True)
        shown = conv["kept"] if conversation_id is not None else conv["kept"][-2:]
        for msg in shown:
            mark = "" if msg["status"] == "complete" else f" [{msg['status']}]"
            if msg["alternatives"] > 1:
                mark += f" [{msg['alternative']}/{msg['alternatives']}]"
            text = msg["content"] if conversation_id is not None else one_line(msg["content"])[:100]
            click.echo(f"  {msg['role']:>9} {msg['id']}{mark}: {text}")
    return None


def _context(db, settings, reply_id: int, as_json: bool) -> None:
    """`ember history --context REPLY_ID`: the reply's context window, by part."""
    from assistant.context_view import of_reply
    from assistant.engine import Engine

    convs.select_message(db, reply_id)   # NotFound before the model loads
    engine = Engine(settings.model_path, n_ctx=settings.n_ctx, n_threads=settings.threads,
                    seed=settings.seed or 0, cache_dir=settings.cache_dir)
    found = of_reply(db, engine, settings, reply_id)
    if as_json:
        return print_json(found.as_json())
    click.echo(f"context of reply {reply_id}: {found.prompt:,} of {found.n_ctx:,} tokens")
    for part in ("system", "memories", "history", "question"):
        extra = f" ({found.history_messages} messages)" if part == "history" else ""
        click.echo(f"  {part:<9} {getattr(found, part):>6,}{extra}")
    used = "" if found.reply is None else f", {found.reply:,} used"
    click.echo(f"  {'reply':<9} {found.free:>6,} left ({found.reserved:,} kept for it{used})")
    if found.dropped_messages:
        click.echo(f"  dropped   {found.dropped_tokens:>6,} ({found.dropped_messages} older messages that no longer fit; "
                   "they are in memory)")
    return None


def kept_branch(conv: dict) -> list[dict]:
    """An exported conversation's kept branch: from `current_id` up by `parent_id`, root first."""
    by_id = {m["id"]: m for m in conv["messages"]}
    path, node = [], conv.get("current_id")
    while node in by_id and len(path) <= len(by_id):
        path.append(by_id[node])
        node = by_id[node].get("parent_id")
    return path[::-1]


def to_markdown(conversations: list[dict]) -> str:
    """The log as a readable Markdown document: each conversation's kept branch."""
    lines = ["# Ember conversations", ""]
    for conv in conversations:
        lines += [f"## {display_title(conv['title'])}", "",
                  f"*Conversation {conv['id']}, started {display_time(conv['created'])}*", ""]
        for msg in kept_branch(conv):
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
        from storage.personas import export_personas

        text = json.dumps({"format": "ember-export", "version": 2, "exported": convs.now(),
                           "personas": export_personas(db), "conversations": conversations},
                          ensure_ascii=False, indent=2) + "\n"
    else:
        text = to_markdown(conversations)
    if output is None:
        sys.stdout.write(text)
        return
    write_private(output, text)
    click.echo(f"Exported {len(conversations)} conversations to {output}", err=True)


def describe(counts: dict[str, int]) -> str:
    """What a forget removes, as a phrase with counts ("3 messages, 1 whole conversation and 3 memories,
    withdrawing 1 adapter trained on them")."""
    parts = [plural(counts["messages"], "message")]
    if counts.get("conversations"):
        parts.append(plural(counts["conversations"], "whole conversation"))
    if counts.get("memories"):
        parts.append(plural(counts["memories"], "memory", "memories"))
    phrase = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
    also = []
    if counts.get("adapters_tainted"):
        also.append(f"withdrawing {plural(counts['adapters_tainted'], 'adapter')} trained on them")
    if counts.get("runs_dropped"):
        also.append(f"dropping {plural(counts['runs_dropped'], 'paused adaptation run')} holding them")
    return phrase + (", " + " and ".join(also) if also else "")


def _line(msg: dict) -> str:
    return (f"#{msg['conversation_id']} {display_title(msg['title'], 40)}  [{msg['role']} {msg['id']}, "
            f"{display_time(msg['created'])}] {one_line(msg['content'])[:80]}")


@click.command()
@click.option("--message", "message_id", type=int, default=None, help="Delete one message.")
@click.option("--conversation", "conversation_id", type=int, default=None, help="Delete a conversation.")
@click.option("--match", "text", default=None,
              help="Delete every exchange (a question and its reply) with a message containing TEXT.")
@click.option("--messages-only", is_flag=True,
              help="With --match: delete only the matching messages, not the rest of their exchanges.")
@click.option("--all", "everything", is_flag=True, help="Delete every conversation.")
@click.option("--source", "source", default=None,
              help="Delete an import whole: an app (chatgpt, claude, …), an import number or an export's "
                   "SHA-256 prefix (`ember status` lists them).")
@destructive_options
@model_option
@json_option
def forget(message_id, conversation_id, text, messages_only, everything, source, yes, dry_run, model, as_json):
    """Delete messages for good, and withdraw (taint) the adapters trained on them.

    Says what it will delete, with counts, and asks first; off a terminal it needs --yes.
    """
    chosen = [x for x in (message_id, conversation_id, text, everything or None, source) if x is not None]
    if len(chosen) != 1:
        raise InvalidInput("say what to forget: exactly one of --message ID, --conversation ID, "
                           "--match TEXT, --source X or --all")
    if text is not None and not text.strip():
        raise InvalidInput("--match needs some text")
    if messages_only and text is None:
        raise InvalidInput("--messages-only goes with --match TEXT")
    settings = settings_from(model=model)
    db = open_store(settings)
    if message_id is not None:
        deletion = convs.select_message(db, message_id)
    elif conversation_id is not None:
        deletion = convs.select_conversation(db, conversation_id)
    elif text is not None:
        deletion = convs.select_matching(db, text, whole_exchanges=not messages_only)
    elif source is not None:
        from storage.imports import select_source

        deletion = select_source(db, source)
    else:
        deletion = convs.select_all(db)
    # A paused adaptation run keeps copies of its examples; one that holds a forgotten message goes too.
    from adapters.pipeline import drop_runs_on_forgotten, runs_holding

    counts = convs.preview(db, deletion)
    counts["runs_dropped"] = len(runs_holding(db, settings.cache_dir, deletion.message_ids))
    matches = convs.selected_messages(db, deletion)
    preview = Preview(counts, describe(counts), [_line(m) for m in matches], matches,
                      empty=not (counts["messages"] or counts["conversations"] or deletion.import_ids))

    def act() -> dict:
        deleted = convs.delete(db, deletion)
        deleted["runs_dropped"] = drop_runs_on_forgotten(db, settings.cache_dir)
        return {"deleted": deleted}

    carry_out(preview, act, lambda done: f"Forgot {describe(done['deleted'])}.",
              yes=yes, dry_run=dry_run, as_json=as_json)


COMMANDS = [history, export, forget]
