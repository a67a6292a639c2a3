"""OpenMP's wait policy, set by Ember before llama.cpp loads (assistant/__init__.py, adapters/__init__.py).

Sleeping at every barrier (PASSIVE alone) made a decode alone on 2 cores 3.5x slower than a bare
llama-cpp-python script; GNU OpenMP's default spin made two decodes at once ~100x slower. Ember spins
300 rounds, then sleeps; the speeds are measured in `ember bench engine`, never timed here."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PRINT = ("import os, json, {module}; "
         "print(json.dumps({{k: os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')}}))")


def _env_after_import(module: str, **preset: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(preset)
    out = subprocess.run([sys.executable, "-c", PRINT.format(module=module)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("module", ["assistant", "adapters"])
def test_a_short_spin_then_sleep_is_set_before_llama_cpp_loads(module):
    assert _env_after_import(module) == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "300"}


@pytest.mark.parametrize("preset", [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "0"}])
def test_the_users_own_setting_wins(preset):
    # GOMP_SPINCOUNT would override a user's OMP_WAIT_POLICY, so neither is added to either.
    seen = _env_after_import("assistant", **preset)
    assert {k: v for k, v in seen.items() if v is not None} == preset

