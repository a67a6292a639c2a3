"""`ember adapt` (train, export, gate, promote) and `ember adapters` (the registry).

Argument parsing and printing only: the work is `assistant.adaptation`'s, which the daemon calls too.
"""
from __future__ import annotations

import signal
import sys
from typing import Any

import click

from adapters.dataset import FACTS_SKIPPED
from assistant import adaptation
from assistant.cli.common import (Preview, carry_out, destructive_options, json_option, model_option, open_store,
                                 plural, print_json, settings_from)
from storage import registry


def _raise_interrupt(_signum, _frame):
    raise KeyboardInterrupt


class ProgressBar:
    """Steps, loss, ε spent so far and ETA on stderr (rich; plain lines when stderr is not a terminal)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("[bold]adapting"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TextColumn("ε {task.fields[eps]}"),
                                 TimeRemainingColumn(), console=self.console, transient=False)
        self.task: Any = None
        self.last_line = 0

    def stage(self, text: str) -> None:
        """A pipeline stage starts."""
        self.console.print(f"[dim]·[/dim] {text}", highlight=False)

    def step(self, p: Any) -> None:
        """One training step finished."""
        loss = "–" if p.loss != p.loss else f"{p.loss:.3f}"
        eps = "no DP" if p.epsilon is None else f"{p.epsilon:.2f}"
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("adapt", total=p.steps, loss=loss, eps=eps)
        self.progress.update(self.task, completed=p.step, loss=loss, eps=eps)
        if not self.console.is_terminal and (p.step - self.last_line >= max(1, p.steps // 10)
                                             or p.step == p.steps):
            self.last_line = p.step
            click.echo(f"step {p.step}/{p.steps} loss {loss} ε {eps} eta {p.eta_seconds:.0f}s", err=True)

    def close(self) -> None:
        """Stop drawing."""
        if self.task is not None:
            self.progress.stop()


@click.command()
@click.option("--method", type=click.Choice(adaptation.METHODS), default="lora", show_default=True,
              help="lora: DP-SGD on LoRA (torch); zo: zeroth-order, forward passes only.")
@click.option("--backend", type=click.Choice(adaptation.BACKENDS), default=None,
              help="With --method zo: llama (a control vector in llama.cpp, no torch, inference memory; "
                   "the default) or torch (LoRA on the dequantized model).")
@click.option("--layers", type=click.Choice(adaptation.LAYERS), default=None,
              help="With --method lora: top (the top layers only, the default) or adaptive (EDGE-LLM: an "
                   "exit every --exit-stride layers, LoRA trained in a window that moves shallow to deep).")
@click.option("--exit-stride", "exit_stride", metavar="N", default=None,
              help="With --layers adaptive: an exit every N layers, the last at the model's last layer "
                   "(default: adapt_exit_stride in config.toml, 6).")
@click.option("--window", default=None, metavar="N",
              help="With --method zo in llama.cpp: train only the top N layers' control vectors; the layers "
                   "below run once per example (default: zo_window in config.toml, 8; 0: every layer).")
@click.option("--epsilon", type=float, default=None,
              help="Privacy budget of this run (default: adapt_epsilon in config.toml, 8).")
@click.option("--no-dp", is_flag=True, help="Train WITHOUT differential privacy (no guarantee).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps (default: 8 epochs).")
@click.option("--dry-run", is_flag=True, help="Build the dataset and plan the run; train nothing.")
@model_option
@json_option
def adapt(method, backend, layers, exit_stride, window, epsilon, no_dp, steps, dry_run, model, as_json):
    """Learn from your log: build the dataset, train, export, evaluate, promote if better."""
    settings = settings_from(model=model)
    flags = {"method": method, "epsilon": epsilon, "no_dp": no_dp, "steps": steps, "dry_run": dry_run,
             "backend": backend, "layers": layers,
             "exit_stride": exit_stride,   # a string, parsed by adaptation: a bad value is one line, not a usage page
             "window": window}             # the same
    adaptation.config_for(settings, **flags)   # bad flags fail before the database is touched
    db = open_store(settings)
    signal.signal(signal.SIGTERM, _raise_interrupt)   # a polite kill keeps the checkpoint
    bar = None if as_json else ProgressBar()
    try:
        result = adaptation.run(settings, db, **flags, on_step=bar.step if bar else None,
                                on_stage=bar.stage if bar else lambda text: click.echo(f"· {text}", err=True))
    except KeyboardInterrupt:
        click.echo("ember: adaptation interrupted; `ember adapt` resumes it from its last checkpoint",
                   err=True)
        sys.exit(130)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        return print_json(result)
    _describe(result)
    return None


def _describe(result: dict[str, Any]) -> None:
    privacy = (f"DP ε={result['epsilon']:g}, δ={result['delta']:.1e}, σ={result['sigma']:.3f}, "
               f"C={result['clip']:g}, q={result['sample_rate']:.3f}" if result["dp"]
               else "WITHOUT differential privacy")
    click.echo(f"dataset   {result['examples']} training, {result['heldout']} held-out examples "
               f"({', '.join(f'{v} {k}' for k, v in result['kinds'].items())}); "
               f"redacted {sum(result['redactions'].values())} items")
    kept = result["skipped"].get(FACTS_SKIPPED)
    if kept:
        click.echo(f"memory    {kept} personal fact sentences stay in memory only (not trained on)")
    click.echo(f"privacy   {privacy}; {result['steps']} steps; budget left before this run "
               f"ε={max(0.0, result['budget_left']):.2f}")
    if result.get("window"):
        click.echo(f"layers    the top {result['window']} layers' control vectors; the layers below ran once "
                   "per example")
    if result.get("windows"):
        click.echo("windows   " + ", ".join(f"layers {w['first']}-{w['exit']} ({plural(w['steps'], 'step')})"
                                            for w in result["windows"]) + ", each with the loss at its last layer")
    if result.get("dry_run"):
        click.echo("dry run   nothing trained")
        return
    if result.get("paused"):
        click.echo("paused    the run resumes from its checkpoint next time")
        return
    ev = result["eval"]
    click.echo(f"eval      held-out loss {ev['heldout_loss']:.3f} vs base {ev['base_loss']:.3f}"
               + (f", current {ev['current_loss']:.3f}" if ev["current_loss"] is not None else ""))
    if ev.get("surprise") is not None and ev.get("base_surprise") is not None:
        click.echo(f"general   the base model reads its replies to {len(ev['behaviour'])} general requests at "
                   f"{ev['surprise']:.2f} nats/token, its own at {ev['base_surprise']:.2f} "
                   f"({ev['surprise'] - ev['base_surprise']:+.2f}; at most +{ev['max_surprise']:g})")
    verdict = "promoted, now in use" if result["promoted"] else f"not promoted: {ev['reason']}"
    click.echo(f"adapter   {result['adapter_id']} {verdict}")


@click.group()
def adapters() -> None:
    """The adapter registry: list, use, rollback, remove."""


def _row(a: dict[str, Any]) -> dict[str, Any]:
    return {"id": a["id"], "path": a["path"], "method": a["method"], "epsilon": a["epsilon"],
            "created": a["created"], "active": a["status"] == "active", "tainted": a["status"] == "tainted",
            "status": a["status"], "reason": a["reason"], "delta": a["delta"], "examples": a["examples"],
            "eval": a["eval"]}


@adapters.command("list")
@model_option
@json_option
def list_(model, as_json):
    """Every adapter, newest first."""
    db = open_store(settings_from(model=model))
    rows = [_row(a) for a in registry.list_adapters(db)]
    if as_json:
        return print_json(rows)
    if not rows:
        click.echo("no adapters yet; `ember adapt` trains one")
    for r in rows:
        eps = "no DP" if r["epsilon"] is None else f"ε={r['epsilon']:g}"
        loss = r["eval"].get("heldout_loss")
        click.echo(f"{'*' if r['active'] else ' '} {r['id']}  {r['method']:4}  {eps:7}  {r['status']:8}  "
                   f"{'' if loss is None else f'held-out loss {loss:.3f}'}"
                   f"{'  (' + r['reason'] + ')' if r['reason'] else ''}")
    return None


@adapters.command()
@click.argument("adapter_id")
@model_option
@json_option
def use(adapter_id, model, as_json):
    """Use adapter ADAPTER_ID from now on (the running chat switches to it)."""
    settings = settings_from(model=model)
    row = _row(adaptation.use_adapter(settings, open_store(settings), adapter_id))
    if as_json:
        return print_json(row)
    click.echo(f"now using {adapter_id}")
    return None


@adapters.command()
@model_option
@json_option
def rollback(model, as_json):
    """Stop using the active adapter and go back to the one before (or the base model)."""
    db = open_store(settings_from(model=model))
    now_active = registry.rollback(db)
    if as_json:
        return print_json({"active": now_active["id"] if now_active else None})
    click.echo(f"now using {now_active['id']}" if now_active else "now using the base model (no adapter)")
    return None


@adapters.command()
@click.argument("adapter_id")
@destructive_options
@model_option
@json_option
def remove(adapter_id, yes, dry_run, model, as_json):
    """Delete adapter ADAPTER_ID and its file; asks first."""
    db = open_store(settings_from(model=model))
    found = registry.preview_remove(db, adapter_id)
    summary = (f"1 adapter, {adapter_id} ({found['status']}), with its file and the record of the "
               f"{plural(found['sources'], 'message')} it learned from (the messages stay)"
               + ("; it is in use, so the chat goes back to the base model" if found["active"] else ""))
    counts = {"adapters": 1, "active": found["active"], "sources": found["sources"]}
    preview = Preview(counts, summary, [f"{adapter_id}  {found['status']}  {found['path']}"], [found])

    def act() -> dict:
        row = adaptation.remove_adapter(db, adapter_id)
        return {"removed": adapter_id, "was_active": row["status"] == "active", "deleted": counts}

    carry_out(preview, act, lambda done: f"removed {adapter_id}" + (
        " (it was in use; now the base model)" if done["was_active"] else ""),
        yes=yes, dry_run=dry_run, as_json=as_json)


COMMANDS = [adapt, adapters]
