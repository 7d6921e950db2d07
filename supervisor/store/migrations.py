"""The schema of the session database, as an ordered list of named migrations.

Owns every CREATE/ALTER the store's tables have ever needed, and `migrate`, which
brings a connection up to date. Each migration is a small function applied in its
own transaction together with a row in `_migrations` naming it, so a crash
leaves either all of a migration or none of it, and reopening applies only what
is missing.

Changing the schema is appending a function to `MIGRATIONS`. Never edit, reorder
or remove one that has shipped: databases in the wild have recorded its name.

This module must not read or write rows of the store's tables; `sessions.py` and
`trust/approvals.py` do.
It is handed a connection in autocommit mode (`isolation_level=None`) and
manages transactions itself.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bastion.supervisor.errors import StoreError

Migration = Callable[[sqlite3.Connection], None]


def m001_sessions(db: sqlite3.Connection) -> None:
    # next_seq is a counter rather than max(seq)+1 so that clearing a session
    # never lets a new message reuse the seq of a deleted one.
    db.execute(
        """
        CREATE TABLE sessions (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            model TEXT NOT NULL,
            context_start INTEGER NOT NULL DEFAULT 0,
            next_seq INTEGER NOT NULL DEFAULT 1,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )
        """
    )


def m002_messages(db: sqlite3.Connection) -> None:
    db.execute(
        """
        CREATE TABLE messages (
            session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            tool_name TEXT NOT NULL DEFAULT '',
            pinned INTEGER NOT NULL DEFAULT 0,
            interrupted INTEGER NOT NULL DEFAULT 0,
            kind TEXT NOT NULL DEFAULT 'normal',
            created_at REAL NOT NULL,
            PRIMARY KEY (session_id, seq)
        ) WITHOUT ROWID
        """
    )


def m003_runs(db: sqlite3.Connection) -> None:
    db.execute(
        """
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
            request_id TEXT NOT NULL,
            model TEXT NOT NULL,
            status TEXT NOT NULL,
            stop_reason TEXT,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            cached_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            started_at REAL NOT NULL,
            finished_at REAL
        )
        """
    )
    db.execute("CREATE INDEX runs_by_session ON runs(session_id, id)")
    # Only open runs are looked up by status (at every supervisor start).
    db.execute("CREATE INDEX runs_open ON runs(status) WHERE status = 'running'")


def m004_approvals(db: sqlite3.Connection) -> None:
    # `code` is the short id people type; it is unique among pending asks only,
    # so the resolved history kept for `bastion approvals` may repeat one.
    db.execute(
        """
        CREATE TABLE approvals (
            id INTEGER PRIMARY KEY,
            code TEXT NOT NULL,
            session TEXT NOT NULL,
            request_id TEXT NOT NULL,
            call_id TEXT NOT NULL,
            tool TEXT NOT NULL,
            arguments TEXT NOT NULL,
            workspace TEXT NOT NULL,
            policy_hash TEXT NOT NULL,
            reason TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            status TEXT NOT NULL,
            resolved_at REAL
        )
        """
    )
    db.execute("CREATE UNIQUE INDEX approvals_pending_code ON approvals(code) WHERE status = 'pending'")
    db.execute("CREATE INDEX approvals_by_code ON approvals(code, id)")
    # NULL uses_left is unlimited; NULL expires_at lasts until the policy hash changes.
    db.execute(
        """
        CREATE TABLE grants (
            id INTEGER PRIMARY KEY,
            approval_id INTEGER NOT NULL REFERENCES approvals(id) ON DELETE CASCADE,
            tool TEXT NOT NULL,
            arguments TEXT NOT NULL,
            workspace TEXT NOT NULL,
            policy_hash TEXT NOT NULL,
            uses_left INTEGER,
            expires_at REAL,
            created_at REAL NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX grants_by_call ON grants(tool, workspace, policy_hash, arguments)")


def m005_message_reasoning(db: sqlite3.Connection) -> None:
    # An assistant turn's reasoning, kept apart from its content (templates keep or drop it).
    db.execute("ALTER TABLE messages ADD COLUMN reasoning TEXT NOT NULL DEFAULT ''")


MIGRATIONS: tuple[Migration, ...] = (
    m001_sessions,
    m002_messages,
    m003_runs,
    m004_approvals,
    m005_message_reasoning,
)


def migrate(db: sqlite3.Connection, path: Path, migrations: Sequence[Migration] = MIGRATIONS) -> list[str]:
    """Apply the migrations `db` lacks, in order; return the names applied now.

    Refuses (StoreError) a database that records migrations this bastion does
    not know: it was written by a newer version, whose schema this code would
    misread or damage.
    """
    db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    known = [migration.__name__ for migration in migrations]
    _refuse_newer(_applied(db), known, path)
    done: list[str] = []
    for migration, name in zip(migrations, known):
        db.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the write lock: another process may have migrated meanwhile.
            if name not in _applied(db):
                migration(db)
                db.execute("INSERT INTO _migrations (name, applied_at) VALUES (?, ?)", (name, time.time()))
                done.append(name)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
    return done


def _applied(db: sqlite3.Connection) -> set[str]:
    return {row[0] for row in db.execute("SELECT name FROM _migrations")}


def _refuse_newer(applied: set[str], known: list[str], path: Path) -> None:
    unknown = sorted(applied - set(known))
    if unknown:
        raise StoreError(
            f"{path} was written by a newer bastion (schema migrations unknown to this version: "
            f"{', '.join(unknown)}); upgrade bastion to open it, or move the file aside to start afresh"
        )
