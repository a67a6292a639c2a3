"""`ember federate init|status`: household learning's credentials and this device's federated rounds."""
from __future__ import annotations

import click

from assistant.cli.common import json_option, model_option, open_store, print_json, settings_from


@click.group()
def federate() -> None:
    """Household learning on Flower: credentials and this device's federated rounds."""


@federate.command()
@click.option("--address", "addresses", multiple=True, metavar="HOST",
              help="Another name or IP the SuperLink is reached at (127.0.0.1 and localhost always are).")
@model_option
@json_option
def init(addresses, model, as_json):
    """Make this household's TLS certificates and this device's SuperNode key pair (files 0600)."""
    from assistant.federation import require_flower

    require_flower()
    from assistant.federation.credentials import create

    settings = settings_from(model=model)
    made = create(settings.home, addresses=addresses)
    if as_json:
        return print_json(made)
    for name, path in made.items():
        click.echo(f"{name:14} {path}")
    return None


@federate.command()
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@model_option
@json_option
def status(limit, model, as_json):
    """What this device did in its latest federated rounds: sent, skipped, refused, promoted or kept."""
    from storage import federation

    settings = settings_from(model=model)
    rows = federation.rounds(open_store(settings), limit=limit)
    if as_json:
        return print_json(rows)
    if not rows:
        click.echo("no federated rounds yet")
    for r in rows:
        detail = f"{r['bytes_sent']:,} B sent" if r["bytes_sent"] else (r["message"] or "")
        click.echo(f"{r['created']}  {r['server']} round {r['round']:<3} {r['kind']:8} {r['phase']:8} "
                   f"{r['status']:11} {detail}")
    return None


COMMANDS = [federate]
