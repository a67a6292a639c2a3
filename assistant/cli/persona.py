"""`ember persona`: named system prompts (with a default route and temperature), one of them the default."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from assistant.cli.ask import read_stdin
from assistant.cli.common import (Preview, carry_out, destructive_options, json_option, model_option, open_store,
                                  plural, print_json, settings_from, write_private)
from assistant.display import one_line
from assistant.errors import InvalidInput
from storage import personas


@click.group()
def persona() -> None:
    """Personas: named system prompts; a conversation is held with one (`ember ask --persona NAME`).

    `export` and `import` carry them to a file and back (`ember export` includes them too)."""


def _line(p: dict[str, Any]) -> str:
    extras = [f"route {p['route']}" if p["route"] else "", "" if p["temperature"] is None
              else f"temperature {p['temperature']:g}", plural(p["conversations"], "conversation")]
    return (f"{'*' if p['default'] else ' '} {p['name']}  ({', '.join(e for e in extras if e)})  "
            f"{one_line(p['system_prompt'])[:60]}")


@persona.command("list")
@model_option
@json_option
def list_(model, as_json):
    """Every persona; * marks the default."""
    rows = personas.list_personas(open_store(settings_from(model=model)))
    if as_json:
        return print_json(rows)
    if not rows:
        click.echo("no personas yet; `ember persona add NAME PROMPT` adds one")
    for row in rows:
        click.echo(_line(row))
    return None


@persona.command()
@click.argument("name")
@click.argument("prompt", required=False)
@click.option("--route", type=click.Choice(personas.ROUTES), default=None,
              help="The route its conversations take unless a request names one (default: auto).")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=None,
              help="Its sampling temperature (default: the configured one).")
@click.option("--default", "make_default", is_flag=True, help="Also make it the default for new conversations.")
@click.option("--replace", is_flag=True, help="Overwrite a persona of the same name.")
@model_option
@json_option
def add(name, prompt, route, temperature, make_default, replace, model, as_json):
    """Add persona NAME with system prompt PROMPT (or standard input when PROMPT is '-' or omitted)."""
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise InvalidInput("no system prompt: pass it as an argument or pipe it on standard input")
        prompt = read_stdin()
    db = open_store(settings_from(model=model))
    row = personas.add_persona(db, name, prompt, route=route, temperature=temperature,
                               default=make_default, replace=replace)
    if as_json:
        return print_json(row)
    click.echo(f"persona {row['name']} saved" + (", the default for new conversations" if row["default"] else ""))
    return None


@persona.command()
@click.argument("name")
@model_option
@json_option
def show(name, model, as_json):
    """Persona NAME: its system prompt, route, temperature, and how many conversations use it."""
    row = personas.get_persona(open_store(settings_from(model=model)), name)
    if as_json:
        return print_json(row)
    click.echo(f"name         {row['name']}{'  (default)' if row['default'] else ''}")
    click.echo(f"route        {row['route'] or 'auto (not set)'}")
    click.echo(f"temperature  {'configured (not set)' if row['temperature'] is None else format(row['temperature'], 'g')}")
    click.echo(f"used by      {plural(row['conversations'], 'conversation')}")
    click.echo("system prompt:")
    click.echo(row["system_prompt"])
    return None


@persona.command()
@click.argument("name")
@destructive_options
@model_option
@json_option
def remove(name, yes, dry_run, model, as_json):
    """Delete persona NAME; its conversations keep their messages and go on without one. Asks first."""
    db = open_store(settings_from(model=model))
    found = personas.preview_remove(db, name)
    held = found["conversations"]
    summary = (f"1 persona, {found['name']}" + (" (the default)" if found["default"] else "")
               + (f"; {plural(held, 'conversation')} held with it keep{'s' if held == 1 else ''} "
                  f"{'its' if held == 1 else 'their'} messages and go on without a persona" if held else ""))
    counts = {"personas": 1, "conversations": found["conversations"], "default": found["default"]}
    preview = Preview(counts, summary, [_line(personas.get_persona(db, name))], [found])

    def act() -> dict:
        done = personas.remove_persona(db, name)
        return {"removed": done["name"], "deleted": counts}

    carry_out(preview, act, lambda done: f"removed persona {done['removed']}",
              yes=yes, dry_run=dry_run, as_json=as_json)


@persona.command()
@click.argument("name", required=False)
@model_option
@json_option
def default(name, model, as_json):
    """Show the default persona, or make NAME the default for new conversations ('none': no default)."""
    db = open_store(settings_from(model=model))
    row = personas.default_persona(db) if name is None else personas.set_default(db, name)
    if as_json:
        return print_json({"default": row["name"] if row else None})
    click.echo(f"default persona: {row['name']}" if row else "no default persona")
    return None


@persona.command("export")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write to this file (created private, mode 0600) instead of stdout.")
@model_option
@json_option
def export_(output, model, as_json):
    """Every persona as JSON (`ember persona import` reads it back, on this device or another)."""
    import json

    from assistant.importers import personas as persona_file
    from storage.conversations import now

    rows = personas.export_personas(open_store(settings_from(model=model)))
    text = json.dumps(persona_file.document(rows, now()), ensure_ascii=False, indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
        return
    write_private(output, text)
    click.echo(f"Exported {plural(len(rows), 'persona')} to {output}", err=True)


@persona.command("import")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--replace", is_flag=True,
              help="Overwrite personas of the same name that differ (and take the file's default).")
@click.option("--dry-run", is_flag=True, help="Say what would be added and replaced; write nothing.")
@model_option
@json_option
def import_(source, replace, dry_run, model, as_json):
    """Add the personas of SOURCE: a file `ember persona export` wrote, or an `ember export` JSON.

    A persona of the same name that differs is kept as it is unless --replace. Nothing is written when
    any persona in the file is bad."""
    from assistant.importers import personas as persona_file

    items = persona_file.read(source)
    result = personas.merge_personas(open_store(settings_from(model=model)), items, replace=replace,
                                     dry_run=dry_run)
    result["dry_run"] = dry_run
    if as_json:
        return print_json(result)
    verb = "would be " if dry_run else ""
    for key in ("added", "replaced", "unchanged"):
        if result[key]:
            click.echo(f"{key.capitalize() if not dry_run else 'Would be ' + key}: {', '.join(result[key])}")
    for name in result["conflicts"]:
        click.echo(f"kept yours: {name} (the file's differs; --replace takes it)", err=True)
    if result["default"]:
        click.echo(f"default persona {verb}now: {result['default']}")
    if not any(result[k] for k in ("added", "replaced", "unchanged", "conflicts")):
        click.echo(f"{source} holds no personas")
    if dry_run:
        click.echo("Dry run: nothing was written.")
    return None


COMMANDS = [persona]
