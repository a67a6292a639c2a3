"""The Flower App `ember federate serve` hands its SuperLink (built into a FAB by `serving.flower_app`):
the same ClientApp and ServerApp the in-process rounds use (`client.client_app`, `server.run_rounds`),
configured from Flower's Context instead of Python arguments.

- ClientApp: each message runs in its own `flwr-clientapp` process under the device's SuperNode, so the
  device (settings, database connection) is built from the SuperNode's `node_config` (`ember-home`,
  `model`, `server`) on every message.
- ServerApp: the household's plan, the number of devices and the server's model come in the run config
  (`household` as JSON, `devices`, `model`, `timeout`); what the run produced is written as JSON to the
  run config's `outcome` path (0600) for `ember federate serve` to report.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from assistant.config import load_settings
from assistant.federation.client import Device, client_app
from assistant.federation.plan import Household
from assistant.federation.server import Outcome, run_rounds


def device_of(context: Context) -> Device:
    """This SuperNode's device: its data directory and model from the SuperNode's node config."""
    from storage.db import connections

    node = context.node_config
    environ = {**os.environ, "EMBER_HOME": str(node["ember-home"])}
    settings = load_settings({"model": node.get("model") or None}, environ=environ)
    db = connections(settings.home, busy_timeout_ms=settings.busy_timeout_ms).get("main")
    return Device(settings, db, server=str(node.get("server") or "household"))


def outcome_json(outcome: Outcome) -> dict[str, Any]:
    """What `ember federate serve --json` reports of a run (no tensors: their names and bytes)."""
    def rounds(metrics: dict[int, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {str(r): {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in m.items()}
                for r, m in metrics.items()}

    return {"update_bytes": sum(int(a.nbytes) for a in (outcome.arrays or {}).values()),
            "tensors": len(outcome.arrays or {}), "train": rounds(outcome.train_metrics),
            "evaluate": rounds(outcome.evaluate_metrics),
            "refused": [{"round": r, "node": str(n), "reason": why} for r, n, why in outcome.refused],
            "epsilon": outcome.epsilon, "delta": outcome.delta}


client = client_app(device_of)
server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    from adapters.base import write_private

    config = context.run_config
    plan = Household.from_config(json.loads(str(config["household"])))
    outcome = Outcome()
    try:
        run_rounds(grid, plan, Path(str(config["model"])), int(config["devices"]), outcome,
                   timeout=float(config["timeout"]))
        report = {"finished": True, **outcome_json(outcome)}
    except Exception as err:   # the serve command reports it as one line; Flower logs the traceback
        report = {"finished": False, "error": f"{type(err).__name__}: {err}", **outcome_json(outcome)}
        raise
    finally:
        write_private(Path(str(config["outcome"])), json.dumps(report).encode())
