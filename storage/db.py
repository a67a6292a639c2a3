"""Open Ember's SQLite database: private permissions, WAL, foreign keys, migrations applied."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import sqlite_utils

from storage.driver import sqlite3
from storage.errors import DatabaseCorrupt, DatabaseLocked, DataDirError
from storage.migrations import migrate

DB_NAME = "ember.db"


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) as a 0700 directory, or fail with a clear `DataDirError`."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise DataDirError(f"cannot create data directory {path}: {err.strerror}; "
                           "set EMBER_HOME to a writable directory") from err
    if not path.is_dir():
        raise DataDirError(f"data directory {path} is not a directory; set EMBER_HOME to a directory")
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise DataDirError(f"data directory {path} is not readable and writable by you; "
                           "fix its permissions or set EMBER_HOME to another directory")
    with contextlib.suppress(PermissionError):
        # Only the owner can tighten; a shared directory someone else owns stays as it is.
        path.chmod(0o700)
    return path


def _locked(err: sqlite3.OperationalError) -> bool:
    text = str(err).lower()
    return "locked" in text or "busy" in text


@contextlib.contextmanager
def sqlite_errors(path: Path) -> Iterator[None]:
    """Turn SQLite's lock and corruption errors into one-line `EmberError`s."""
    try:
        yield
    except sqlite3.OperationalError as err:
        if _locked(err):
            raise DatabaseLocked(f"database {path} is locked by another process; "
                                 "close it (or wait) and try again") from err
        raise
    except sqlite3.DatabaseError as err:
        if type(err) is not sqlite3.DatabaseError:   # IntegrityError and friends are bugs, not damage
            raise
        raise DatabaseCorrupt(f"database {path} is unreadable ({err}); move it aside and Ember "
                              "will start a new one") from err


def load_vector_extension(conn) -> None:
    """Load sqlite-vec into `conn` (memory's vector index lives in a vec0 table)."""
    import sqlite_vec

    conn.enable_load_extension(True)
    try:
        sqlite_vec.load(conn)
    finally:
        conn.enable_load_extension(False)


def open_db(data_dir: Path, *, busy_timeout_ms: int = 3000) -> sqlite_utils.Database:
    """Open (creating if needed) the database in `data_dir`, migrated to the latest schema."""
    ensure_private_dir(data_dir)
    path = data_dir / DB_NAME
    try:
        # Create the file 0600 before SQLite touches it: SQLite gives -wal and -shm the same mode.
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        path.chmod(0o600)
    except OSError as err:
        raise DataDirError(f"cannot open {path}: {err.strerror}; fix its permissions "
                           "or set EMBER_HOME to another directory") from err
    with sqlite_errors(path):
        conn = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, check_same_thread=False)
        load_vector_extension(conn)
        db = sqlite_utils.Database(conn)
        db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        db.execute("PRAGMA foreign_keys = ON")
        if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            db.enable_wal()
        # NORMAL is durable across a killed process in WAL mode; only power loss can drop the last commit.
        db.execute("PRAGMA synchronous = NORMAL")
        migrate(db)
    return db


@contextlib.contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """One atomic write (nested calls become savepoints), with lock errors made readable."""
    with sqlite_errors(Path(db_path(db))):
        with db.atomic():
            yield db


def db_path(db: sqlite_utils.Database) -> str:
    """The file behind a connection, for messages."""
    return db.execute("PRAGMA database_list").fetchone()[2]


def integrity_ok(db: sqlite_utils.Database) -> bool:
    """True when SQLite's own integrity check passes."""
    return db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
