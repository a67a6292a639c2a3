"""`ember adapt`: dataset → budget check → DP training → GGUF export → gate → registry, crash-safe.

A run is recorded in `adapt_runs` and the privacy ledger before training starts; its checkpoint and its
dataset live in the cache until the adapter is registered. A run that stopped (paused by the daemon,
killed, crashed) is found on the next start and resumed from its checkpoint, on its own dataset, when the
training configuration is unchanged; otherwise it is dropped and a new run starts. The adapter file is
written under a temporary name and renamed, and only a complete file is ever registered.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from adapters import dataset as datasets
from adapters import gate, lora, methods, zo
from adapters.base import file_sha256, write_private
from adapters.errors import BudgetExhausted, InvalidInput
from adapters.template import ChatTemplate
from storage import conversations as convs
from storage import ledger, registry, runs
from storage.private import private_dirs

if TYPE_CHECKING:
    import sqlite_utils

METHODS = ("lora", "zo")


@dataclasses.dataclass(frozen=True)
class AdaptConfig:
    """Where things are and what to run."""

    model_path: Path
    home: Path
    method: str = "lora"
    lora: lora.LoraConfig = lora.LoraConfig()   # a layerwise.AdaptiveConfig with layers="adaptive"
    zo: zo.ZoConfig = zo.ZoConfig()
    cache: Path | None = None       # None: <home>/cache
    budget: float = 32.0            # total ε the user allows across all adapters
    threads: int = 2
    max_len: int = 192
    dry_run: bool = False
    keep_facts: bool = False        # True: personal facts are trained on too, not left to memory only
    learn_from_api: bool = True     # False: conversations that came through `ember serve` are left out
    layers: str = "top"             # lora: the top N layers, or "adaptive" (EDGE-LLM's moving window)
    start: Path | None = None       # train from these weights (adapters.federated.save_start), not from init

    @property
    def trainer(self) -> Any:
        """The chosen method's own configuration."""
        return self.zo if self.method == "zo" else self.lora

    @property
    def label(self) -> str:
        """The method as runs record it (`lora`, `zo-llama`, `zo-torch`): each needs its own memory."""
        if self.method == "lora" and self.layers == "adaptive":
            return "lora-adaptive"
        return f"zo-{self.zo.backend}" if self.method == "zo" else self.method

    @property
    def adapters_dir(self) -> Path:
        """Where adapter files live."""
        return self.home / "adapters"

    @property
    def cache_dir(self) -> Path:
        """Rebuildable files: the dequantized base, checkpoints."""
        return self.cache if self.cache is not None else self.home / "cache"


@contextlib.contextmanager
def single_run(home: Path) -> Iterator[None]:
    """Hold the adaptation lock: one run at a time per data directory (chat, daemon and CLI alike)."""
    path = home / "adapt.lock"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidInput("an adaptation is already running for this data directory; "
                               "`ember status` shows its progress") from None
        yield
    finally:
        os.close(fd)


def new_id(method: str) -> str:
    """A sortable, unique adapter/run id such as `lora-20261123-142501-9f3a`."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{method}-{stamp}-{secrets.token_hex(2)}"


def budget_left(db: sqlite_utils.Database, budget: float) -> float:
    """ε the user still allows."""
    return budget - ledger.spent(db)["epsilon"]


def adapt(db: sqlite_utils.Database, config: AdaptConfig, *,
          on_step: Callable[[lora.Progress], None] | None = None,
          on_stage: Callable[[str], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run the whole pipeline once; returns the `ember adapt --json` document."""
    if config.method not in METHODS:
        raise InvalidInput(f"--method must be one of {', '.join(METHODS)}, not {config.method!r}")
    stage = on_stage or (lambda _text: None)
    template = ChatTemplate.from_gguf(str(config.model_path))
    resume = None if config.dry_run else _resumable(db, config)
    data = _load_data(config, resume["id"]) if resume else datasets.build(db, template, max_len=config.max_len,
                                                                           keep_facts=config.keep_facts,
                                                                           learn_from_api=config.learn_from_api)
    n_train = len(data.train)
    steps, plan = methods.plan(config.method, config.trainer, n_train)
    summary = {"method": config.method, "layers": config.layers if config.method == "lora" else None,
               "backend": config.zo.backend if config.method == "zo" else None, "dp": plan is not None, "examples": n_train,
               "heldout": len(data.heldout), "kinds": datasets.counts(data.train),
               "redactions": data.redactions, "skipped": data.skipped, "steps": steps,
               "epsilon": plan.epsilon if plan else None, "delta": plan.delta if plan else None,
               "sigma": plan.sigma if plan else None, "clip": plan.clip if plan else None,
               "sample_rate": plan.sample_rate if plan else None,
               "budget_left": budget_left(db, config.budget)}
    if config.label == "lora-adaptive":
        summary["windows"] = _adaptive_windows(config, steps)
    if config.label == "zo-llama":
        summary["window"] = config.zo.window          # top layers whose control vectors train (0: all)
    # A resumed run's ε is already in the ledger; only a new run must fit in what is left.
    if resume is None and plan is not None and plan.epsilon > summary["budget_left"] + 1e-9:
        raise BudgetExhausted(
            f"this run needs ε={plan.epsilon:g} but only {max(0.0, summary['budget_left']):.2f} of your "
            f"privacy budget (ε={config.budget:g}) is left; lower --epsilon or raise privacy_budget "
            "in config.toml")
    if config.dry_run:
        return {"adapter_id": None, "path": None, "promoted": False, "eval": None, "dry_run": True,
                **summary}
    with single_run(config.home):
        return _run(db, config, data, steps, plan, summary, resume, on_step, stage, should_stop)


def _adaptive_windows(config: AdaptConfig, steps: int) -> list[dict[str, int]]:
    """The planned windows of an adaptive run: [{first, exit, steps}], shallow to deep (layers 0-based)."""
    from adapters import layerwise
    from adapters.federated import model_shape

    n_layer = model_shape(config.model_path)["n_layer"]
    return [dataclasses.asdict(w) for w in layerwise.windows(n_layer, config.lora.stride, steps,
                                                            config.lora.final_share)]


def _config_fingerprint(config: AdaptConfig) -> str:
    key = f"{config.method}:{config.trainer}:{config.model_path}:{config.max_len}"
    if config.start is not None:
        key += f":{config.start}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _resumable(db: sqlite_utils.Database, config: AdaptConfig) -> dict[str, Any] | None:
    """The newest stopped run with this configuration whose checkpoint and dataset are on disk.

    The run continues on the dataset it started with (saved beside its checkpoint): messages written
    since then wait for the next run, and a message forgotten since then taints the result.
    """
    fingerprint = _config_fingerprint(config)
    drop_runs_on_forgotten(db, config.cache_dir)
    for stale in runs.resumable(db):
        files = _run_files(config, stale["id"])
        if stale["fingerprint"] == fingerprint and all(f.is_file() for f in files):
            return stale
    return None


def _run_files(config: AdaptConfig, run_id: str) -> tuple[Path, Path]:
    return _files_in(config.cache_dir, run_id)


def _files_in(cache_dir: Path, run_id: str) -> tuple[Path, Path]:
    folder = cache_dir / "runs"
    return folder / f"{run_id}.ckpt", folder / f"{run_id}.data.json"


def _saved_message_ids(cache_dir: Path, run_id: str) -> set[int] | None:
    """Every message a stopped run's saved dataset holds (targets and context), or None without one."""
    data_file = _files_in(cache_dir, run_id)[1]
    if not data_file.is_file():
        return None
    document = json.loads(data_file.read_text())
    return {m for row in document["train"] + document["heldout"] for m in (row["message_id"], *row["context_ids"])}


def runs_holding(db: sqlite_utils.Database, cache_dir: Path, message_ids: Iterable[int]) -> list[str]:
    """The stopped runs whose saved dataset holds any of these messages: forgetting them drops those runs."""
    wanted = set(message_ids)
    return [stale["id"] for stale in runs.resumable(db)
            if wanted & (_saved_message_ids(cache_dir, stale["id"]) or set())]


def drop_runs_on_forgotten(db: sqlite_utils.Database, cache_dir: Path) -> int:
    """Drop every stopped run whose saved dataset holds a message since forgotten, with its files.

    A paused run keeps its examples and a checkpoint that learned from them; forgetting a message must
    leave no copy of it there. Called by `ember forget` and before any run resumes. Returns how many.
    """
    dropped = 0
    for stale in runs.resumable(db):
        ids = _saved_message_ids(cache_dir, stale["id"])
        if ids is not None and convs.existing_ids(db, ids) != ids:
            for f in _files_in(cache_dir, stale["id"]):
                f.unlink(missing_ok=True)
            runs.update(db, stale["id"], status="failed",
                        message="dropped: it was training on a message since forgotten")
            dropped += 1
    return dropped


def _save_data(cache_dir: Path, run_id: str, data: datasets.Dataset) -> None:
    document = {"train": [dataclasses.asdict(e) for e in data.train],
                "heldout": [dataclasses.asdict(e) for e in data.heldout],
                "redactions": data.redactions, "skipped": data.skipped}
    write_private(_files_in(cache_dir, run_id)[1], json.dumps(document).encode())


def _load_data(config: AdaptConfig, run_id: str) -> datasets.Dataset:
    document = json.loads(_run_files(config, run_id)[1].read_text())

    def examples(rows: list[dict[str, Any]]) -> list[datasets.Example]:
        return [datasets.Example(**{**r, "tokens": tuple(r["tokens"]), "context_ids": tuple(r["context_ids"])})
                for r in rows]

    return datasets.Dataset(examples(document["train"]), examples(document["heldout"]),
                            document["redactions"], document["skipped"])


def _run(db: sqlite_utils.Database, config: AdaptConfig, data: datasets.Dataset, steps: int, plan: Any,
         summary: dict[str, Any], resume: dict[str, Any] | None, on_step: Any, stage: Callable[[str], None],
         should_stop: Any) -> dict[str, Any]:
    for stale in runs.resumable(db):
        if resume is None or stale["id"] != resume["id"]:
            for f in _run_files(config, stale["id"]):
                f.unlink(missing_ok=True)
            runs.update(db, stale["id"], status="failed", message="stopped; a new run replaced it")
    if resume is not None:
        run_id = resume["id"]
        stage(f"resuming interrupted run {run_id} from step {resume['step']}")
    else:
        run_id = new_id(config.method)
        _save_data(config.cache_dir, run_id, data)
    runs.start(db, run_id, method=config.label, steps=steps, fingerprint=_config_fingerprint(config))
    # The daemon scales this run's peak memory to other models by their size (assistant/daemon.py).
    runs.update(db, run_id, **run_size(config))
    ledger.record(db, run_id, method=config.method, dp=plan is not None,
                  epsilon=plan.epsilon if plan else None, delta=plan.delta if plan else None,
                  sigma=plan.sigma if plan else None, clip=plan.clip if plan else None,
                  sample_rate=plan.sample_rate if plan else None, steps=steps, examples=summary["examples"])
    checkpoint, data_file = _run_files(config, run_id)

    peak = PeakMemory()

    def progress(p: lora.Progress) -> None:
        peak.sample()
        runs.update(db, run_id, step=p.step, loss=p.loss, epsilon_spent=p.epsilon, eta_seconds=p.eta_seconds)
        if on_step is not None:
            on_step(p)

    try:
        what = "LoRA" if config.method == "lora" else f"zeroth-order ({config.zo.backend})"
        if config.label == "lora-adaptive":
            what = f"LoRA, adaptive layers (an exit every {config.lora.stride} layers, window shallow to deep)"
        stage(f"training {what} ({'DP ε=%g' % plan.epsilon if plan else 'WITHOUT differential privacy'})")
        base_sha256 = file_sha256(config.model_path, config.cache_dir)
        adapter_id = run_id
        path = config.adapters_dir / f"{adapter_id}.gguf"
        private_dirs(config.adapters_dir)
        train = (methods.train_zo if config.method == "zo" else
                 methods.train_adaptive if config.layers == "adaptive" else methods.train_lora)
        made = train(config.model_path, config.cache_dir, data, config.trainer, path, base_sha256=base_sha256,
                     checkpoint=checkpoint, extra={"adapter_id": adapter_id}, on_step=progress,
                     should_stop=should_stop, **_start(config))
        if made is None:
            runs.update(db, run_id, status="interrupted", message="paused; resumes on the next run")
            return {"adapter_id": None, "path": None, "promoted": False, "eval": None, "paused": True,
                    "run_id": run_id, **summary}
        stage("evaluating on held-out examples")
        current = registry.active(db)
        current_path = Path(current["path"]) if current and Path(current["path"]).is_file() else None
        evaluator = gate.Evaluator(config.model_path, n_ctx=max(config.max_len * 2, 512),
                                   threads=config.threads, base_sha256=base_sha256)
        try:
            verdict = gate.judge(evaluator, data.heldout, path, current_path)
        finally:
            evaluator.close()
        evaluation = {**verdict.as_json(), "train_loss_first": _mean(made.losses[:5]),
                      "train_loss_last": _mean(made.losses[-5:]), "train_seconds": round(made.seconds, 1),
                      "train_losses": _curve(made.losses)}   # the Learning screen plots it
        registry.register(db, {
            "id": adapter_id, "path": str(path), "kind": made.kind, "method": config.method,
            "base_sha256": base_sha256, "base_name": config.model_path.name,
            "params": {**made.params, "steps": steps, "dp": plan is not None,
                       "sigma": plan.sigma if plan else None, "sample_rate": plan.sample_rate if plan else None},
            "eval": evaluation, "status": "inactive" if verdict.promote else "rejected",
            "reason": None if verdict.promote else verdict.reason,
            "epsilon": plan.epsilon if plan else None, "delta": plan.delta if plan else None,
            "examples": summary["examples"]}, data.sources, activate=verdict.promote)
        promoted = registry.get(db, adapter_id)["status"] == "active"
        runs.update(db, run_id, status="done", adapter_id=adapter_id, peak_rss_mb=peak.mb(),
                    message=("promoted: " if promoted else "kept the previous model: ") + verdict.reason)
        checkpoint.unlink(missing_ok=True)
        data_file.unlink(missing_ok=True)
        return {"adapter_id": adapter_id, "path": str(path), "promoted": promoted, "eval": evaluation,
                "run_id": run_id, **summary}
    except BaseException as err:
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        runs.update(db, run_id, status=status, message=str(err)[:300] or type(err).__name__)
        raise


def run_size(config: AdaptConfig) -> dict[str, Any]:
    """The base model's parameter count, its GGUF file's size in bytes, and the dtype torch holds it in for
    this run (float32 for ZO in llama.cpp, which runs the quantized file)."""
    from adapters.base import gguf_parameters, resolve_dtype

    torch_run = config.method == "lora" or config.zo.backend == "torch"
    params = gguf_parameters(config.model_path)
    dtype = resolve_dtype(getattr(config.trainer, "dtype", "float32"), params) if torch_run else "float32"
    return {"base_params": params, "dtype": dtype,
            "base_bytes": Path(config.model_path).stat().st_size}


def _start(config: AdaptConfig) -> dict[str, Any]:
    """The trainer's starting weights, when the run continues a household's global update."""
    if config.start is None:
        return {}
    from adapters.federated import load_start

    return {"start": load_start(config.start)}


def process_peak_mb() -> float:
    """This process's peak resident memory so far, in MB (ru_maxrss is KB on Linux, bytes on macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)


class PeakMemory:
    """The peak resident memory of one run, for choosing a method that fits (the daemon runs many runs
    in one process, and a child forked from a large process inherits its peak across exec): the
    process's peak if the run raised it, else the highest RSS sampled after the run's steps."""

    def __init__(self) -> None:
        self.before, self.sampled = process_peak_mb(), 0.0

    def sample(self) -> None:
        """Note the memory in use now."""
        import psutil

        self.sampled = max(self.sampled, psutil.Process().memory_info().rss / 2 ** 20)

    def mb(self) -> float:
        """The run's peak so far, in MB."""
        self.sample()
        after = process_peak_mb()
        return round(after if after > self.before else self.sampled, 1)


def _curve(losses: list[float], points: int = 100) -> list[float]:
    """The training loss per step, averaged into at most `points` buckets (NaN steps left out)."""
    if not losses:
        return []
    size = max(1, -(-len(losses) // points))
    return [m for m in (_mean(losses[i:i + size]) for i in range(0, len(losses), size)) if m is not None]


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v == v]   # drop NaN (an empty Poisson batch has no loss)
    return round(sum(values) / len(values), 4) if values else None
