"""`ember bench`: the benchmarks run end to end and write their JSON where asked."""
from __future__ import annotations

import json

import pytest

from tests.conftest import assert_clean_error


def test_bench_lists_benchmarks_and_refuses_unknown_ones(ember):
    listing = ember("bench").out
    assert all(name in listing for name in ("engine", "memory", "recall", "adapt", "zo"))
    assert_clean_error(ember("bench", "nope"), contains="unknown benchmark")


def test_engine_benchmark_compares_against_bare_llama_cpp(ember, tmp_path, request):
    if not request.config.getoption("--benchmarks"):
        pytest.skip("a benchmark (~5 minutes): run with --benchmarks")
    result = ember("bench", "engine", "--quick", "--rounds", "1", "--output-dir", str(tmp_path), timeout=1200)
    assert result.returncode == 0, result.err
    written = json.loads((tmp_path / "engine.json").read_text())
    assert written["same_output"] is True     # same model, prompt and settings on both sides
    assert written["ember"]["decode_tps_median"] > 0 and written["bare_llama_cpp"]["decode_tps_median"] > 0
    assert written["ratio"]["decode_speed"] > 0 and written["chat_ready_to_type_s"] > 0
    assert written["machine"]["versions"]["llama-cpp-python"]
    everyday = written["everyday"]
    assert {"auto", "base", "bare"} <= set(everyday["whole_process"])
    assert everyday["router_decision"]["with_adapter"]["p50_ms"] > 0
    assert everyday["router_decision"]["with_adapter_typed"]["p50_ms"] > 0
    ahead = everyday["router_decision"]["with_adapter_decided_ahead"]
    assert ahead["p50_ms"] > 0 and ahead["decided_ahead"] == ahead["decisions"]   # every one reused at send
    assert everyday["router_decision"]["with_adapter"]["decided_ahead"] == 0
    for key in ("multi_turn", "multi_turn_typed"):
        assert set(everyday[key]) == {"base", "rag", "adapter", "both", "auto"}
        assert all(len(turns["ttft_s"]) == 10 for turns in everyday[key].values())


def test_serve_benchmark_quick_writes_its_figures_and_loses_nothing(ember, tmp_path):
    result = ember("bench", "serve", "--quick", "--rounds", "1", "--output-dir", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.err
    written = json.loads((tmp_path / "serve.json").read_text())
    resident = written["resident_ask"]
    assert {"resident", "bare", "ratio", "met", "target"} <= set(resident)
    assert resident["answered_by_server"] is True and resident["same_answer"] is True
    assert [level["clients"] for level in written["load"]["levels"]] == [1, 4, 16]
    for level in written["load"]["levels"]:
        assert {"ttft_p50_s", "ttft_p95_s", "tokens_per_second", "rejected", "accepted", "requests"} <= set(level)
        assert level["errors"] == 0 and level["accepted"] + level["rejected"] == level["requests"]
    sixteen = written["load"]["levels"][-1]
    assert sixteen["rejected"] > 0        # 16 at once against a queue of 4: the bound holds
    lost = written["nothing_lost"]
    assert lost["accepted"] == sum(level["accepted"] for level in written["load"]["levels"]) > 0
    assert lost["missing"] == 0 and lost["integrity_ok"] is True and lost["ok"] is True


SPAWNED = """
import importlib.util, multiprocessing, sys

def where(_):
    import benchmarks.layers
    return benchmarks.layers.__file__

if __name__ == "__main__":
    sys.path[0] = sys.argv[1]       # as the `ember` console script starts: its bin folder first, no cwd
    print("first found:", importlib.util.find_spec("benchmarks").origin)
    from assistant.cli.bench import benchmark_module
    module = benchmark_module("layers")
    print("ours:", module.__file__, hasattr(module, "run"))
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        print("spawned:", pool.apply(where, (0,)))
"""


def test_bench_finds_embers_benchmarks_before_another_packages(tmp_path):
    # Opacus 1.6 installs a top-level `benchmarks` package with a `layers` module; run from the console
    # script, `ember bench layers` found that one ("no attribute 'run'"). Here a stand-in of it comes first
    # on the path, as site-packages does, wherever Opacus's wheel is or is not installed.
    import subprocess
    import sys
    from pathlib import Path

    foreign = tmp_path / "site" / "benchmarks"
    foreign.mkdir(parents=True)
    (foreign / "__init__.py").write_text("")
    (foreign / "layers.py").write_text("NOT_EMBERS = True\n")
    script = tmp_path / "check.py"
    script.write_text(SPAWNED)
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "site")], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert lines["first found"] == str(foreign / "__init__.py")       # the stand-in does shadow ours
    assert lines["ours"] == f"{repo / 'benchmarks' / 'layers.py'} True"
    assert lines["spawned"] == str(repo / "benchmarks" / "layers.py")   # the benchmark's own processes too
