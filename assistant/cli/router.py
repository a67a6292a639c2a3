"""`ember router show|fit`: the per-request router's policy, its decisions, and fitting it on the log."""
from __future__ import annotations

import click

from assistant.cli.common import json_option, model_option, open_store, print_json, settings_from
from storage import routing


@click.group()
def router() -> None:
    """The router that picks memory, the adapter, both or neither for each question."""


@router.command()
@model_option
@json_option
def show(model, as_json):
    """The thresholds in use, when they were fitted, and how past replies were routed."""
    from assistant.router import encode_thresholds, thresholds_in_use

    settings = settings_from(model=model)
    db = open_store(settings)
    thresholds, policy_id = thresholds_in_use(db)
    policy = routing.current_policy(db)
    document = {"policy_id": policy_id, "fitted": policy["created"] if policy else None,
                "items": policy["items"] if policy else 0, "adapter_id": policy["adapter_id"] if policy else None,
                "thresholds": encode_thresholds(thresholds), "decisions": routing.decision_counts(db),
                "report": policy["report"] if policy else None}
    if as_json:
        return print_json(document)
    click.echo(f"policy    {'fitted ' + document['fitted'] + ' on ' + str(document['items']) + ' replies' if policy else 'defaults (not fitted yet)'}")
    for kind, rule in document["thresholds"].items():
        click.echo(f"{kind:9} memory when best note ≥ {rule['min_similarity']}; "
                   f"adapter when probe gain ≥ {rule['min_adapter_gain']} nats")
    counts = document["decisions"]
    click.echo("decisions " + (", ".join(f"{n} {route}" for route, n in counts.items()) if counts else "none yet"))
    return None


@router.command()
@model_option
@json_option
def fit(model, as_json):
    """Fit the thresholds now on the replies you rated up or edited (the daemon does it when idle)."""
    from assistant.router import fit_from_log

    settings = settings_from(model=model)
    db = open_store(settings)
    result = fit_from_log(db, settings)
    if as_json:
        return print_json(result)
    report = result["report"]
    click.echo(f"fitted on {result['items']} replies (policy {result['policy_id']}); mean log-prob of the "
               f"wanted answer: router {report['router_quality']:.3f}, "
               + ", ".join(f"{r} {q:.3f}" for r, q in report["mean_quality"].items()))
    return None


COMMANDS = [router]
