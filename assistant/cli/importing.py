"""`ember import SOURCE`: chat history and notes from other apps, into the log and memory."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from assistant.cli.common import json_option, model_option, open_store, plural, print_json, settings_from
from assistant.importers import FORMATS, open_export
from assistant.importing import index, merge


class _Bar:
    """The embedding progress bar on stderr (rich, as `ember adapt` draws its own), only on a terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.progress = self.task = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.progress is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]indexing"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                     console=Console(stderr=True), transient=True)
            self.progress.start()
            self.task = self.progress.add_task("index", total=total, rate="")
        elapsed = self.progress.tasks[0].elapsed or 0
        self.progress.update(self.task, completed=done,
                             rate=f"{done / elapsed:.0f} chunks/s" if elapsed > 0.5 and done else "")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _phrase(counts: dict, noun: str) -> str:
    parts = [f"{n} {kind}" for kind, n in counts.items() if n]
    return f"{noun}: " + (", ".join(parts) if parts else "none")


@click.command("import")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="auto", show_default=True,
              help="What SOURCE is (detected from the file or folder by default).")
@click.option("--dry-run", is_flag=True, help="Say what would be added, updated and skipped; write nothing.")
@click.option("--learn", is_flag=True, help="Let adaptation learn from the imported conversations "
                                            "(they are excluded from learning by default).")
@click.option("--skip-bad", is_flag=True, help="Import the good conversations of an export with bad ones.")
@model_option
@json_option
def import_(source, fmt, dry_run, learn, skip_bad, model, as_json):
    """Import chat history and notes from other apps into the log and memory.

    SOURCE: a ChatGPT or Claude export (conversations.json, its folder or zip), llm's logs.db, an Open WebUI
    chat export, an oterm or elia database, a folder of Markdown notes, Ember's memory JSONL or its own
    `ember export`. Imported conversations are excluded from learning unless --learn."""
    export = open_export(source, fmt)
    settings = settings_from(model=model)
    db = open_store(settings)
    carried = None   # Ember's own export carries personas: checked before anything is written
    if export.app == "ember" and export.path.is_file() and export.member == export.path.name:
        from assistant.importers import personas as persona_file

        carried = persona_file.read(export.path)
    result = merge(db, export, learn=learn, dry_run=dry_run, skip_bad=skip_bad)
    if carried:
        result["personas"] = _personas(db, export.path, carried, dry_run)
    if not dry_run:
        from assistant.retrieval import retriever_for

        retriever = retriever_for(settings, db)
        bar = _Bar(not as_json)
        try:
            result["indexed"] = index(db, lambda: retriever.embedder, bar)
        finally:
            bar.close()
    if as_json:
        return print_json(result)
    src = result["source"]
    verb = "Would import" if dry_run else "Imported"
    click.echo(f"{verb} {src['app']} export {export.path.name} (sha256 {src['sha256'][:12]}"
               + (f", import #{src['import_id']}" if src["import_id"] else "") + "):")
    for section in ("conversations", "messages", "notes"):
        if any(result[section].values()):
            click.echo("  " + _phrase(result[section], section))
    if result["skipped"]:
        click.echo("  skipped: " + ", ".join(f"{n} {what}" for what, n in sorted(result["skipped"].items())))
    for problem in result["problems"]:
        click.echo(f"  skipped (bad): {problem}", err=True)
    for warning in result["warnings"]:
        click.echo(f"  note: {warning}", err=True)
    if result.get("personas"):
        said = result["personas"]
        parts = [f"{len(said[k])} {k}" for k in ("added", "unchanged") if said[k]]
        if said["conflicts"]:
            parts.append(f"{len(said['conflicts'])} kept as you have them ({', '.join(said['conflicts'])}: "
                         "`ember persona import FILE --replace` takes the file's)")
        if parts:
            click.echo("  personas: " + ", ".join(parts))
    if result["conversations"]["added"] and not learn:
        click.echo("  New conversations are excluded from learning (pass --learn, or F4 in the chat, to include them).")
    if dry_run:
        click.echo("Dry run: nothing was written.")
    elif result["indexed"]["chunks"]:
        done = result["indexed"]
        click.echo(f"Indexed {plural(done['chunks'], 'memory chunk')} in {done['seconds']:.1f} s"
                   + (f" ({done['per_second']:.0f}/s)." if done["per_second"] else "."))
    return None


def _personas(db, path: Path, items: list, dry_run: bool) -> dict:
    """An Ember export's personas: new ones added (yours kept where a name differs), and the imported
    conversations held with theirs again."""
    from assistant.importers import personas as persona_file
    from storage import personas

    result = personas.merge_personas(db, items, dry_run=dry_run)
    if not dry_run:
        result["conversations_linked"] = personas.link_conversations(db, persona_file.conversation_links(path))
    return result


COMMANDS = [import_]
