"""The `ember` command. The CLI is Ember's API: every capability, `--json` for machines.

Commands live in one module per group; errors the user can cause are caught once, here.
Command modules are imported only when their command runs (click's LazyGroup pattern): importing
them all cost 0.3 s on every `ember` call, training code included, before anything was done.
"""
from __future__ import annotations

import importlib
import os
import sys

import click

from assistant import __version__
from assistant.errors import EmberError

# Keys of the root context's `meta`: a command asks to end the process the moment it succeeds
# (`common.leave_at_once`), and what stays referenced until then.
LEAVE_AT_ONCE = "ember.leave_at_once"
KEPT = "ember.kept"

# name -> ("module:attribute", first line of the command's help). `ember --help` lists them from
# here without importing anything; tests/test_startup.py checks each line against its command.
COMMANDS: dict[str, tuple[str, str]] = {
    "ask": ("assistant.cli.ask:ask", "Answer PROMPT (or standard input when PROMPT is '-' or omitted)."),
    "chat": ("assistant.cli.chat:chat", "The chat app: conversations, streamed Markdown replies, search."),
    "history": ("assistant.cli.log:history", "Conversations and their messages."),
    "export": ("assistant.cli.log:export", "Everything the user has, in a portable form."),
    "forget": ("assistant.cli.log:forget",
               "Delete messages for good, and withdraw (taint) the adapters trained on them."),
    "import": ("assistant.cli.importing:import_",
               "Import chat history and notes from other apps into the log and memory."),
    "persona": ("assistant.cli.persona:persona",
                "Personas: named system prompts; a conversation is held with one (`ember ask --persona NAME`)."),
    "memory": ("assistant.cli.memory:memory", "What Ember remembers: your messages and imported notes."),
    "feedback": ("assistant.cli.feedback:feedback", "Rate or edit replies, exclude conversations from learning."),
    "adapt": ("assistant.cli.adapt:adapt",
              "Learn from your log: build the dataset, train, export, evaluate, promote if better."),
    "adapters": ("assistant.cli.adapt:adapters", "The adapter registry: list, use, rollback, remove."),
    "daemon": ("assistant.cli.daemon:daemon", "The idle-time adaptation daemon."),
    "router": ("assistant.cli.router:router",
               "The router that picks memory, the adapter, both or neither for each question."),
    "serve": ("assistant.cli.serve:serve",
              "Serve an OpenAI-compatible API (chat completions, models, embeddings) on this machine."),
    "status": ("assistant.cli.status:status", "Model, active adapter, privacy budget, memory size, daemon state."),
    "compress": ("assistant.cli.compress:compress",
                 "Compress MODEL layer by layer (LUC): a quantisation type per block from its measured sensitivity."),
    "federate": ("assistant.cli.federate:federate",
                 "Household learning on Flower: credentials and this device's federated rounds."),
    "bench": ("assistant.cli.bench:bench", "Run benchmark NAME (omit it to list them)."),
    "doctor": ("assistant.cli.doctor:doctor",
               "What to paste into a bug report: engine build, self-check, model, embedder, data dir."),
}


class EmberGroup(click.Group):
    """Loads each command on first use, and turns every `EmberError` into one line on stderr and a
    non-zero exit, never a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands or name not in COMMANDS:
            return self.commands.get(name)
        module_name, attribute = COMMANDS[name][0].split(":")
        command = getattr(importlib.import_module(module_name), attribute)
        self.add_command(command, name)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # click's own version loads every command for its help line; the table has them already.
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = [(name, (self.commands.get(name) or click.Command(name, help=COMMANDS[name][1]))
                 .get_short_help_str(limit)) for name in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def main(self, args=None, *rest, **extra):
        """Run as the `ember` program (`args` from `sys.argv`, click's standalone mode): a command that
        asked to (`common.leave_at_once`) ends the process here once it succeeded, skipping teardown."""
        as_program = args is None and extra.get("standalone_mode", True)
        try:
            return super().main(args, *rest, **extra)
        except SystemExit as done:
            if as_program and done.code in (0, None) and self._leave_at_once is not None:
                _leave(self._leave_at_once)
            raise

    _leave_at_once: list | None = None

    def invoke(self, ctx: click.Context):
        try:
            done = super().invoke(ctx)
            if ctx.meta.get(LEAVE_AT_ONCE):
                self._leave_at_once = ctx.meta.get(KEPT, [])   # referenced until the process ends
            return done
        except EmberError as err:
            click.echo(f"ember: {err}", err=True)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("ember: interrupted; what was said so far is saved", err=True)
            sys.exit(130)
        except BrokenPipeError:
            # `ember history | head`: the reader left; not an error worth a message.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except Exception as err:  # a bug, not bad input: still one line, with a way to see more
            if os.environ.get("EMBER_DEBUG"):
                raise
            click.echo(f"ember: internal error: {type(err).__name__}: {err} "
                       "(run with EMBER_DEBUG=1 for the traceback)", err=True)
            sys.exit(70)


def _leave(kept: list) -> None:
    """End the process now (exit status 0): close the database, flush, run `atexit`, skip teardown.

    A stream that cannot be flushed (the reader of a pipe left) returns instead, to the usual exit."""
    storage_db = sys.modules.get("storage.db")
    if storage_db is not None:
        storage_db.close_all()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return
    import atexit

    atexit._run_exitfuncs()
    os._exit(0)


@click.group(cls=EmberGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ember")
@click.option("--verbose", is_flag=True, help="Show llama.cpp's own log on stderr (kept out of sight otherwise).")
def main(verbose: bool) -> None:
    """Ember: a private assistant that runs and learns on this device."""
    if verbose:
        from adapters import llama_log

        llama_log.install(verbose=True)
