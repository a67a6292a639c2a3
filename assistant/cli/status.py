"""`ember status`: what Ember is running on and what it holds, without loading the model."""
from __future__ import annotations

import click

from assistant import __version__
from assistant.cli.common import json_option, model_option, open_store, print_json, settings_from
from assistant.engine import check_gguf
from storage import memory
from storage.migrations import current_version


@click.command()
@model_option
@json_option
def status(model, as_json):
    """Model, active adapter, privacy budget, memory size, daemon state."""
    settings = settings_from(model=model)
    path = settings.model_path
    check_gguf(path)
    db = open_store(settings)
    memory.sync_messages(db)
    report = {
        "version": __version__,
        "model": {"path": str(path), "name": path.stem, "bytes": path.stat().st_size,
                  "n_ctx": settings.n_ctx, "threads": settings.threads},
        "adapter": None,
        "data_dir": str(settings.home),
        "database": {"path": str(settings.db_path), "bytes": settings.db_path.stat().st_size,
                     "schema_version": current_version(db),
                     "conversations": db["conversations"].count, "messages": db["messages"].count},
        # Adaptation and the daemon arrive in later versions; report their honest state now.
        "privacy": {"epsilon_spent": 0.0, "epsilon_budget": None, "epsilon_left": None},
        "memory": memory.stats(db),
        "daemon": {"state": "not installed"},
    }
    if as_json:
        return print_json(report)
    db_info = report["database"]
    click.echo(f"model     {path.name} ({path.stat().st_size / 1e6:.0f} MB, context {settings.n_ctx}, "
               f"{settings.threads} threads)\n"
               f"adapter   none\n"
               f"data      {settings.home}\n"
               f"log       {db_info['conversations']} conversations, {db_info['messages']} messages "
               f"(schema v{db_info['schema_version']})\n"
               f"privacy   no adaptation run yet: ε spent 0\n"
               f"memory    {report['memory']['chunks']} chunks ({report['memory']['embedded']} embedded)\n"
               f"daemon    not installed")
    return None


COMMANDS = [status]
