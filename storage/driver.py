"""The SQLite driver every Ember connection uses.

Ember's vector index is the sqlite-vec extension, and Python builds (pyenv's among them) often leave
out `enable_load_extension`. sqlean-py is the stdlib `sqlite3` module built with a current SQLite that
can load extensions, on Linux (x86-64, aarch64 for Jetson), macOS and Windows. sqlite-utils uses a
drop-in driver registered as `pysqlite3`, so registering sqlean under that name makes every
sqlite-utils call, and the exceptions it catches, speak to the same driver.
"""
from __future__ import annotations

import sys

import sqlean

if "sqlite_utils" in sys.modules and sys.modules.get("pysqlite3") is not sqlean:
    raise ImportError("import storage before sqlite_utils: Ember's SQLite driver must be registered first")
sys.modules.setdefault("pysqlite3", sqlean)
sys.modules.setdefault("pysqlite3.dbapi2", sqlean.dbapi2)

sqlite3 = sqlean
