"""Training memory follows the model: bf16 where the CPU computes it, and a daemon whose memory check scales
what was measured by the parameter count of the model it would train."""
from __future__ import annotations

import datetime as dt

import pytest

from adapters import base as bases
from assistant import daemon
from assistant.config import Settings
from assistant.daemon import DaemonConfig, ModelSize, Sensors, check, choose_method, memory_need_mb
from benchmarks.synthetic_user import seed_habit_user
from storage import activity, runs
from storage.db import open_db

INTEL = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
OLDER = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


def test_bf16_is_chosen_only_where_the_cpu_computes_it(tmp_path):
    for text, expected in ((INTEL, True), (OLDER, False), (ARM, True), ("", False)):
        recorded = tmp_path / "cpuinfo"
        recorded.write_text(text)
        assert bases.bf16_supported(recorded) is expected
    assert not bases.bf16_supported(tmp_path / "missing")
    assert bases.resolve_dtype("auto") == ("bfloat16" if bases.bf16_supported() else "float32")
    with pytest.raises(ValueError, match="dtype must be one of"):
        bases.resolve_dtype("float16")


def test_a_bf16_base_trains_with_dp_from_a_bf16_copy_of_the_cache(tiny_gguf, tmp_path):
    import torch

    from adapters import dataset, lora
    from adapters.template import ChatTemplate

    model, cache = tiny_gguf("qwen2", "Q8_0"), tmp_path / "cache"
    half = bases.load_base(model, cache, dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    copies = list(cache.glob("base/*/bfloat16/model.safetensors"))
    assert len(copies) == 1 and copies[0].stat().st_mode & 0o777 == 0o600
    assert {p.dtype for p in bases.load_base(model, cache).parameters()} == {torch.float32}   # the cache stays
    db = open_db(tmp_path / "home")
    try:
        seed_habit_user(db, 16)
        data = dataset.build(db, ChatTemplate.from_gguf(str(model)), max_len=64)
    finally:
        db.close()
    trained = lora.train(model, cache, data, lora.LoraConfig(epsilon=8.0, steps=2, batch_size=8, threads=2,
                                                             dtype="bfloat16"))
    assert all(loss == loss for loss in trained.losses)   # finite (an empty Poisson batch would be NaN)
    assert any(float(b.abs().sum()) > 0 for _, b in trained.weights.values())   # B moved off its zero init


class RecordedSensors(Sensors):
    """A quiet, plugged-in machine with a recorded amount of free memory."""

    def __init__(self, free_mb: float):
        self.free = free_mb

    def load(self):
        return 0.05

    def available_mb(self):
        return self.free

    def on_battery(self):
        return False

    def temperature_c(self):
        return 41.0


def _ran(db, run_id, method, params, peak_mb, dtype="float32"):
    runs.start(db, run_id, method=method, steps=1, fingerprint="x")
    runs.update(db, run_id, status="done", peak_rss_mb=peak_mb, base_params=params, dtype=dtype)


def test_the_daemons_memory_check_follows_the_measured_figure_per_parameter_count(tmp_path, tiny_gguf):
    slope = daemon.MB_PER_MILLION_PARAMS["float32"]
    assert slope > 0          # measured by `ember bench train_memory`, not a placeholder
    db = open_db(tmp_path / "home")
    try:
        # Nothing run here yet: the benchmark's figure on SmolLM2, moved by the measured MB per parameter.
        small, big = ModelSize(daemon.BUNDLED_PARAMS), ModelSize(1_500_000_000)
        assert memory_need_mb(db, "lora", small) == daemon.MEASURED_MB["lora"]
        need_big = memory_need_mb(db, "lora", big)
        assert need_big == pytest.approx(daemon.MEASURED_MB["lora"] + slope * (1_500_000_000 - daemon.BUNDLED_PARAMS) / 1e6)
        assert choose_method(db, need_big + 10, [], big)[0] == "lora"
        assert choose_method(db, need_big - 10, [], big)[0] in ("zo-llama", "lora-adaptive")
        assert memory_need_mb(db, "zo-llama", big) == daemon.MEASURED_MB["zo-llama"]   # llama.cpp's own figure
        # A run measured here on a 1.4B model (500 MB above the benchmark's line) is the nearest figure for
        # the 1.5B one.
        peak = daemon.MEASURED_MB["lora"] + slope * (1_400_000_000 - daemon.BUNDLED_PARAMS) / 1e6 + 500
        _ran(db, "lora-1b4", "lora", 1_400_000_000, peak)
        assert memory_need_mb(db, "lora", big) == pytest.approx(peak + slope * 100)
        assert choose_method(db, peak + slope * 100 + 10, [], big)[0] == "lora"
        assert choose_method(db, peak + slope * 100 - 10, [], big)[0] != "lora"
        # bf16 runs are their own figures: no bf16 run here, so the benchmark's bf16 line.
        bf16 = ModelSize(1_500_000_000, "bfloat16")
        assert memory_need_mb(db, "lora", bf16) == pytest.approx(
            daemon.MEASURED_MB["lora"] + daemon.MB_PER_MILLION_PARAMS["bfloat16"] * (1_500_000_000 - daemon.BUNDLED_PARAMS) / 1e6)

        # The real check, on a tiny model the user brought: its size is read from the GGUF.
        model = tiny_gguf("qwen2", "Q8_0")
        settings = Settings(home=tmp_path / "home", model=model)
        seed_habit_user(db, 12)
        later = dt.datetime.fromisoformat(activity.last_seen(db)) + dt.timedelta(minutes=31)
        size = ModelSize.of(model)
        assert size.params == bases.gguf_parameters(model) and size.params < 50_000_000
        need_tiny = memory_need_mb(db, "lora", size)          # the 1.4B run, moved down to the tiny size
        assert need_tiny == pytest.approx(peak - slope * (1_400_000_000 - size.params) / 1e6)
        config = DaemonConfig(min_new_messages=10)
        assert check(db, settings, config, RecordedSensors(need_tiny + 10), later).method == "lora"
        assert check(db, settings, config, RecordedSensors(need_tiny - 10), later).method != "lora"
    finally:
        db.close()


def _ran_file(db, run_id, method, params, size_bytes, peak_mb, dtype="float32"):
    runs.start(db, run_id, method=method, steps=1, fingerprint="x")
    runs.update(db, run_id, status="done", peak_rss_mb=peak_mb, base_params=params, dtype=dtype, base_bytes=size_bytes)


def test_the_memory_slope_is_this_machines_own_once_its_runs_cover_two_model_sizes(tmp_path):
    """Runs here on a 100M and a 400M model (1,000 and 2,200 MB: 4 MB per million parameters) replace the
    benchmark's slope for a 1B model; one size alone, or sizes less than 2x apart, do not."""
    db = open_db(tmp_path / "home")
    try:
        one_b = ModelSize(1_000_000_000)
        assert daemon.memory_slope(db, "lora") == (daemon.MB_PER_MILLION_PARAMS["float32"], False)
        _ran_file(db, "small", "lora", 100_000_000, 60_000_000, 1000.0)
        _ran_file(db, "close", "lora", 150_000_000, 90_000_000, 1400.0)    # 1.5x apart: not yet a line
        assert daemon.memory_slope(db, "lora") == (daemon.MB_PER_MILLION_PARAMS["float32"], False)
        runs.update(db, "close", status="failed")
        _ran_file(db, "large", "lora", 400_000_000, 240_000_000, 2200.0)
        slope, here = daemon.memory_slope(db, "lora")
        assert here and slope == pytest.approx(4.0)
        assert memory_need_mb(db, "lora", one_b) == pytest.approx(2200.0 + 4.0 * 600)
        assert daemon.memory_slope(db, "lora", "bfloat16") == (daemon.MB_PER_MILLION_PARAMS["bfloat16"], False)
        # A line that falls (noise, another load on the machine) is not believed.
        _ran_file(db, "odd", "lora", 800_000_000, 480_000_000, 900.0)
        assert daemon.memory_slope(db, "lora") == (daemon.MB_PER_MILLION_PARAMS["float32"], False)
    finally:
        db.close()


def test_zeroth_order_in_llama_cpp_needs_memory_by_the_size_of_the_model_file(tmp_path):
    """llama.cpp maps the quantized file and reads all of it every pass: a 4 GB model file does not fit in
    1,000 MB free, where the old check took the 370 MB measured on the 98 MB bundled file for any model."""
    db = open_db(tmp_path / "home")
    try:
        bundled = ModelSize(daemon.BUNDLED_PARAMS, bytes=daemon.BUNDLED_BYTES)
        seven_b = ModelSize(7_000_000_000, bytes=4_000_000_000)
        assert memory_need_mb(db, "zo-llama", bundled) == daemon.MEASURED_MB["zo-llama"]
        need = memory_need_mb(db, "zo-llama", seven_b)
        assert need == pytest.approx(daemon.MEASURED_MB["zo-llama"] + (4_000_000_000 - daemon.BUNDLED_BYTES) / 2 ** 20)
        method, reason = choose_method(db, 1000.0, [], seven_b)
        assert method is None and f"needs {need:.0f} MB" in reason
        assert choose_method(db, need + 10, [], seven_b)[0] == "zo-llama"
        assert memory_need_mb(db, "router", seven_b) > 4000     # refitting the router runs the file too
        # Runs measured here on two file sizes: their own line (here 1.5 MB per MB of file), from the nearest.
        _ran_file(db, "zo-small", "zo-llama", 135_000_000, 100 * 2 ** 20, 400.0)
        _ran_file(db, "zo-large", "zo-llama", 1_500_000_000, 1000 * 2 ** 20, 1750.0)
        assert daemon.memory_slope(db, "zo-llama") == (pytest.approx(1.5), True)
        assert memory_need_mb(db, "zo-llama", seven_b) == pytest.approx(1750.0 + 1.5 * (4_000_000_000 / 2 ** 20 - 1000))
        # Without the file's size (a caller that knows only the parameters), the peak measured here, as before.
        assert memory_need_mb(db, "zo-llama", ModelSize(7_000_000_000)) == 1750.0
    finally:
        db.close()
