"""The SQLite database the supervisor keeps (sessions, runs, approvals): opening,
configuring, migrating, one-transaction writes, and SQLite errors translated
into StoreErrors that say what to do.

`SqliteStore` is the base of every store over that database; each store opens
its own connection (WAL lets them share the file) and is used from the
supervisor's event loop thread only (sqlite3 enforces it).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

from bastion.supervisor.errors import StoreError
from bastion.supervisor.store.migrations import migrate


class SqliteStore:
    def __init__(self, db: sqlite3.Connection, path: Path, clock: Callable[[], float] = time.time) -> None:
        """`db`: an autocommit (`isolation_level=None`) connection to a migrated database."""
        self._db = db
        self.path = path
        self._clock = clock

    @classmethod
    def open(cls, path: Path, *, busy_timeout: float = 5.0, clock: Callable[[], float] = time.time) -> Self:
        """Open (creating it and its directory if needed) and migrate the database at `path`."""
        create_private(path)
        try:
            db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise translate(exc, path) from exc
        try:
            configure(db)
            migrate(db, path)
        except sqlite3.Error as exc:
            db.close()
            raise translate(exc, path) from exc
        except BaseException:
            db.close()
            raise
        return cls(db, path, clock)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise translate(exc, self.path) from exc

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, rolled back on any error (ours or SQLite's)."""
        with self._translated():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    # SQLite may already have rolled back (e.g. on SQLITE_FULL); nothing more to undo then.
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise


def create_private(path: Path) -> None:
    """Create the directory and an empty database file only its owner can read: transcripts are private."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    except OSError as exc:
        raise StoreError(f"cannot open the session database {path}: {exc.strerror}") from exc


def configure(db: sqlite3.Connection) -> None:
    wal = db.execute("PRAGMA journal_mode = WAL").fetchone()[0] == "wal"
    # NORMAL is corruption-safe only in WAL mode; where WAL is unavailable
    # (some network file systems) pay for FULL instead.
    db.execute(f"PRAGMA synchronous = {'NORMAL' if wal else 'FULL'}")
    db.execute("PRAGMA foreign_keys = ON")


def translate(exc: sqlite3.Error, path: Path) -> StoreError:
    """A StoreError saying what happened to the database at `path` and what to do about it."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = None if code is None else code & 0xFF  # extended codes carry the primary in the low byte
    if primary == sqlite3.SQLITE_FULL or "database or disk is full" in str(exc):
        return StoreError(f"disk full: free space in {path.parent}; nothing was written")
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return StoreError(
            f"{path} stayed locked by another process past the busy timeout; is a second bastion supervisor"
            " using this home? Stop it and retry; nothing was written"
        )
    if primary in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
        return StoreError(
            f"{path} is not a bastion database or is corrupt: move it aside (mv {path} {path}.broken)"
            " and bastion will start a new one"
        )
    if primary in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
        return StoreError(f"cannot write the session database {path}: check its permissions ({exc})")
    if primary == sqlite3.SQLITE_IOERR:
        return StoreError(f"I/O error on the session database {path}: check the disk ({exc})")
    if isinstance(exc, sqlite3.ProgrammingError):
        return StoreError(f"session database {path} used after close or misused: {exc}")
    return StoreError(f"session database {path}: {exc}")
