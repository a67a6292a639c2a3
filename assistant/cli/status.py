"""`ember status`: what Ember is running on and what it holds, without loading the model."""
from __future__ import annotations

import click

from assistant import __version__
from assistant.cli.common import json_option, model_option, open_store, print_json, settings_from
from assistant.cli.daemon import daemon_report
from assistant.engine import check_gguf
from storage import imports, ledger, memory, registry, routing, runs
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
    active = registry.active(db)
    spent = ledger.spent(db)
    running = runs.current(db)
    report = {
        "version": __version__,
        "model": {"path": str(path), "name": path.stem, "bytes": path.stat().st_size,
                  "n_ctx": settings.n_ctx, "threads": settings.threads},
        "adapter": None if active is None else {
            "id": active["id"], "method": active["method"], "epsilon": active["epsilon"],
            "created": active["created"], "heldout_loss": active["eval"].get("heldout_loss")},
        "adapters": {"total": db["adapters"].count, "tainted": registry.tainted_count(db)},
        "data_dir": str(settings.home),
        "database": {"path": str(settings.db_path), "bytes": settings.db_path.stat().st_size,
                     "schema_version": current_version(db),
                     "conversations": db["conversations"].count, "messages": db["messages"].count},
        "privacy": {"epsilon_spent": spent["epsilon"], "epsilon_budget": settings.privacy_budget,
                    "epsilon_left": max(0.0, settings.privacy_budget - spent["epsilon"]),
                    "delta_spent": spent["delta"], "dp_runs": spent["dp_runs"],
                    "non_dp_runs": spent["non_dp_runs"]},
        "adapting": None if running is None else {
            k: running[k] for k in ("id", "method", "step", "steps", "loss", "epsilon_spent", "eta_seconds")},
        "memory": memory.stats(db),
        "imports": {"by_app": imports.by_app(db), "sources": imports.sources(db)},
        "daemon": daemon_report(settings, db),
        "router": _router_report(db),
    }
    if as_json:
        return print_json(report)
    db_info = report["database"]
    privacy = report["privacy"]
    adapter = ("none" if active is None else
               f"{active['id']} ({active['method']}, "
               + ("no DP" if active["epsilon"] is None else f"ε={active['epsilon']:g}") + ")")
    privacy_line = (f"ε spent {privacy['epsilon_spent']:.2f} of {privacy['epsilon_budget']:g}, "
                    f"{privacy['epsilon_left']:.2f} left ({privacy['dp_runs']} DP runs"
                    + (f", {privacy['non_dp_runs']} WITHOUT DP" if privacy["non_dp_runs"] else "") + ")")
    if running is not None:
        privacy_line += (f"\nadapting  step {running['step']}/{running['steps']}"
                         + (f", loss {running['loss']:.3f}" if running["loss"] is not None else ""))
    click.echo(f"model     {path.name} ({path.stat().st_size / 1e6:.0f} MB, context {settings.n_ctx}, "
               f"{settings.threads} threads)\n"
               f"adapter   {adapter}\n"
               f"data      {settings.home}\n"
               f"log       {db_info['conversations']} conversations, {db_info['messages']} messages "
               f"(schema v{db_info['schema_version']})\n"
               f"privacy   {privacy_line}\n"
               f"memory    {report['memory']['chunks']} chunks ({report['memory']['embedded']} embedded)\n"
               + _imports_line(report["imports"]) +
               f"daemon    {report['daemon']['state']}"
               + (f" ({report['daemon']['reason']})" if report["daemon"].get("reason") else "")
               + "\nrouter    " + (f"fitted {report['router']['fitted']} on {report['router']['items']} replies"
                                    if report["router"]["fitted"] else "default thresholds (not fitted yet)")
               + "; " + (", ".join(f"{n} {r}" for r, n in report["router"]["decisions"].items())
                         or "no decisions yet"))
    return None


def _imports_line(report: dict) -> str:
    """How much came from where, one app after another ("" when nothing was imported)."""
    if not report["sources"]:
        return ""
    parts = []
    for app, n in report["by_app"].items():
        held = [f"{n[k]} {k}" for k in ("conversations", "messages", "notes") if n[k]]
        parts.append(f"{app} ({', '.join(held) or 'nothing left'}; {n['imports']} import{'s' if n['imports'] != 1 else ''})")
    ids = ", ".join(f"#{s['id']} {s['app']} {s['sha256'][:8]}" for s in report["sources"][-5:])
    cut_short = [f"#{s['id']} ({s['file']})" for s in report["sources"] if not s["complete"]]
    return (f"imported  {'; '.join(parts)} [{ids}]\n"
            + (f"          incomplete: {', '.join(cut_short)} (still importing, or cut short: "
               "then run the same `ember import` again)\n"
               if cut_short else ""))


def _router_report(db) -> dict:
    """When the router was fitted, on how many replies, and how it has routed so far."""
    policy = routing.current_policy(db)
    return {"fitted": policy["created"] if policy else None, "items": policy["items"] if policy else 0,
            "decisions": routing.decision_counts(db)}


COMMANDS = [status]
