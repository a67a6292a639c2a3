"""The Flower App `ember federate serve` hands its SuperLink (built into a FAB by `serving.flower_app`):
the same ClientApp and ServerApp the in-process rounds use (`client.client_app`, `server.run_rounds`),
configured from Flower's Context instead of Python arguments.

- ClientApp: each message runs in its own `flwr-clientapp` process under the device's SuperNode, so the
  device (settings, database connection) is built from the SuperNode's `node_config` (`ember-home`,
  `model`, `server`) on every message.
- ServerApp: the household's plan, the number of devices and the server's model come in the run config
  (`household` as JSON, `devices`, `model`, `timeout`); what the run produced is written as JSON to the
  run config's `outcome` path (0600) for `ember federate serve` to report. It addresses only the
  SuperNodes `serve` registered (`nodes`, their node ids): Flower 1.42's Control API lets anyone register
  a SuperNode key, and such a node must not be sampled into the household's rounds.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

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


class HouseholdGrid(Grid):
    """A SuperLink's Grid that shows the ServerApp only the household's registered SuperNodes."""

    def __init__(self, grid: Grid, nodes: Iterable[int]) -> None:
        self.grid, self.nodes = grid, frozenset(nodes)

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Any:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return [node for node in self.grid.get_node_ids() if node in self.nodes]

    def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
        messages = list(messages)
        if any(msg.metadata.dst_node_id not in self.nodes for msg in messages):
            raise ValueError("a message to a SuperNode that is not the household's")
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Iterable[Any]:
        messages = list(messages)
        if any(msg.metadata.dst_node_id not in self.nodes for msg in messages):
            raise ValueError("a message to a SuperNode that is not the household's")
        return self.grid.send_and_receive(messages, timeout=timeout)


def household_nodes(config: Any) -> list[int]:
    """The node ids in the run config's `nodes` (comma-separated, as `serve` registered them)."""
    return [int(part) for part in str(config.get("nodes", "")).split(",") if part.strip()]


client = client_app(device_of)
server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    from adapters.base import write_private

    config = context.run_config
    plan = Household.from_config(json.loads(str(config["household"])))
    outcome = Outcome()
    try:
        run_rounds(HouseholdGrid(grid, household_nodes(config)), plan, Path(str(config["model"])),
                   int(config["devices"]), outcome, timeout=float(config["timeout"]))
        report = {"finished": True, **outcome_json(outcome)}
    except Exception as err:   # the serve command reports it as one line; Flower logs the traceback
        report = {"finished": False, "error": f"{type(err).__name__}: {err}", **outcome_json(outcome)}
        raise
    finally:
        write_private(Path(str(config["outcome"])), json.dumps(report).encode())
