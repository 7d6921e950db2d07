"""The session store: sessions, their messages, context windows and runs, in SQLite.

Owns the database file `bastion.db` in the bastion home and every row in it. The
supervisor opens one `SessionStore` (it is the only writer) and uses it from its
asyncio event loop thread only: each call is one short local transaction, so it
runs inline instead of in an executor, and sqlite3's same-thread check turns a
call from another thread into an error rather than a race.

Every mutating call is one `BEGIN IMMEDIATE` transaction: it happens entirely or
not at all. sqlite3 errors are translated here, at the boundary, into
`StoreError`s that say what to do (disk full, locked, not a database).

    StoreError                   errors.py: the database cannot be used as asked
    ├── InvalidSessionNameError  not 1-64 of letters, digits, '-', '_', '.'
    ├── UnknownSessionError      no session by that name
    ├── SessionExistsError       a fork's new name is taken
    └── UnknownMessageError      no message with that seq in the session

The context window: messages with seq below a session's `context_start` are out
of the prompt, except pinned ones (user pins, notes, summaries). The schema lives
in migrations.py; this module must not create or alter tables.
"""

from __future__ import annotations

import enum
import re
import sqlite3
from pathlib import Path
from typing import cast

import msgspec

from bastion.protocol import HomeLayout, StopReason
from bastion.protocol.sessions import ChatRole, RunStatus, SessionMessage, SessionSummary
from bastion.supervisor.errors import (
    InvalidSessionNameError,
    SessionExistsError,
    StoreError,
    UnknownMessageError,
    UnknownSessionError,
)
from bastion.supervisor.store.database import SqliteStore

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def database_path(layout: HomeLayout) -> Path:
    return layout.root / "bastion.db"


class MessageKind(enum.Enum):
    NORMAL = "normal"
    NOTE = "note"  # text the user pinned; not a turn of the conversation
    SUMMARY = "summary"  # stands in for turns folded out of the context window


class StoredMessage(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    role: ChatRole
    content: str
    tool_name: str = ""
    pinned: bool = False
    interrupted: bool = False  # a partial reply kept after a cancel or a crash
    kind: MessageKind = MessageKind.NORMAL
    created_at: float = 0.0
    reasoning: str = ""  # an assistant turn's reasoning, apart from its content

    def to_protocol(self) -> SessionMessage:
        return SessionMessage(
            seq=self.seq, role=self.role, content=self.content, tool_name=self.tool_name,
            pinned=self.pinned, interrupted=self.interrupted, created_at=self.created_at, reasoning=self.reasoning,
        )  # fmt: skip


class StoredRun(msgspec.Struct, frozen=True, kw_only=True):
    run_id: int
    request_id: str
    model: str
    status: RunStatus
    stop_reason: StopReason | None  # None while running and for interrupted runs
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    started_at: float
    finished_at: float | None


class _Session(msgspec.Struct, frozen=True):
    id: int
    next_seq: int
    context_start: int


_SUMMARY_SQL = """
    SELECT s.name, s.model, s.created_at, s.updated_at,
           (SELECT count(*) FROM messages m WHERE m.session_id = s.id),
           (SELECT count(*) FROM runs r WHERE r.session_id = s.id),
           (SELECT r.status FROM runs r WHERE r.session_id = s.id ORDER BY r.id DESC LIMIT 1)
    FROM sessions s
"""
_MESSAGE_COLUMNS = "seq, role, content, tool_name, pinned, interrupted, kind, created_at, reasoning"
_RUN_COLUMNS = (
    "id, request_id, model, status, stop_reason, prompt_tokens, cached_tokens, completion_tokens,"
    " started_at, finished_at"
)


class SessionStore(SqliteStore):
    """Sessions, their messages and runs."""

    # -- sessions

    def ensure_session(self, name: str, model: str) -> SessionSummary:
        """The session called `name`, created for `model` if missing (an existing one keeps its model)."""
        _check_name(name)
        with self._write() as db:
            now = self._clock()
            db.execute(
                "INSERT INTO sessions (name, model, created_at, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (name) DO NOTHING",
                (name, model, now, now),
            )
        return self._summary(name)

    def get_session(self, name: str) -> SessionSummary | None:
        _check_name(name)
        with self._translated():
            row = self._db.execute(_SUMMARY_SQL + " WHERE s.name = ?", (name,)).fetchone()
        return None if row is None else _summary(row)

    def list_sessions(self) -> list[SessionSummary]:
        """Every session, the most recently updated first."""
        with self._translated():
            rows = self._db.execute(_SUMMARY_SQL + " ORDER BY s.updated_at DESC, s.id DESC").fetchall()
        return [_summary(row) for row in rows]

    def set_model(self, name: str, model: str) -> None:
        with self._write() as db:
            session = self._touch(db, name)
            db.execute("UPDATE sessions SET model = ? WHERE id = ?", (model, session.id))

    def delete_session(self, name: str) -> bool:
        """Delete a session with its messages and runs; False if there was none."""
        _check_name(name)
        with self._write() as db:
            return db.execute("DELETE FROM sessions WHERE name = ?", (name,)).rowcount > 0

    def fork_session(self, name: str, new_name: str) -> SessionSummary:
        """A new session with a copy of `name`'s messages, pins and context window (not its runs)."""
        _check_name(new_name)
        with self._write() as db:
            source = self._session(name)
            if db.execute("SELECT 1 FROM sessions WHERE name = ?", (new_name,)).fetchone():
                raise SessionExistsError(f"cannot fork {name!r}: a session named {new_name!r} already exists")
            now = self._clock()
            fork_id = db.execute(
                "INSERT INTO sessions (name, model, context_start, next_seq, created_at, updated_at)"
                " SELECT ?, model, context_start, next_seq, ?, ? FROM sessions WHERE id = ?",
                (new_name, now, now, source.id),
            ).lastrowid
            db.execute(
                f"INSERT INTO messages (session_id, {_MESSAGE_COLUMNS})"
                f" SELECT ?, {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ?",
                (fork_id, source.id),
            )
        return self._summary(new_name)

    def clear_session(self, name: str) -> None:
        """Forget the conversation: drop unpinned messages and summaries, keep pins and notes.

        Summaries go too, although pinned: they are the conversation being forgotten.
        """
        with self._write() as db:
            session = self._touch(db, name)
            db.execute(
                "DELETE FROM messages WHERE session_id = ? AND (pinned = 0 OR kind = ?)",
                (session.id, MessageKind.SUMMARY.value),
            )
            db.execute("UPDATE sessions SET context_start = 0 WHERE id = ?", (session.id,))

    # -- messages

    def append_message(
        self,
        name: str,
        role: ChatRole,
        content: str,
        *,
        tool_name: str = "",
        pinned: bool = False,
        interrupted: bool = False,
        kind: MessageKind = MessageKind.NORMAL,
        reasoning: str = "",
    ) -> int:
        """Append a message; return its seq (increasing per session, never reused)."""
        message = StoredMessage(
            seq=0, role=role, content=content, tool_name=tool_name, pinned=pinned, interrupted=interrupted,
            kind=kind, created_at=self._clock(), reasoning=reasoning,
        )  # fmt: skip
        with self._write() as db:
            return self._insert(db, self._touch(db, name), message)

    def add_note(self, name: str, text: str) -> int:
        """Pin `text` as a note. Role USER: every chat template accepts a user turn anywhere."""
        return self.append_message(name, ChatRole.USER, text, pinned=True, kind=MessageKind.NOTE)

    def messages(self, name: str) -> list[StoredMessage]:
        """All of the session's messages in seq order, in the window or not."""
        session = self._session(name)
        with self._translated():
            rows = self._db.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? ORDER BY seq", (session.id,)
            ).fetchall()
        return [_message(row) for row in rows]

    def context_messages(self, name: str) -> list[StoredMessage]:
        """What belongs in the next prompt, in prompt order.

        First the pinned messages from before the window and every summary (a
        summary stands for turns before the window, whatever its own seq), then
        the window itself; each part in seq order.
        """
        start = self.context_start(name)

        def before_window(message: StoredMessage) -> bool:
            return message.seq < start or message.kind is MessageKind.SUMMARY

        chosen = [m for m in self.messages(name) if m.seq >= start or m.pinned]
        return sorted(chosen, key=lambda m: (not before_window(m), m.seq))

    def pin_message(self, name: str, seq: int, *, pinned: bool = True) -> None:
        with self._write() as db:
            session = self._touch(db, name)
            changed = db.execute(
                "UPDATE messages SET pinned = ? WHERE session_id = ? AND seq = ?", (pinned, session.id, seq)
            ).rowcount
            if not changed:
                raise UnknownMessageError(f"session {name!r} has no message {seq}")

    def last_user_seq(self, name: str) -> int | None:
        """The seq of the last message the user typed (notes excluded), or None."""
        session = self._session(name)
        with self._translated():
            row = self._db.execute(
                "SELECT max(seq) FROM messages WHERE session_id = ? AND role = ? AND kind = ?",
                (session.id, ChatRole.USER.value, MessageKind.NORMAL.value),
            ).fetchone()
        return row[0]

    # -- context window

    def context_start(self, name: str) -> int:
        return self._session(name).context_start

    def set_context_start(self, name: str, seq: int) -> None:
        with self._write() as db:
            session = self._touch(db, name)
            if not 0 <= seq <= session.next_seq:
                raise UnknownMessageError(f"session {name!r} has no seq {seq} to start its context window at")
            db.execute("UPDATE sessions SET context_start = ? WHERE id = ?", (seq, session.id))

    def record_summary(self, name: str, text: str, replaces_through_seq: int) -> int:
        """Store a pinned summary of the turns up to `replaces_through_seq` and move the window past them.

        One transaction: a prompt never loses the turns without gaining their summary.
        Returns the summary's seq. The window never moves backwards.
        """
        message = StoredMessage(
            seq=0, role=ChatRole.SYSTEM, content=text, pinned=True, kind=MessageKind.SUMMARY,
            created_at=self._clock(),
        )  # fmt: skip
        with self._write() as db:
            session = self._touch(db, name)
            if not 0 < replaces_through_seq < session.next_seq:
                raise UnknownMessageError(
                    f"session {name!r} has no message {replaces_through_seq} to summarise"
                )
            seq = self._insert(db, session, message)
            start = max(session.context_start, replaces_through_seq + 1)
            db.execute("UPDATE sessions SET context_start = ? WHERE id = ?", (start, session.id))
        return seq

    # -- runs

    def start_run(self, name: str, request_id: str, model: str) -> int:
        with self._write() as db:
            session = self._touch(db, name)
            cursor = db.execute(
                "INSERT INTO runs (session_id, request_id, model, status, started_at) VALUES (?, ?, ?, ?, ?)",
                (session.id, request_id, model, RunStatus.RUNNING.value, self._clock()),
            )
            return cast(int, cursor.lastrowid)  # set by every INSERT

    def finish_run(
        self, run_id: int, stop_reason: StopReason, *, prompt_tokens: int = 0, cached_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:  # fmt: skip
        with self._write() as db:
            changed = db.execute(
                "UPDATE runs SET status = ?, stop_reason = ?, prompt_tokens = ?, cached_tokens = ?,"
                " completion_tokens = ?, finished_at = ? WHERE id = ? AND status = ?",
                (RunStatus.FINISHED.value, stop_reason.value, prompt_tokens, cached_tokens, completion_tokens,
                 self._clock(), run_id, RunStatus.RUNNING.value),
            ).rowcount  # fmt: skip
            if not changed:
                raise StoreError(f"run {run_id} is not open (unknown, already finished or interrupted)")

    def interrupt_unfinished_runs(self) -> int:
        """Mark runs left open by a supervisor that died as interrupted; return how many.

        Call once at supervisor start, before any run begins.
        """
        with self._write() as db:
            return db.execute(
                "UPDATE runs SET status = ?, finished_at = ? WHERE status = ?",
                (RunStatus.INTERRUPTED.value, self._clock(), RunStatus.RUNNING.value),
            ).rowcount

    def runs(self, name: str) -> list[StoredRun]:
        """The session's runs, oldest first."""
        session = self._session(name)
        with self._translated():
            rows = self._db.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE session_id = ? ORDER BY id", (session.id,)
            ).fetchall()
        return [_run(row) for row in rows]

    # -- plumbing

    def _session(self, name: str) -> _Session:
        _check_name(name)
        with self._translated():
            row = self._db.execute(
                "SELECT id, next_seq, context_start FROM sessions WHERE name = ?", (name,)
            ).fetchone()
        if row is None:
            raise UnknownSessionError(f"no session named {name!r}")
        return _Session(*row)

    def _touch(self, db: sqlite3.Connection, name: str) -> _Session:
        session = self._session(name)
        db.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (self._clock(), session.id))
        return session

    def _insert(self, db: sqlite3.Connection, session: _Session, message: StoredMessage) -> int:
        # `session` was read in this transaction, so its next_seq is current.
        seq = session.next_seq
        db.execute("UPDATE sessions SET next_seq = ? WHERE id = ?", (seq + 1, session.id))
        db.execute(
            f"INSERT INTO messages (session_id, {_MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (session.id, seq, message.role.value, message.content, message.tool_name, message.pinned,
             message.interrupted, message.kind.value, message.created_at, message.reasoning),
        )  # fmt: skip
        return seq

    def _summary(self, name: str) -> SessionSummary:
        summary = self.get_session(name)
        if summary is None:
            raise UnknownSessionError(f"no session named {name!r}")
        return summary


def _check_name(name: str) -> None:
    # Names also name files (KV snapshots), so all-dot names like '..' are refused too.
    if not _NAME.fullmatch(name) or set(name) == {"."}:
        raise InvalidSessionNameError(
            f"invalid session name {name!r}: use 1-64 letters, digits, '-', '_' or '.' (not only dots)"
        )


def _summary(row: tuple) -> SessionSummary:
    name, model, created_at, updated_at, messages, runs, last_run = row
    return SessionSummary(
        name=name, model=model, created_at=created_at, updated_at=updated_at, messages=messages, runs=runs,
        last_run=RunStatus(last_run) if last_run else None,
    )


def _message(row: tuple) -> StoredMessage:
    seq, role, content, tool_name, pinned, interrupted, kind, created_at, reasoning = row
    return StoredMessage(
        seq=seq, role=ChatRole(role), content=content, tool_name=tool_name, pinned=bool(pinned),
        interrupted=bool(interrupted), kind=MessageKind(kind), created_at=created_at, reasoning=reasoning,
    )  # fmt: skip


def _run(row: tuple) -> StoredRun:
    run_id, request_id, model, status, stop_reason, prompt, cached, completion, started_at, finished_at = row
    return StoredRun(
        run_id=run_id, request_id=request_id, model=model, status=RunStatus(status),
        stop_reason=None if stop_reason is None else StopReason(stop_reason), prompt_tokens=prompt,
        cached_tokens=cached, completion_tokens=completion, started_at=started_at, finished_at=finished_at,
    )  # fmt: skip
