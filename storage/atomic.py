"""Transactions that take SQLite's write lock at BEGIN."""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

import sqlite_utils


# SQLite's busy handler sleeps at most 100 ms between tries (sqliteDefaultBusyCallback). A process that
# commits batch after batch with no gap takes the lock back before a waiting writer wakes, every time,
# and the waiter fails after its busy timeout although no single batch held the lock that long. A
# pause a little longer than the handler's longest sleep, between batches, lets a waiter in.
MAKE_WAY_SECONDS = 0.11


def make_way() -> None:
    """Pause between two write batches so that a writer waiting on the lock gets it (see above)."""
    time.sleep(MAKE_WAY_SECONDS)


@contextlib.contextmanager
def immediate(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """`db.atomic()`, except that the outermost transaction takes the write lock at BEGIN.

    A deferred transaction (sqlite-utils' `BEGIN`) that reads and then writes gets SQLITE_BUSY at once,
    without waiting out the busy timeout, when another connection committed between its read and its
    write (WAL mode cannot move its snapshot forward: "BEGIN IMMEDIATE", sqlite.org/lang_transaction.html).
    With BEGIN IMMEDIATE the wait happens at BEGIN, under the busy timeout, and the transaction's reads
    see the latest commit. Nested calls become savepoints, as with `db.atomic()`.
    """
    if db.conn.in_transaction:
        with db.atomic():
            yield db
        return
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.rollback()
        raise
    else:
        try:
            db.conn.execute("COMMIT")
        except BaseException:
            db.rollback()
            raise
