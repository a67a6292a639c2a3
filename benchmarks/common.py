"""What every benchmark result records: when, on what machine, with which versions."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil


def machine() -> dict[str, Any]:
    """The machine and software versions a result was measured on."""
    versions = {}
    for dist in ("ember-assistant", "llama-cpp-python", "textual", "sqlite-utils", "torch", "transformers",
                 "peft", "opacus"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "platform": platform.platform(), "processor": platform.machine(),
        "cpus_logical": os.cpu_count(), "cpus_physical": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2 ** 30, 1),
        "python": platform.python_version(), "versions": versions,
    }


def write_result(out_dir: Path, name: str, result: dict[str, Any]) -> Path:
    """Write `result` (with machine and time added) to `out_dir/name.json`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    document = {"benchmark": name, "measured": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "machine": machine(), **result}
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return path
