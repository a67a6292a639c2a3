"""Household learning: federated rounds across one household's devices on Flower (flwr), the field's
engine. `client.py` is the device's ClientApp (local training through `assistant.adaptation.run`, the one
learning path; its gate decides whether the household's global update goes live); `server.py` is the
ServerApp (FedAvg over LoRA B, or FedKSeed pool sums, with Flower's user-level DP wrappers and RDP
accountant); `grid.py` drives both in one process, without Ray; `serving.py` and `joining.py` run them as
Flower's own processes (`ember federate serve|join`), loading them from `deployed.py`.

Flower is an optional extra (`pip install -e '.[federated]'`); it is imported only here.
"""
from __future__ import annotations

import os

# These devices cannot install anything at run time; Flower must not try (it would reach the network).
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
# Nor send telemetry or check for updates (flwr/supercore/telemetry.py, update_check.py): no network calls.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

KINDS = ("fedavg", "fedkseed")


def require_flower() -> None:
    """Flower, or one line saying how to install it."""
    from adapters.errors import TrainingUnavailable

    try:
        import flwr  # noqa: F401
    except ImportError as err:
        raise TrainingUnavailable("household learning needs Flower: pip install -e '.[federated]'") from err
