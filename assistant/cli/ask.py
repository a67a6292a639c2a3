"""`ember ask`: one answer, streamed to stdout.

With `ember serve` running for the same data directory, the answer comes from its resident engine
over a Unix socket (assistant/resident.py) and this process never loads the model; otherwise it is
answered here. Either way it goes through `conversation.respond` and prints the same things.
"""
from __future__ import annotations

import signal
import sys
from typing import Any

import click

from assistant import resident
from assistant.cli.common import json_option, leave_at_once, model_option, print_json, settings_from
from assistant.config import ROUTES
from assistant.errors import InvalidInput


def read_stdin() -> str:
    """The prompt piped on stdin, strictly UTF-8."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidInput(f"standard input is not valid UTF-8 (byte 0x{data[err.start]:02x} at offset "
                           f"{err.start}); convert it with iconv first") from err


def _raise_interrupt(_signum, _frame):
    raise KeyboardInterrupt


def _show(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _warn(warning: str) -> None:
    click.echo(f"ember: warning: {warning}", err=True)


@click.command()
@click.argument("prompt", required=False)
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Longest reply, in tokens.")
@click.option("--seed", type=int, default=None, help="Sampling seed, for repeatable answers.")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=None,
              help="Sampling temperature; 0 is greedy.")
@click.option("--no-log", is_flag=True, help="Store nothing of this exchange.")
@click.option("--conversation", "conversation_id", type=int, default=None,
              help="Continue this conversation (ids from `ember history`).")
@click.option("--route", type=click.Choice(ROUTES), default=None,
              help="Where the answer comes from (default: the persona's route, else auto: the router "
                   "decides per question).")
@click.option("--persona", default=None,
              help="Ask persona NAME (`ember persona list`; 'none': no persona). Default: the "
                   "conversation's, or for a new one the default persona.")
@click.option("--regenerate", "regenerate", type=int, default=None, metavar="REPLY_ID",
              help="Answer the question of this reply again; the old reply stays as an alternative "
                   "(no PROMPT).")
@click.option("--edit", "instead_of", type=int, default=None, metavar="MESSAGE_ID",
              help="PROMPT replaces your earlier message MESSAGE_ID: a new branch from there; the old "
                   "one stays.")
@click.option("--why", is_flag=True, help="Also say why the router chose the route (on stderr).")
@model_option
@json_option
def ask(prompt, max_tokens, seed, temperature, no_log, conversation_id, route, persona, regenerate, instead_of,
        why, model, as_json):
    """Answer PROMPT (or standard input when PROMPT is '-' or omitted)."""
    if regenerate is not None:
        if prompt is not None:
            raise InvalidInput("--regenerate asks the reply's own question again; give no PROMPT")
    elif prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise InvalidInput("no prompt: pass it as an argument or pipe it on standard input")
        prompt = read_stdin()
    settings = settings_from(model=model)
    signal.signal(signal.SIGTERM, _raise_interrupt)   # a polite kill still marks the reply
    request = {"prompt": prompt or "", "max_tokens": max_tokens, "seed": seed, "temperature": temperature,
               "log": not no_log, "conversation_id": conversation_id, "route": route, "persona": persona,
               "regenerate": regenerate, "instead_of": instead_of}
    try:
        report = resident.ask(settings, request, on_piece=None if as_json else _show, on_warning=_warn)
    except resident.Unavailable:
        report = _answer_here(settings, request, as_json)
    _print(report, as_json, why)
    leave_at_once()


def _answer_here(settings: Any, request: dict[str, Any], as_json: bool) -> dict[str, Any]:
    """Load the model in this process and answer; returns `Exchange.report()`. The engine is kept
    until the process ends (`leave_at_once`): freeing the model first cost ~20 ms."""
    from assistant.cli.common import open_store
    from assistant.conversation import ask_question, respond, sync_adapter
    from assistant.engine import Engine
    from assistant.retrieval import retriever_for

    db = open_store(settings)
    # Log first: the question is committed before the model loads, so no crash or kill can lose it.
    question = ask_question(db, request["prompt"], conversation_id=request["conversation_id"], log=request["log"],
                            persona=request["persona"], regenerate=request["regenerate"],
                            instead_of=request["instead_of"])
    engine = Engine(settings.model_path, n_ctx=settings.n_ctx, n_threads=settings.threads,
                    seed=settings.seed or 0, cache_dir=settings.cache_dir)
    warning = sync_adapter(db, engine)
    if warning:
        _warn(warning)
    leave_at_once(engine)
    exchange = respond(db, engine, settings, question, log=request["log"], retriever=retriever_for(settings, db),
                       route=request["route"], max_tokens=request["max_tokens"],
                       temperature=request["temperature"], seed=request["seed"],
                       on_piece=None if as_json else _show)
    return exchange.report()


def _print(report: dict[str, Any], as_json: bool, why: bool) -> None:
    """What follows the streamed text: the --json document, or the notices, evidence and --why line."""
    if as_json:
        print_json(report["json"])
        return
    sys.stdout.write("\n")
    for notice in report["notices"]:
        click.echo(f"ember: {notice}", err=True)
    for line in report["evidence"]:   # what the answer rests on, quoted, with where to find it
        click.echo(f"  ↳ {line}", err=True)
    if why:
        click.echo(report["why"], err=True)


COMMANDS = [ask]
