"""Options and helpers every command shares."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click

from assistant.cli import KEPT, LEAVE_AT_ONCE
from assistant.config import Settings, load_settings
from assistant.errors import EmberError, InvalidInput

if TYPE_CHECKING:   # sqlite_utils costs 0.2 s to import: `ember ask` with a resident engine never opens the database
    import sqlite_utils


def model_option(fn: Callable) -> Callable:
    """`--model PATH`: any GGUF chat model (default: the bundled SmolLM2-135M-Instruct)."""
    return click.option("--model", "model", type=click.Path(path_type=Path), default=None,
                        help="GGUF chat model to use (default: the bundled SmolLM2-135M-Instruct).")(fn)


def json_option(fn: Callable) -> Callable:
    """`--json`: one JSON document on stdout."""
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")(fn)


def settings_from(**flags: Any) -> Settings:
    """Settings for this run, with command-line flags on top."""
    return load_settings(flags)


def open_store(settings: Settings) -> sqlite_utils.Database:
    """The user's database, with replies orphaned by a killed process marked interrupted."""
    from storage import conversations as convs
    from storage.db import connections

    db = connections(settings.home, busy_timeout_ms=settings.busy_timeout_ms).get("main")
    convs.recover_interrupted(db)
    return db


def leave_at_once(*keep: Any) -> None:
    """End the process as soon as this command returns successfully, without Python's teardown.

    For a command that loads the model to answer once (`ember ask`): freeing the model and tearing
    down each imported module took 75 ms of a 1.4 s answer (2026-11-30, 128 tokens on SmolLM2-135M),
    time in which the user waits for the shell prompt and the operating system would free it all
    anyway. `keep` (the engine) stays referenced until then, so that it is not freed first.
    Only the `ember` program itself leaves early (see `EmberGroup.main`); a caller that runs the
    group in its own process returns from it as usual. The database is closed, the standard streams
    flushed and `atexit` handlers run before the process ends.
    """
    meta = click.get_current_context().meta
    meta[LEAVE_AT_ONCE] = True
    meta.setdefault(KEPT, []).extend(keep)


def print_json(value: Any) -> None:
    """Print one JSON document."""
    click.echo(json.dumps(value, ensure_ascii=False, indent=2))


# Destructive commands (`forget`, `memory remove`, `adapters remove`): count, list, ask, then act.

class NotConfirmed(EmberError):
    """A destructive command went unconfirmed: the user said no, or stdin is not a terminal and --yes
    was not given (a pipe's "y" or "n" is never taken as an answer)."""


def destructive_options(fn: Callable) -> Callable:
    """`--yes` (delete without asking; needed off a terminal) and `--dry-run` (list, delete nothing)."""
    fn = click.option("--dry-run", is_flag=True, help="List what would be deleted, with counts; delete nothing.")(fn)
    return click.option("--yes", is_flag=True,
                        help="Delete without asking (required when stdin is not a terminal).")(fn)


def plural(n: int, word: str, many: str | None = None) -> str:
    """`1 message`, `2 messages`."""
    return f"{n} {word if n == 1 else many or word + 's'}"


@dataclasses.dataclass
class Preview:
    """What a destructive command would delete: `counts` for --json, `summary` (one phrase, with the
    counts) and `lines` (one per item) for people, `items` for `--dry-run --json`."""

    counts: dict[str, Any]
    summary: str
    lines: list[str] = dataclasses.field(default_factory=list)
    items: list[Any] = dataclasses.field(default_factory=list)
    empty: bool = False


SHOWN_BEFORE_ASKING = 10


def confirm_deletion(preview: Preview, *, yes: bool) -> None:
    """Ask on a terminal before deleting; off a terminal refuse unless `yes`. Raises `NotConfirmed`."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise NotConfirmed(f"not deleting {preview.summary}: stdin is not a terminal, so nobody can confirm; "
                           "pass --yes to delete, or --dry-run to list what would go")
    for line in preview.lines[:SHOWN_BEFORE_ASKING]:
        click.echo(f"  {line}", err=True)
    if len(preview.lines) > SHOWN_BEFORE_ASKING:
        click.echo(f"  … and {len(preview.lines) - SHOWN_BEFORE_ASKING} more (--dry-run lists them all)", err=True)
    if not click.confirm(f"Delete {preview.summary}?", default=False, err=True):
        raise NotConfirmed("nothing was deleted")


def carry_out(preview: Preview, act: Callable[[], dict[str, Any]], report: Callable[[dict[str, Any]], str], *,
              yes: bool, dry_run: bool, as_json: bool) -> None:
    """The one path of every destructive command: list (--dry-run), or confirm, act and report.

    `act` deletes and returns the --json document; `report` turns that document into the sentence shown.
    """
    if dry_run:
        if as_json:
            print_json({"dry_run": True, "would_delete": preview.counts, "items": preview.items})
            return
        click.echo(f"Would delete {preview.summary}" + (":" if preview.lines else "."))
        for line in preview.lines:
            click.echo(f"  {line}")
        click.echo("Dry run: nothing was deleted.")
        return
    if preview.empty:
        if as_json:
            print_json({"deleted": preview.counts})
        else:
            click.echo("Nothing to delete.")
        return
    confirm_deletion(preview, yes=yes)
    document = act()
    if as_json:
        print_json(document)
    else:
        click.echo(report(document))


def write_private(output: Path, text: str) -> None:
    """Write `text` to `output`, created mode 0600 (an export or a system prompt may say personal things);
    `InvalidInput` when it cannot be written."""
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        output.chmod(0o600)
    except OSError as err:
        raise InvalidInput(f"cannot write {output}: {err.strerror}") from err
