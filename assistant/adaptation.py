"""Adaptation from the user's settings: the one entry point that `ember adapt`, the daemon and any other
front-end call. It turns settings and flags into the pipeline's configuration and runs
`adapters.pipeline.adapt`; front-ends only parse their input and show the result.

Training libraries (torch, peft, opacus, gguf) load only when a run needs them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from adapters.errors import AdapterInvalid, InvalidInput
from assistant.config import Settings
from storage import registry

if TYPE_CHECKING:
    import sqlite_utils

    from adapters.pipeline import AdaptConfig

METHODS = ("lora", "zo")
BACKENDS = ("llama", "torch")
LAYERS = ("top", "adaptive")


def config_for(settings: Settings, *, method: str = "lora", epsilon: float | None = None,
               no_dp: bool = False, steps: int | None = None, dry_run: bool = False,
               backend: str | None = None, layers: str | None = None, start: Path | None = None,
               seed_pool: tuple[int, int, int] | None = None, exit_stride: int | str | None = None,
               window: int | str | None = None) -> AdaptConfig:
    """The pipeline's configuration from the user's settings and a run's flags; bad flags are `InvalidInput`.

    `exit_stride` (`--exit-stride`, else `adapt_exit_stride` in config.toml) places adaptive layers' exits.
    `window` (`--window`, else `zo_window`) is how many top layers' control vectors zeroth-order
    training in llama.cpp trains (0: every layer's).

    Household learning (assistant/federation) adds `start` (the global weights to train from) and, for
    FedKSeed, `seed_pool` = (K, public pool seed, this run's seed)."""
    from adapters import lora, zo
    from adapters.pipeline import AdaptConfig

    if method not in METHODS:
        raise InvalidInput(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    if epsilon is not None and no_dp:
        raise InvalidInput("--epsilon and --no-dp contradict each other; pass one")
    if epsilon is not None and epsilon <= 0:
        raise InvalidInput(f"--epsilon must be positive, not {epsilon:g}")
    if backend is not None and method != "zo":
        raise InvalidInput("--backend chooses where zeroth-order training runs; it needs --method zo")
    if layers is not None and layers not in LAYERS:
        raise InvalidInput(f"--layers must be one of {', '.join(LAYERS)}, not {layers!r}")
    if layers is not None and method != "lora":
        raise InvalidInput("--layers chooses which layers LoRA trains; it needs --method lora")
    if exit_stride is not None and layers != "adaptive":
        raise InvalidInput("--exit-stride places the exits of adaptive layer tuning; it needs --layers adaptive")
    zo_llama = method == "zo" and (backend or settings.zo_backend) == "llama"
    if window is not None and not zo_llama:
        raise InvalidInput("--window chooses the layers zeroth-order training in llama.cpp trains; "
                           "it needs --method zo (backend llama)")
    private = None if no_dp else (epsilon or settings.adapt_epsilon)
    train = dataclasses.replace(lora.LoraConfig(), threads=settings.threads, steps=steps, epsilon=private)
    if layers == "adaptive":
        from adapters.layerwise import AdaptiveConfig

        train = AdaptiveConfig(threads=settings.threads, steps=steps, epsilon=private,
                               stride=exit_stride_for(settings, exit_stride))
    forward = zo.ZoConfig(backend=backend or settings.zo_backend, threads=settings.threads, epsilon=private,
                          steps=steps or settings.zo_steps,
                          # A household's devices replay each other's seeds on the whole vector: no window.
                          window=window_for(settings, window) if zo_llama and seed_pool is None else 0)
    if start is not None and layers == "adaptive":
        raise InvalidInput("household learning trains the top layers' LoRA; --layers adaptive is not federated")
    if start is not None and method == "lora":
        # The household shares A (drawn from a public seed) and averages B: FFA-LoRA (arXiv 2403.12313).
        train = dataclasses.replace(train, train_a=False)
    if seed_pool is not None:
        # FedKSeed: directions from the pool, constant lr, and no early stop (it would drop the start).
        forward = dataclasses.replace(forward, seed_pool=seed_pool[0], pool_seed=seed_pool[1], seed=seed_pool[2],
                                      lr_schedule="constant", eval_every=0)
    return AdaptConfig(model_path=settings.model_path, home=settings.home, cache=settings.cache_dir,
                       method=method, lora=train, zo=forward,
                       budget=settings.privacy_budget, threads=settings.threads, dry_run=dry_run,
                       learn_from_api=settings.learn_from_api, layers=layers or "top", start=start)


def _whole_number(flag: int | str | None, flag_name: str, setting: int | str, setting_name: str,
                  unit: str) -> tuple[str, int]:
    """(where the value came from, the value): the flag if given, else the config.toml setting, as a whole
    number; anything else is `InvalidInput` naming its source."""
    source = flag_name if flag is not None else f"{setting_name} in config.toml"
    raw = flag if flag is not None else setting
    try:
        return source, int(str(raw).strip())
    except ValueError:
        raise InvalidInput(f"{source} must be a whole number {unit}, not {raw!r}") from None


def window_for(settings: Settings, flag: int | str | None) -> int:
    """The top layers ZO in llama.cpp trains: `--window` if given, else `zo_window`. `--window` must be 0
    (every layer) or 1 to the model's layer count − 2, else `InvalidInput` (before any training);
    `zo_window` is capped at what the model has (n_layer − 2; a model of 2 layers trains them all)."""
    source, value = _whole_number(flag, "--window", settings.zo_window, "zo_window", "of top layers (0: all)")
    if value < 0:
        raise InvalidInput(f"{source} must be a number of top layers (0: all), not {value}")
    if value == 0 or not settings.model_path.is_file():
        return value                      # a missing model is reported where it is loaded
    from adapters.federated import model_shape

    n_layer = model_shape(settings.model_path)["n_layer"]
    if flag is None:
        return value if value <= n_layer - 2 else max(0, n_layer - 2)
    if value > n_layer - 2:
        raise InvalidInput(f"--window is {value} but {settings.model_path.name} has {n_layer} layers; choose 1 to "
                           f"{n_layer - 2} top layers, or 0 for all")
    return value


def exit_stride_for(settings: Settings, flag: int | str | None) -> int:
    """The adaptive run's exit stride in layers: `--exit-stride` if given, else `adapt_exit_stride`; a stride
    that is not a whole number from 1 to the model's layer count is `InvalidInput` (before any training)."""
    source, stride = _whole_number(flag, "--exit-stride", settings.adapt_exit_stride, "adapt_exit_stride",
                                   "of layers")
    if stride < 1:
        raise InvalidInput(f"{source} must be at least 1 layer (an exit every N layers), not {stride}")
    from adapters.federated import model_shape

    if not settings.model_path.is_file():
        from assistant.errors import ModelNotFound

        raise ModelNotFound(f"model file {settings.model_path} does not exist; pass a .gguf file or a registered name")
    n_layer = model_shape(settings.model_path)["n_layer"]
    if stride > n_layer:
        raise InvalidInput(f"{source} is {stride} but {settings.model_path.name} has {n_layer} layers; "
                           f"choose 1 to {n_layer} (an exit every N layers, the last at layer {n_layer - 1})")
    return stride


def flags_for(label: str) -> dict[str, str]:
    """The flags of a method as runs record it (`lora`, `lora-adaptive`, `zo-llama`, `zo-torch`), for
    `config_for`/`run`."""
    if label == "lora-adaptive":
        return {"method": "lora", "layers": "adaptive"}
    method, _, backend = label.partition("-")
    if method not in METHODS or (backend and (method != "zo" or backend not in BACKENDS)):
        raise InvalidInput(f"unknown adaptation method {label!r}")
    return {"method": method, **({"backend": backend} if backend else {})}


def run(settings: Settings, db: sqlite_utils.Database, *, method: str = "lora", epsilon: float | None = None,
        no_dp: bool = False, steps: int | None = None, dry_run: bool = False, backend: str | None = None,
        layers: str | None = None, on_step: Callable[[Any], None] | None = None,
        on_stage: Callable[[str], None] | None = None, should_stop: Callable[[], bool] | None = None,
        start: Path | None = None, seed_pool: tuple[int, int, int] | None = None,
        exit_stride: int | str | None = None, window: int | str | None = None) -> dict[str, Any]:
    """Build the dataset, train, export, gate and promote once (or plan only, with `dry_run`); returns
    the `ember adapt --json` document. `should_stop` is asked after every step: True pauses the run."""
    from adapters.pipeline import adapt

    config = config_for(settings, method=method, epsilon=epsilon, no_dp=no_dp, steps=steps, dry_run=dry_run,
                        backend=backend, layers=layers, start=start, seed_pool=seed_pool,
                        exit_stride=exit_stride, window=window)
    return adapt(db, config, on_step=on_step, on_stage=on_stage, should_stop=should_stop)


def check_adapter_file(settings: Settings, adapter: dict[str, Any]) -> None:
    """Refuse an adapter whose file is gone, corrupt, or for another model, before it is put in use."""
    from adapters.base import file_sha256
    from adapters.export import check_compatible, read_adapter

    path = Path(adapter["path"])
    if not path.is_file():
        raise AdapterInvalid(f"adapter file {path} is missing; `ember adapters remove {adapter['id']}`")
    info = read_adapter(path)
    check_compatible(info, architecture=info.architecture,
                     base_sha256=file_sha256(settings.model_path, settings.cache_dir))


def use_adapter(settings: Settings, db: sqlite_utils.Database, adapter_id: str) -> dict[str, Any]:
    """Make an adapter the active one after checking its file; returns its registry row."""
    check_adapter_file(settings, registry.get(db, adapter_id))
    return registry.use(db, adapter_id)


def remove_adapter(db: sqlite_utils.Database, adapter_id: str) -> dict[str, Any]:
    """Delete an adapter's record, lineage and file; returns its registry row as it was."""
    row = registry.remove(db, adapter_id)
    Path(row["path"]).unlink(missing_ok=True)
    return row
