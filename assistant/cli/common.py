"""Options and helpers every command shares."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import click
import sqlite_utils

from assistant.config import Settings, load_settings
from storage import conversations as convs
from storage.db import open_db


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
    db = open_db(settings.home, busy_timeout_ms=settings.busy_timeout_ms)
    convs.recover_interrupted(db)
    return db


def print_json(value: Any) -> None:
    """Print one JSON document."""
    click.echo(json.dumps(value, ensure_ascii=False, indent=2))
