"""Transactions that take SQLite's write lock at BEGIN."""
from __future__ import annotations

import contextlib
from typing import Iterator

import sqlite_utils


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
