"""The idle-time adaptation daemon: learns while the user is away, yields the moment they return.

Every `check_seconds` an APScheduler job asks `check()` whether now is a good time: the user has been
idle for `idle_minutes` (no message, no chat opened), the CPU is quiet, memory is free for the method,
the machine is on mains power (battery devices) and cool (where sensors exist), inside the nightly
window if one is set, with enough new messages since the last adapter and privacy budget left. If so it
runs `ember adapt`'s pipeline at low priority, with LoRA when the memory its runs need is free and with
zeroth-order training in llama.cpp (inference memory) otherwise; after every training step the run asks whether the user
came back and, if so, checkpoints and pauses within a step (about a second). The next idle window
resumes it from that checkpoint. With nothing to train (too few new messages, or the privacy budget
spent), idle time goes to refitting the router's thresholds on the replies the user rated up or edited
(assistant/router.py), when enough new ones have come in or the adapter changed. Sensors are the only
part tests replace.

The daemon and `ember serve` share the machine by one rule (assistant/ownership.py): a request in
flight at the server (logged or not, `ember ask` through it included) counts as the user being here,
so no run starts while one is answered and a run in progress pauses after its current step; and the
server's engine waits for that step to end before it replies, so the two never compute at once.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable

from assistant import ownership
from assistant.config import Settings
from assistant.errors import EmberError, InvalidInput
from storage import activity, ledger, runs
from storage.db import connections

LOG_NAME = "daemon.jsonl"
# A whole `ember adapt --layers adaptive` run (DP ε=8, batch 32, 40 steps, gate included) on the synthetic
# habit user of 100 conversations peaked at 2,384 MB (2026-11-30, the loaded 2-core machine), and at
# 2,190 MB with the last window taking 3/4 of the steps (2026-12-01, quiet): the higher figure is kept.
ADAPTIVE_MB = 2390.0
# Peak RSS of each method's run on the default model, used until this machine has finished runs of its
# own to go by: LoRA 1,942 MB (`ember bench adapt`, DP run), torch ZO 1,457 MB (`ember bench zo`), and a
# whole `ember adapt --method zo` run in llama.cpp, gate included, 361 MB. LoRA learns most per minute;
# ZO in llama.cpp needs no more than the chat itself. Refitting the router (`ember router fit` on 100
# judged replies: the chat model, a scoring instance and the embedder) peaked at 1,114 MB.
MEASURED_MB = {"lora": 1950.0, "zo-torch": 1460.0, "zo-llama": 370.0, "router": 1120.0,
               "lora-adaptive": ADAPTIVE_MB}
# Those figures were measured on the bundled SmolLM2-135M (134,515,008 parameters). For another model the
# torch methods' need moves by the measured MB per million parameters of a LoRA run (`ember bench
# train_memory`, 2026-11-30 05:09 on the loaded 2-core machine: a line through tiny Llama-3-shaped GGUFs of
# 2.9, 10.5 and 39.9 M parameters and SmolLM2's 134.5 M, DP LoRA runs of batch 8; float32: 586 MB + 4.54 MB
# per million parameters, bfloat16: 570 MB + 2.84).
BUNDLED_PARAMS = 134_515_008
MB_PER_MILLION_PARAMS = {"float32": 4.54, "bfloat16": 2.84}
TORCH_METHODS = ("lora", "lora-adaptive", "zo-torch")
# llama.cpp's methods run the quantized file itself, mapped, and every forward pass reads all of its weights:
# their memory follows the file's size (a Q4 and an F16 file of one model differ 4x). Measured: one model's
# F32, F16 and Q8_0 files (152, 76 and 40 MB) ran at 210, 134 and 98 MB resident, 0.999 MB per MB of file
# (benchmarks/llama_file_memory.py, 2026-11-30 15:54). The llama.cpp figures above were measured on the
# bundled file (SmolLM2-135M Q4_1, these bytes).
BUNDLED_BYTES = 98_362_432
LLAMA_METHODS = ("zo-llama", "router")
MB_PER_FILE_MB = 1.0
# Runs on this machine replace those slopes once they cover model sizes at least this far apart (a line
# through sizes closer than 2x is mostly noise).
MIN_SPREAD = 2.0
# Held-out loss gained per minute of training (nats/min), until this machine has finished runs of its
# own: `ember bench zo`, each method 90 s without DP on the synthetic user (benchmarks/results/zo.json).
# Adaptive layers: top-N LoRA's figure times their ratio of held-out gain at an equal budget in `ember bench
# layers` (2026-12-01 04:37-04:55, mean of 5 seeds, 48.3 s each: 3.730 → 0.609 against 3.730 → 0.588,
# 0.993); the daemon runs it when it does better here.
# zo-llama (the window, batches of 4): 3.730 → 2.894 in 90 s, 0.56 nats/min (bench zo's own `curve` for
# its `llama_zo_window` arm alone, 2026-11-30 19:25-19:29 UTC, not a whole `ember bench zo`; was 0.018 before
# the window).
MEASURED_GAIN_PER_MINUTE = {"lora": 2.19, "zo-llama": 0.56, "lora-adaptive": 2.17}


@dataclasses.dataclass(frozen=True)
class DaemonConfig:
    """When adaptation may start."""

    idle_minutes: float = 30.0
    check_seconds: float = 60.0
    max_load: float = 0.5              # 1-minute load average per core
    min_new_messages: int = 20         # since the newest adapter
    router_min_new: int = 10           # replies rated up or edited since the router was last fitted
    nightly: tuple[int, int] | None = None   # (start hour, end hour), local time; None: any time
    max_temperature_c: float = 80.0
    require_mains: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> "DaemonConfig":
        """The daemon's part of the user's settings."""
        nightly = None
        if settings.daemon_nightly:
            try:
                start, end = (int(h) for h in settings.daemon_nightly.split("-"))
            except ValueError as err:
                raise InvalidInput(f"daemon_nightly must look like \"1-6\" (hours), not "
                                   f"{settings.daemon_nightly!r}") from err
            nightly = (start, end)
        return cls(idle_minutes=settings.daemon_idle_minutes, check_seconds=settings.daemon_check_seconds,
                   min_new_messages=settings.daemon_min_new_messages, nightly=nightly,
                   max_load=settings.daemon_max_load)


class Sensors:
    """The machine's signals, through psutil; temperature from jetson-stats, sysfs or psutil (assistant/thermal.py)."""

    def load(self) -> float:
        """1-minute load average per logical core."""
        import psutil

        return psutil.getloadavg()[0] / (psutil.cpu_count() or 1)

    def available_mb(self) -> float:
        """Memory available without swapping."""
        import psutil

        return psutil.virtual_memory().available / 2 ** 20

    def on_battery(self) -> bool:
        """True only on a battery-powered machine that is unplugged (desktops have no battery)."""
        import psutil

        battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
        return battery is not None and not battery.power_plugged

    def temperature_c(self) -> float | None:
        """The hottest sensor's reading, or None where there are no sensors."""
        from assistant.thermal import read

        return read().celsius


@dataclasses.dataclass
class Decision:
    """Whether to adapt now, and why (or why not)."""

    start: bool
    reason: str
    method: str | None = None
    eligible_at: dt.datetime | None = None   # when the idle condition will hold, if that is what waits


def _parse(stamp: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(stamp) if stamp else None


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """The model a run would train: its parameter count and the dtype torch would hold it in."""

    params: int
    dtype: str = "float32"
    bytes: int = 0                 # the GGUF file's size (0: not known; llama.cpp's methods then go unscaled)

    @classmethod
    def of(cls, model_path: Path, dtype: str = "float32") -> "ModelSize":
        """The size of a GGUF model (read once per file version: llama.cpp maps it, ~0.1-1 s)."""
        from adapters.base import gguf_parameters

        return cls(gguf_parameters(Path(model_path)), dtype, Path(model_path).stat().st_size)


def method_dtype(method: str, model: ModelSize | None) -> str:
    """The dtype a run of `method` holds `model`'s base in: LoRA's is the model's (bf16 where it pays,
    `adapters.base.resolve_dtype`); adaptive layers and ZO in torch keep float32, llama.cpp the file."""
    return model.dtype if model is not None and method == "lora" else "float32"


def memory_need_mb(db: Any, method: str, model: ModelSize | None = None) -> float:
    """Peak memory (MB) a run of this method needs for `model`, from what was measured.

    Torch methods scale by the model's parameters in its dtype, llama.cpp's (ZO in llama.cpp, refitting
    the router) by its GGUF file's size. The figure is the peak of this machine's finished run on the
    nearest size, moved along `memory_slope` to this model's size; without such runs, a run from before
    sizes were recorded at its peak as it was, else the benchmark's figure (measured on SmolLM2) moved the
    same way. Without `model`: the highest peak of this method's runs here, else the benchmark's figure."""
    if model is None or (method in LLAMA_METHODS and not model.bytes):
        return runs.peak_rss_mb(db, method) or MEASURED_MB[method]
    torch_method = method in TORCH_METHODS
    size = model.params if torch_method else model.bytes
    dtype = method_dtype(method, model)
    slope, _ = memory_slope(db, method, dtype)
    sized = runs.peaks_by_size(db, method, dtype, by="base_params" if torch_method else "base_bytes")
    if sized:
        nearest, peak = min(sized, key=lambda row: abs(row[0] - size))
        return max(peak + slope * (size - nearest) / _unit(method), 0.0)
    legacy = runs.peak_rss_mb(db, method, unsized=True, by="base_params" if torch_method else "base_bytes")
    if legacy:
        return legacy
    reference = BUNDLED_PARAMS if torch_method else BUNDLED_BYTES
    return max(MEASURED_MB[method] + slope * (size - reference) / _unit(method), 0.0)


def _unit(method: str) -> float:
    # torch: MB per million parameters; llama.cpp: MB per MB of file
    return 1e6 if method in TORCH_METHODS else 2 ** 20


def memory_slope(db: Any, method: str, dtype: str = "float32") -> tuple[float, bool]:
    """(MB of peak memory per million parameters for a torch method, per MB of GGUF file for a llama.cpp
    one; whether measured here): the least-squares line through this machine's finished runs of the method
    in this dtype once they cover sizes `MIN_SPREAD` apart and it rises, else the benchmark's slope."""
    default = MB_PER_MILLION_PARAMS[dtype] if method in TORCH_METHODS else MB_PER_FILE_MB
    if method not in TORCH_METHODS and method not in LLAMA_METHODS:
        return default, False
    points = [(size / _unit(method), peak) for size, peak in runs.peaks_by_size(
        db, method, dtype, by="base_params" if method in TORCH_METHODS else "base_bytes")]
    sizes = [p for p, _ in points]
    if len(points) < 2 or min(sizes) <= 0 or max(sizes) / min(sizes) < MIN_SPREAD:
        return default, False
    mx, my = sum(sizes) / len(points), sum(m for _, m in points) / len(points)
    slope = sum((p - mx) * (m - my) for p, m in points) / sum((p - mx) ** 2 for p in sizes)
    return (slope, True) if slope > 0 else (default, False)


def gain_per_minute(db: Any, method: str) -> tuple[float, bool]:
    """(held-out nats gained per training minute, whether measured on this machine): this machine's
    finished runs, else the benchmark's figure."""
    measured = runs.gain_per_minute(db, method)
    return (measured, True) if measured is not None else (MEASURED_GAIN_PER_MINUTE[method], False)


def choose_method(db: Any, free_mb: float, paused: list[dict[str, Any]],
                  model: ModelSize | None = None) -> tuple[str | None, str]:
    """The method to run in `free_mb`: a paused run's own if it fits, else, of those that fit, the one
    that learns most per idle minute. `model`: the size of the model to train (memory needs scale with it)."""
    def need(method: str) -> float:
        return memory_need_mb(db, method, model)

    if paused and paused[0]["method"] in MEASURED_MB and need(paused[0]["method"]) <= free_mb:
        return paused[0]["method"], "resuming a paused run"
    fits = [method for method in ("lora", "lora-adaptive", "zo-llama") if need(method) <= free_mb]
    if not fits:
        return None, (f"not enough free memory to learn ({free_mb:.0f} MB free; zeroth-order training in "
                      f"llama.cpp needs {need('zo-llama'):.0f} MB)")
    rates = {method: gain_per_minute(db, method) for method in fits}
    best = max(fits, key=lambda method: rates[method][0])
    why = ", ".join(f"{m} {rate:.3f} nats/min ({'measured here' if here else 'benchmark'})"
                    for m, (rate, here) in rates.items())
    return best, (f"idle, quiet and plugged in; {free_mb:.0f} MB free fits {' and '.join(fits)}"
                  + (f"; {best} learns most per minute: {why}" if len(fits) > 1 else ""))


def check(db: Any, settings: Settings, config: DaemonConfig, sensors: Sensors, now: dt.datetime) -> Decision:
    """Every condition for starting adaptation now, in order; the first that fails is the reason."""
    seen = _parse(activity.last_seen(db))
    if seen is not None and now - seen < dt.timedelta(minutes=config.idle_minutes):
        left = dt.timedelta(minutes=config.idle_minutes) - (now - seen)
        return Decision(False, f"user active {int((now - seen).total_seconds() // 60)} min ago; "
                               f"waiting {int(left.total_seconds() // 60) + 1} more min of idle time",
                        eligible_at=seen + dt.timedelta(minutes=config.idle_minutes))
    if ownership.serving(settings.home):
        return Decision(False, "ember serve is answering a request")
    if config.nightly is not None:
        hour, (start, end) = now.astimezone().hour, config.nightly
        inside = start <= hour < end if start <= end else (hour >= start or hour < end)
        if not inside:
            return Decision(False, f"outside the nightly window {start}:00-{end}:00")
    if runs.current(db) is not None:
        return Decision(False, "an adaptation is already running")
    paused = runs.resumable(db)
    waiting = None
    if not paused:
        fresh = activity.new_messages(db)
        left = settings.privacy_budget - ledger.spent(db)["epsilon"]
        if fresh < config.min_new_messages:
            waiting = f"{fresh} new messages since the last adapter; waiting for {config.min_new_messages}"
        elif left < settings.adapt_epsilon:
            waiting = (f"privacy budget spent: ε {left:.2f} left, a run needs {settings.adapt_epsilon:g}; "
                       "raise privacy_budget to learn more")
    refit = None
    if waiting is not None:
        # Nothing to train: the idle time can still refit the router on the replies the user judged.
        from assistant.router import fit_due

        refit = fit_due(db, config.router_min_new)
        if refit is None:
            return Decision(False, waiting)
    if sensors.on_battery() and config.require_mains:
        return Decision(False, "on battery; waiting for mains power")
    load = sensors.load()
    if load > config.max_load:
        return Decision(False, f"CPU busy (load {load:.2f} per core > {config.max_load})")
    temperature = sensors.temperature_c()
    if temperature is not None and temperature > config.max_temperature_c:
        return Decision(False, f"too hot ({temperature:.0f} °C > {config.max_temperature_c:.0f} °C)")
    if refit is not None:
        free = sensors.available_mb()
        if free < MEASURED_MB["router"]:
            return Decision(False, f"{waiting}; the router refit needs {MEASURED_MB['router']:.0f} MB, "
                                   f"{free:.0f} MB free")
        return Decision(True, f"{waiting}; refitting the router: {refit}", "router")
    method, reason = choose_method(db, sensors.available_mb(), paused, _model_size(settings))
    return Decision(method is not None, reason, method)


def _model_size(settings: Settings) -> ModelSize | None:
    """The size of the model the daemon would train, or None when llama.cpp cannot read it (the run
    itself then says why)."""
    from adapters.base import resolve_dtype
    from adapters.lora import LoraConfig

    try:
        size = ModelSize.of(settings.model_path)
    except (OSError, ValueError):
        return None
    # The dtype LoRA would hold this base in (bf16 on a CPU with it, for a model of 40 M parameters up).
    return dataclasses.replace(size, dtype=resolve_dtype(LoraConfig.dtype, size.params))


class Daemon:
    """One daemon per data directory: check on a schedule, adapt when allowed, pause when the user returns."""

    def __init__(self, settings: Settings, config: DaemonConfig, *, sensors: Sensors | None = None,
                 clock: Callable[[], dt.datetime] | None = None,
                 adapt: Callable[..., dict[str, Any]] | None = None):
        self.settings = settings
        self.config = config
        self.sensors = sensors or Sensors()
        self.clock = clock or (lambda: dt.datetime.now(dt.timezone.utc))
        self._adapt = adapt
        self.db = connections(settings.home, busy_timeout_ms=settings.busy_timeout_ms).get("daemon")
        self.stopping = threading.Event()
        self.busy = threading.Lock()        # held by a check and the run it starts
        self.seen_at_start: str | None = None
        self.current_method: str | None = None
        self.running = False
        self.log_path = settings.home / LOG_NAME

    def log(self, event: str, **fields: Any) -> None:
        """One JSON line in the data dir's daemon log (0600)."""
        line = json.dumps({"time": self.clock().isoformat(timespec="seconds"), "event": event, **fields})
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def user_returned(self) -> bool:
        """Asked after every training step: the user wrote or opened the chat since the run started."""
        return self.stopping.is_set() or (self.running and (activity.last_seen(self.db) != self.seen_at_start
                                                            or ownership.serving(self.settings.home)))

    def tick(self) -> Decision | None:
        """One scheduled check; runs adaptation to completion or pause when allowed."""
        with self.busy, ownership.training(self.settings.home):   # `ember serve` replies wait out a step
            if self.stopping.is_set():
                return None
            return self._tick()

    def _tick(self) -> Decision:
        now = self.clock()
        decision = check(self.db, self.settings, self.config, self.sensors, now)
        next_check = (now + dt.timedelta(seconds=self.config.check_seconds)).isoformat(timespec="seconds")
        if not decision.start:
            eligible = decision.eligible_at.isoformat(timespec="seconds") if decision.eligible_at else None
            activity.set_daemon(self.db, pid=os.getpid(), state="waiting", reason=decision.reason,
                                next_check=next_check, eligible_at=eligible)
            self.log("wait", reason=decision.reason)
            return decision
        self.seen_at_start, self.running = activity.last_seen(self.db), True
        self.current_method = decision.method
        activity.set_daemon(self.db, pid=os.getpid(),
                            state="fitting the router" if decision.method == "router" else "adapting",
                            reason=decision.reason,
                            last_run=now.isoformat(timespec="seconds"), eligible_at=None)
        self.log("start", reason=decision.reason, method=decision.method)
        try:
            result = self.run_router_fit() if decision.method == "router" else self.run_adaptation()
        except EmberError as err:
            outcome = f"failed: {err}"
        else:
            outcome = ("paused: the user came back" if result.get("paused") or result.get("stopped") else
                       f"router refitted on {result['items']} replies (policy {result['policy_id']})"
                       if decision.method == "router" else
                       f"{'promoted' if result['promoted'] else 'not promoted'} {result['adapter_id']}")
        finally:
            self.running = False
        activity.set_daemon(self.db, pid=os.getpid(), state="waiting", reason=outcome, last_result=outcome,
                            next_check=next_check)
        self.log("end", result=outcome)
        return Decision(True, outcome, decision.method)

    def run_adaptation(self) -> dict[str, Any]:
        """The same entry point as `ember adapt` (`assistant.adaptation.run`), preemptible."""
        from assistant import adaptation

        flags = adaptation.flags_for(self.current_method or "lora")
        return (self._adapt or adaptation.run)(self.settings, self.db, **flags, should_stop=self.user_returned)

    def run_router_fit(self) -> dict[str, Any]:
        """Refit the router's thresholds on the user's judged replies; stops when the user returns."""
        from assistant.router import fit_from_log

        return fit_from_log(self.db, self.settings, should_stop=self.user_returned)

    def serve(self) -> None:
        """Run until SIGTERM/SIGINT: check now and then every `check_seconds` (APScheduler)."""
        from apscheduler.schedulers.blocking import BlockingScheduler

        scheduler = BlockingScheduler(timezone=dt.timezone.utc)
        scheduler.add_job(self.tick, "interval", seconds=self.config.check_seconds, max_instances=1,
                          coalesce=True, next_run_time=dt.datetime.now(dt.timezone.utc), id="adapt")

        def stop(_signum: int, _frame: Any) -> None:
            # A run in progress sees `stopping`, checkpoints after its current step and returns.
            self.stopping.set()
            scheduler.shutdown(wait=False)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        activity.set_daemon(self.db, pid=os.getpid(), state="waiting", reason="started")
        self.log("started", pid=os.getpid(), idle_minutes=self.config.idle_minutes)
        scheduler.start()
        with self.busy:   # a run in progress checkpoints and pauses first
            activity.set_daemon(self.db, pid=None, state="stopped", reason="stopped cleanly", next_check=None,
                                eligible_at=None)
        self.log("stopped")


def lower_priority() -> None:
    """Run as a background citizen: nice 10, and idle I/O priority where the OS has it."""
    import psutil

    try:
        os.nice(10)
        process = psutil.Process()
        if hasattr(psutil, "IOPRIO_CLASS_IDLE"):
            process.ionice(psutil.IOPRIO_CLASS_IDLE)
    except (OSError, psutil.Error):
        pass   # a priority we cannot lower is not a reason to stop learning


class single_instance:
    """An exclusive lock in the data dir: a second daemon refuses to start."""

    def __init__(self, home: Path):
        self.path = home / "daemon.lock"
        self.fd: int | None = None

    def __enter__(self) -> "single_instance":
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise InvalidInput(f"an Ember daemon is already running for {self.path.parent}; "
                               "`ember daemon status` shows it") from None
        return self

    def __exit__(self, *_exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)
