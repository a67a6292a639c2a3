"""`ember federate init|serve|join|status`: household learning's credentials, its server and devices as real
Flower processes, and this device's federated rounds."""
from __future__ import annotations

from pathlib import Path

import click

from assistant.cli.common import json_option, model_option, open_store, print_json, settings_from

DEFAULT_ADDRESS = "127.0.0.1:9092"


@click.group()
def federate() -> None:
    """Household learning on Flower: credentials and this device's federated rounds."""


@federate.command()
@click.option("--address", "addresses", multiple=True, metavar="HOST",
              help="Another name or IP the SuperLink is reached at (127.0.0.1 and localhost always are).")
@model_option
@json_option
def init(addresses, model, as_json):
    """Make this household's TLS certificates, this device's SuperNode key pair and the app-signing key pair
    (files 0600); on a device made before app signing, only the signing pair is added."""
    from assistant.federation import require_flower

    require_flower()
    from assistant.federation.credentials import create

    settings = settings_from(model=model)
    made = create(settings.home, addresses=addresses)
    if as_json:
        return print_json(made)
    for name, path in made.items():
        click.echo(f"{name:14} {path}")
    return None


@federate.command()
@click.option("--address", default=DEFAULT_ADDRESS, show_default=True, metavar="HOST:PORT",
              help="Where the SuperLink listens (loopback unless told otherwise; always TLS).")
@click.option("--kind", type=click.Choice(["fedavg", "fedkseed"]), default="fedavg", show_default=True,
              help="FedAvg over LoRA B tensors, or FedKSeed per-seed zeroth-order sums.")
@click.option("--devices", type=click.IntRange(min=1), default=2, show_default=True,
              help="Devices every round waits for.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True,
              help="Local optimizer steps per round on each device.")
@click.option("--pool-size", type=click.IntRange(min=1), default=1024, show_default=True,
              help="FedKSeed: K, the number of public seeds.")
@click.option("--sigma", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="User-level DP noise multiplier σ (0: none).")
@click.option("--clip", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="User-level DP clipping norm C of each device's update.")
@click.option("--authorized-key", "authorized", multiple=True, required=True, metavar="FILE",
              type=click.Path(path_type=Path),
              help="A device's supernode.pub (repeat for each device); only these may join.")
@click.option("--timeout", type=click.FloatRange(min=1), default=3600.0, show_default=True,
              help="Seconds a round waits for the devices' replies.")
@model_option
@json_option
def serve(address, kind, devices, rounds, steps, pool_size, sigma, clip, authorized, timeout, model, as_json):
    """Run the household's server: Flower's SuperLink (TLS, SuperNode authentication) and ServerApp, running
    the household's Flower App signed with this device's app-signing key."""
    from assistant.federation import require_flower

    require_flower()
    from adapters.base import file_sha256
    from assistant.federation.plan import Household
    from assistant.federation.serving import serve as run_server

    settings = settings_from(model=model)
    plan = Household(kind=kind, base_sha256=file_sha256(settings.model_path, settings.cache_dir),
                     base_name=settings.model_path.name, rounds=rounds, steps=steps, pool_size=pool_size,
                     sigma=sigma, clip=clip)
    result = run_server(settings, plan, address=address, devices=devices, authorized=list(authorized),
                        timeout=timeout, on_event=None if as_json else click.echo)
    if as_json:
        return print_json(result.as_json())
    out = result.outcome
    click.echo(f"run {result.run_id} {result.status}: {result.rounds} {result.kind} round(s), "
               f"{out.get('update_bytes', 0):,}-byte global update, {len(out.get('refused', []))} refused "
               f"repl(ies), {result.seconds:.0f} s")
    for refusal in out.get("refused", []):
        click.echo(f"  round {refusal['round']} node {refusal['node']}: {refusal['reason']}")
    return None


@federate.command()
@click.argument("address", metavar="HOST:PORT")
@click.option("--ca", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="The server's ca.pem (default: this device's own, from `ember federate init`).")
@click.option("--app-signer", "signer", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="The server's app-signing.pub: this device runs only apps it signed (default: this device's own).")
@click.option("--max-wait", type=click.FloatRange(min=1), default=120.0, show_default=True,
              help="Seconds to wait for a SuperLink that went away before giving up.")
@model_option
@json_option
def join(address, ca, signer, max_wait, model, as_json):
    """Run this device in the household's rounds: Flower's SuperNode and Ember's ClientApp."""
    from assistant.federation import require_flower

    require_flower()
    from assistant.federation.joining import join as run_device

    settings = settings_from(model=model)
    result = run_device(settings, open_store(settings), address=address, ca=ca, signer=signer,
                        max_wait=max_wait, on_event=None if as_json else click.echo)
    if as_json:
        return print_json(result.as_json())
    for r in result.rounds:
        detail = f"{r['bytes_sent']:,} B sent" if r["bytes_sent"] else (r["message"] or "")
        click.echo(f"round {r['round']}/{r['rounds']} {r['kind']:8} {r['phase']:8} {r['status']:11} {detail}")
    return None


@federate.command()
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@model_option
@json_option
def status(limit, model, as_json):
    """What this device did in its latest federated rounds: sent, skipped, refused, promoted or kept."""
    from storage import federation

    settings = settings_from(model=model)
    rows = federation.rounds(open_store(settings), limit=limit)
    if as_json:
        return print_json(rows)
    if not rows:
        click.echo("no federated rounds yet")
    for r in rows:
        detail = f"{r['bytes_sent']:,} B sent" if r["bytes_sent"] else (r["message"] or "")
        of = f"/{r['rounds']}" if r.get("rounds") else ""
        click.echo(f"{r['created']}  {r['server']} round {str(r['round']) + of:<5} {r['kind']:8} {r['phase']:8} "
                   f"{r['status']:11} {detail}")
    return None


COMMANDS = [federate]
