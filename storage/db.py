"""Open Ember's SQLite database: private permissions, WAL, foreign keys, migrations applied."""
from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Iterator

import sqlite_utils

from storage.driver import sqlite3
from storage.atomic import immediate
from storage.errors import DatabaseCorrupt, DatabaseLocked, DataDirError
from storage.migrations import migrate
from storage.private import private_dirs

DB_NAME = "ember.db"


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) as a 0700 directory, or fail with a clear `DataDirError`."""
    try:
        private_dirs(path)
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


def _private_file(path: Path) -> bool:
    """Tighten an existing database (and its -wal/-shm) to 0600; True when the file is new.

    chmod works on the path and never opens the file: opening and closing a descriptor of a live
    database outside SQLite drops every POSIX lock this process holds on it, and another process may
    then checkpoint and delete the WAL under our connections ("How To Corrupt An SQLite Database
    File", §2.2). So the database file is touched by SQLite alone.
    """
    if not path.exists():
        return True
    for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError, PermissionError):
            if part.stat().st_mode & 0o077:
                part.chmod(0o600)
    return False


def open_db(data_dir: Path, *, busy_timeout_ms: int = 3000) -> sqlite_utils.Database:
    """A new connection to the database in `data_dir` (created if needed), migrated to the latest schema.

    Front-ends hold theirs through `Connections`, the one owner of a process's connections.
    """
    ensure_private_dir(data_dir)
    path = data_dir / DB_NAME
    try:
        new = _private_file(path)
    except OSError as err:
        raise DataDirError(f"cannot open {path}: {err.strerror}; fix its permissions "
                           "or set EMBER_HOME to another directory") from err
    with sqlite_errors(path):
        # A new database is created by SQLite itself under a private umask; SQLite gives the -wal and
        # -shm files the database's own mode. umask is process-wide, so only the creating connect holds it.
        old_umask = os.umask(0o077) if new else None
        try:
            try:
                conn = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, check_same_thread=False)
            except sqlite3.OperationalError as err:
                if "unable to open" in str(err):
                    raise DataDirError(f"cannot open {path}: {err}; fix its permissions "
                                       "or set EMBER_HOME to another directory") from err
                raise
            # No sqlite-utils plugins: third-party code has no business on the user's private log,
            # and finding them reads every installed package's entry points (~40-75 ms per process).
            db = sqlite_utils.Database(conn, execute_plugins=False)
            db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            _retry_locked(lambda: _wal(db), busy_timeout_ms)
        finally:
            if old_umask is not None:
                os.umask(old_umask)
        load_vector_extension(conn)
        db.execute("PRAGMA foreign_keys = ON")
        # NORMAL is durable across a killed process in WAL mode; only power loss can drop the last commit.
        db.execute("PRAGMA synchronous = NORMAL")
        _retry_locked(lambda: migrate(db), busy_timeout_ms)
    return db


def _wal(db: sqlite_utils.Database) -> None:
    if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        db.enable_wal()


def _retry_locked(step, busy_timeout_ms: int) -> None:
    """Run `step`, again while SQLite answers "locked", for up to the busy timeout.

    While a new database is still in rollback-journal mode (processes started at once, one of them
    switching it to WAL), SQLite returns SQLITE_BUSY without calling the busy handler where waiting
    could deadlock; its documentation leaves the retry to the application (sqlite3_busy_handler).
    """
    deadline = time.monotonic() + busy_timeout_ms / 1000
    pause = 0.01
    while True:
        try:
            return step()
        except sqlite3.OperationalError as err:
            if not _locked(err) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


class Connections:
    """The one owner of a process's connections to one data directory's database.

    Each role (the UI thread, the reply worker, the BM25 reader …) gets one connection, opened on first
    use and shared by every later caller of that role; `close` closes them all. SQLite connections are
    not shared across threads, so a thread that writes on its own needs its own role.
    """

    def __init__(self, data_dir: Path, *, busy_timeout_ms: int = 3000):
        self.data_dir = Path(data_dir)
        self.busy_timeout_ms = busy_timeout_ms
        self._open: dict[str, sqlite_utils.Database] = {}
        self._lock = threading.Lock()

    def get(self, role: str = "main") -> sqlite_utils.Database:
        """The connection for `role`, opened (and the schema migrated) on first use."""
        with self._lock:
            db = self._open.get(role)
            if db is None:
                db = self._open[role] = open_db(self.data_dir, busy_timeout_ms=self.busy_timeout_ms)
            return db

    def close(self) -> None:
        """Close every connection this owner opened."""
        with self._lock:
            for db in self._open.values():
                with contextlib.suppress(Exception):
                    db.close()
            self._open.clear()


_owners: dict[Path, Connections] = {}
_owners_lock = threading.Lock()


def connections(data_dir: Path, *, busy_timeout_ms: int = 3000) -> Connections:
    """This process's owner of the connections to the database in `data_dir` (one per directory)."""
    key = Path(data_dir).expanduser().resolve()
    with _owners_lock:
        owner = _owners.get(key)
        if owner is None:
            owner = _owners[key] = Connections(key, busy_timeout_ms=busy_timeout_ms)
        return owner


def close_all() -> None:
    """Close every connection of every owner in this process (before it ends without Python's teardown)."""
    with _owners_lock:
        owners = list(_owners.values())
    for owner in owners:
        owner.close()


def connections_of(db: sqlite_utils.Database) -> Connections:
    """The owner of the data directory behind `db` (for a module handed only a connection)."""
    return connections(Path(db_path(db)).parent)


@contextlib.contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """One atomic write that holds the write lock from its first statement (nested calls become
    savepoints), with lock errors made readable."""
    with sqlite_errors(Path(db_path(db))):
        with immediate(db):
            yield db


def db_path(db: sqlite_utils.Database) -> str:
    """The file behind a connection, for messages."""
    return db.execute("PRAGMA database_list").fetchone()[2]


def change_marker(db: sqlite_utils.Database) -> tuple[int, int]:
    """A pair that moves whenever the database may have changed: SQLite's data_version (another
    connection's commits) and this connection's total_changes (its own writes)."""
    return db.execute("PRAGMA data_version").fetchone()[0], db.conn.total_changes


def integrity_ok(db: sqlite_utils.Database) -> bool:
    """True when SQLite's own integrity check passes."""
    return db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
