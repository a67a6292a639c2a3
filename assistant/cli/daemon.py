"""`ember daemon run|status|install`: the idle-time adaptation daemon."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import click

from assistant.cli.common import json_option, model_option, open_store, print_json, settings_from
from storage import activity, ledger, runs

UNIT = """[Unit]
Description=Ember idle-time adaptation daemon (learns while you are away)

[Service]
Type=simple
ExecStart={ember} daemon run
Environment=EMBER_HOME={home}
Nice=10
IOSchedulingClass=idle
Restart=on-failure
RestartSec=60

[Install]
WantedBy=default.target
"""


@click.group()
def daemon() -> None:
    """The idle-time adaptation daemon."""


@daemon.command()
@model_option
def run(model):
    """Run in the foreground (what systemd starts): adapt whenever the user is away."""
    from assistant.daemon import Daemon, DaemonConfig, lower_priority, single_instance

    settings = settings_from(model=model)
    open_store(settings)
    config = DaemonConfig.from_settings(settings)
    with single_instance(settings.home):
        lower_priority()
        click.echo(f"ember daemon: watching {settings.home} (adapts after {config.idle_minutes:g} idle "
                   f"minutes; log in {settings.home / 'daemon.jsonl'})", err=True)
        Daemon(settings, config).serve()


@daemon.command()
@model_option
@json_option
def status(model, as_json):
    """State, last run, next check, when the user will count as away, temperature, privacy budget left."""
    settings = settings_from(model=model)
    db = open_store(settings)
    report = daemon_report(settings, db)
    from assistant.thermal import read

    # Read now, as the daemon's next check will: which source it is matters on a Jetson (jetson-stats
    # needs its socket mounted and the package installed; without them the sysfs zones stand in).
    temperature = read()
    report["temperature"] = temperature.as_json()
    if as_json:
        return print_json(report)
    click.echo(f"state       {report['state']}" + (f" ({report['reason']})" if report.get("reason") else ""))
    click.echo(f"last run    {report.get('last_run') or 'never'}"
               + (f": {report['last_result']}" if report.get("last_result") else ""))
    click.echo(f"next check  {report.get('next_check') or '–'}")
    if report.get("eligible_at"):
        click.echo(f"idle from   {report['eligible_at']} (if the user stays away)")
    click.echo(f"temperature {temperature.describe()}")
    click.echo(f"budget      ε {report['epsilon_left']:.2f} left of {settings.privacy_budget:g}")
    click.echo("needs       " + ", ".join(f"{m} {mb:.0f} MB" for m, mb in report["memory_need_mb"].items()))
    click.echo("learns      " + ", ".join(f"{m} {r['nats_per_minute']:.3f} nats/min held-out "
                                          f"({'measured here' if r['measured'] else 'benchmark'})"
                                          for m, r in report["gain_per_minute"].items()))
    return None


def daemon_report(settings, db) -> dict:
    """The daemon's state as `ember daemon status` and `ember status` show it."""
    report = activity.daemon(db)
    report["epsilon_left"] = max(0.0, settings.privacy_budget - ledger.spent(db)["epsilon"])
    running = runs.current(db)
    report["adapting"] = None if running is None else {"run": running["id"], "step": running["step"],
                                                        "steps": running["steps"]}
    from assistant.daemon import (MEASURED_GAIN_PER_MINUTE, MEASURED_MB, _model_size, gain_per_minute,
                                  memory_need_mb, memory_slope, method_dtype)

    # What each method's run needs and learns per minute (measured here when it has run here, else by
    # the benchmarks; memory for this model's size): the figures the daemon chooses by.
    size = _model_size(settings)
    report["memory_need_mb"] = {method: memory_need_mb(db, method, size) for method in MEASURED_MB}
    # How each need moves with the model's size (MB per million parameters for torch, per MB of GGUF file
    # for llama.cpp), and whether that line was measured on this machine's runs.
    report["memory_slope"] = {method: dict(zip(("mb_per_unit", "measured"),
                                               memory_slope(db, method, method_dtype(method, size))))
                              for method in MEASURED_MB}
    report["gain_per_minute"] = {method: dict(zip(("nats_per_minute", "measured"), gain_per_minute(db, method)))
                                 for method in MEASURED_GAIN_PER_MINUTE}
    return report


@daemon.command()
@click.option("--print", "just_print", is_flag=True, help="Print the unit instead of writing it.")
@model_option
def install(just_print, model):
    """Install a systemd user unit that runs the daemon (Linux); see packaging/README.md for macOS."""
    settings = settings_from(model=model)
    ember = shutil.which("ember") or f"{sys.executable} -m assistant"
    unit = UNIT.format(ember=ember, home=settings.home)
    if just_print:
        click.echo(unit, nl=False)
        return
    target = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "systemd/user/ember-daemon.service"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(unit)
    click.echo(f"wrote {target}\nstart it with:  systemctl --user daemon-reload && "
               "systemctl --user enable --now ember-daemon")


COMMANDS = [daemon]
