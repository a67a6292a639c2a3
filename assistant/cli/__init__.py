"""The `ember` command. The CLI is Ember's API: every capability, `--json` for machines.

Commands live in one module per group; errors the user can cause are caught once, here.
"""
from __future__ import annotations

import os
import sys

import click

from assistant import __version__
from assistant.errors import EmberError


class EmberGroup(click.Group):
    """Turns every `EmberError` into one line on stderr and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
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


@click.group(cls=EmberGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ember")
def main() -> None:
    """Ember: a private assistant that runs and learns on this device."""


def _register() -> None:
    from assistant.cli import adapt, ask, bench, chat, daemon, feedback, log, memory, router, status

    for module in (ask, chat, log, memory, feedback, adapt, daemon, router, status, bench):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
