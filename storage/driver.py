"""The SQLite driver every Ember connection uses, and the one place sqlite-utils is first imported.

Ember's vector index is the sqlite-vec extension, and Python builds (pyenv's among them) often leave
out `enable_load_extension`. sqlean-py is the stdlib `sqlite3` module built with a current SQLite that
can load extensions, on Linux (x86-64, aarch64 for Jetson), macOS and Windows. sqlite-utils uses a
drop-in driver registered as `pysqlite3`, so registering sqlean under that name makes every
sqlite-utils call, and the exceptions it catches, speak to the same driver.

sqlite-utils imports pandas whenever it is installed (training's dependencies bring it), only to map
`pandas.Timestamp` columns, which Ember never writes; that import costs 0.1–0.4 s on every command
that opens the log. So sqlite-utils is loaded with pandas hidden, by a finder installed here: whoever
imports it first, and however (`import sqlite_utils` is written in many modules), gets it without
pandas, and a command that never touches the log (`ember --version`) does not load it at all.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

import sqlean

if "sqlite_utils" in sys.modules and sys.modules.get("pysqlite3") is not sqlean:
    raise ImportError("import storage before sqlite_utils: Ember's SQLite driver must be registered first")
sys.modules.setdefault("pysqlite3", sqlean)
sys.modules.setdefault("pysqlite3.dbapi2", sqlean.dbapi2)

sqlite3 = sqlean


class _SqliteUtilsWithoutPandas(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds sqlite_utils where Python would, and runs its import with `import pandas` failing."""

    def __init__(self) -> None:
        self._loader: importlib.abc.Loader | None = None

    def find_spec(self, name, path=None, target=None):
        if name != "sqlite_utils" or "pandas" in sys.modules:
            return None     # pandas already loaded: hiding it would save nothing
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def __getattr__(self, name):    # get_resource_reader, get_source …: the real loader's
        return getattr(self._loader, name)

    def exec_module(self, module) -> None:
        sys.modules["pandas"] = None   # type: ignore[assignment]  # `import pandas` raises ImportError
        try:
            self._loader.exec_module(module)   # sqlite_utils.db is imported from here, under the mask
        finally:
            del sys.modules["pandas"]   # anyone who really wants pandas later still gets it


if not any(isinstance(finder, _SqliteUtilsWithoutPandas) for finder in sys.meta_path):
    sys.meta_path.insert(0, _SqliteUtilsWithoutPandas())
