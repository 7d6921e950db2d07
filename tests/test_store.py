"""The session store against real SQLite files: sessions, messages, windows, runs, restarts and failures."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion.protocol import ErrorCode, HomeLayout, StopReason
from bastion.protocol.sessions import ChatRole, RunStatus, SessionMessage
from bastion.supervisor.errors import (
    InvalidSessionNameError,
    SessionExistsError,
    StoreError,
    UnknownMessageError,
    UnknownSessionError,
)
from bastion.supervisor.store.migrations import MIGRATIONS, migrate
from bastion.supervisor.store.sessions import MessageKind, SessionStore, database_path

USER, ASSISTANT, TOOL = ChatRole.USER, ChatRole.ASSISTANT, ChatRole.TOOL


class Clock:
    """A clock that ticks one second per reading, so orderings by time are deterministic."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "home" / "bastion.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SessionStore]:
    with SessionStore.open(db_path, clock=Clock()) as opened:
        yield opened


def contents(store: SessionStore, name: str) -> list[str]:
    return [message.content for message in store.messages(name)]


def converse(store: SessionStore, name: str, turns: int) -> list[int]:
    """`turns` user/assistant pairs; returns every seq appended."""
    seqs = []
    for i in range(turns):
        seqs.append(store.append_message(name, USER, f"q{i}"))
        seqs.append(store.append_message(name, ASSISTANT, f"a{i}"))
    return seqs


# -- sessions


def test_database_lives_in_the_home(tmp_path: Path) -> None:
    assert database_path(HomeLayout(tmp_path)) == tmp_path / "bastion.db"


def test_open_creates_the_directory_and_a_private_file(db_path: Path) -> None:
    SessionStore.open(db_path).close()
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600


def test_ensure_session_creates_once_and_keeps_its_model(store: SessionStore) -> None:
    created = store.ensure_session("work", "smollm2")
    again = store.ensure_session("work", "gemma")
    assert (created.name, created.model, created.messages, created.runs) == ("work", "smollm2", 0, 0)
    assert again.model == "smollm2"
    assert again.created_at == created.created_at
    assert store.get_session("missing") is None


def test_list_sessions_puts_the_most_recently_updated_first(store: SessionStore) -> None:
    for name in ("a", "b", "c"):
        store.ensure_session(name, "m")
    assert [s.name for s in store.list_sessions()] == ["c", "b", "a"]
    store.append_message("a", USER, "hello")
    listed = store.list_sessions()
    assert [s.name for s in listed] == ["a", "c", "b"]
    assert listed[0].messages == 1


def test_set_model_changes_the_model(store: SessionStore) -> None:
    store.ensure_session("s", "smollm2")
    store.set_model("s", "gemma")
    assert store.get_session("s").model == "gemma"


def test_delete_removes_the_session_with_its_messages_and_runs(store: SessionStore, db_path: Path) -> None:
    store.ensure_session("s", "m")
    converse(store, "s", 2)
    store.start_run("s", "r1", "m")
    assert store.delete_session("s") is True
    assert store.delete_session("s") is False
    assert store.get_session("s") is None
    raw = sqlite3.connect(db_path)
    assert raw.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
    assert raw.execute("SELECT count(*) FROM runs").fetchone()[0] == 0
    raw.close()


@pytest.mark.parametrize("name", ["a", "A-b_c.1", "x" * 64, "v1.2"])
def test_valid_session_names_are_accepted(store: SessionStore, name: str) -> None:
    assert store.ensure_session(name, "m").name == name


@pytest.mark.parametrize("name", ["", "x" * 65, "a b", "a/b", "..", ".", "é", "a\n", "a;drop"])
def test_invalid_session_names_are_refused_clearly(store: SessionStore, name: str) -> None:
    with pytest.raises(InvalidSessionNameError, match="invalid session name.*letters, digits") as caught:
        store.ensure_session(name, "m")
    assert caught.value.code is ErrorCode.INVALID_REQUEST


def test_a_missing_session_is_a_clear_error(store: SessionStore) -> None:
    for call in (
        lambda: store.append_message("nope", USER, "hi"),
        lambda: store.messages("nope"),
        lambda: store.clear_session("nope"),
        lambda: store.start_run("nope", "r", "m"),
        lambda: store.fork_session("nope", "copy"),
    ):
        with pytest.raises(UnknownSessionError, match="no session named 'nope'"):
            call()
    assert store.get_session("copy") is None


# -- messages


def test_messages_read_back_in_order_with_every_field(store: SessionStore) -> None:
    store.ensure_session("s", "m")
    first = store.append_message("s", USER, "list files")
    second = store.append_message("s", ASSISTANT, '{"name": "ls"}')
    third = store.append_message("s", TOOL, "a.txt", tool_name="ls")
    fourth = store.append_message("s", ASSISTANT, "There is a.t", interrupted=True)
    assert [first, second, third, fourth] == [1, 2, 3, 4]
    messages = store.messages("s")
    assert [m.seq for m in messages] == [1, 2, 3, 4]
    assert [m.role for m in messages] == [USER, ASSISTANT, TOOL, ASSISTANT]
    assert messages[2].tool_name == "ls"
    assert messages[3].interrupted and not messages[2].interrupted
    assert all(m.kind is MessageKind.NORMAL and not m.pinned for m in messages)
    assert messages[0].created_at < messages[3].created_at


def test_to_protocol_carries_what_a_client_sees(store: SessionStore) -> None:
    store.ensure_session("s", "m")
    store.append_message("s", TOOL, "out", tool_name="shell", pinned=True, interrupted=True)
    stored = store.messages("s")[0]
    assert stored.to_protocol() == SessionMessage(
        seq=1, role=TOOL, content="out", tool_name="shell", pinned=True, interrupted=True,
        created_at=stored.created_at,
    )  # fmt: skip


def test_pin_message_and_last_user_seq(store: SessionStore) -> None:
    store.ensure_session("s", "m")
    assert store.last_user_seq("s") is None
    converse(store, "s", 2)
    store.add_note("s", "remember: tabs not spaces")  # a USER-role note is not "the last user message"
    assert store.last_user_seq("s") == 3
    store.pin_message("s", 3)
    assert [m.seq for m in store.messages("s") if m.pinned] == [3, 5]
    store.pin_message("s", 3, pinned=False)
    assert [m.seq for m in store.messages("s") if m.pinned] == [5]
    with pytest.raises(UnknownMessageError, match="no message 99"):
        store.pin_message("s", 99)


def test_pins_and_notes_survive_clear_but_summaries_and_turns_do_not(store: SessionStore) -> None:
    store.ensure_session("s", "m")
    converse(store, "s", 3)
    store.pin_message("s", 1)
    note = store.add_note("s", "the user's name is Ada")
    store.record_summary("s", "they talked about files", replaces_through_seq=4)
    store.clear_session("s")
    kept = store.messages("s")
    assert [(m.seq, m.content) for m in kept] == [(1, "q0"), (note, "the user's name is Ada")]
    assert kept[1].kind is MessageKind.NOTE and kept[1].pinned
    assert store.context_start("s") == 0
    # Seqs are never reused, even for the cleared ones.
    assert store.append_message("s", USER, "again") == note + 2


# -- fork


def test_fork_copies_messages_pins_and_window_and_is_independent(store: SessionStore) -> None:
    store.ensure_session("s", "smollm2")
    converse(store, "s", 3)
    store.pin_message("s", 2)
    store.add_note("s", "note")
    store.set_context_start("s", 5)
    store.start_run("s", "r1", "smollm2")
    fork = store.fork_session("s", "s2")
    assert (fork.name, fork.model, fork.messages, fork.runs) == ("s2", "smollm2", 7, 0)
    assert store.messages("s2") == store.messages("s")
    assert store.context_start("s2") == 5
    store.append_message("s2", USER, "only in the fork")
    store.clear_session("s")
    assert contents(store, "s") == ["a0", "note"]
    assert contents(store, "s2")[-1] == "only in the fork"
    assert len(store.messages("s2")) == 8
    assert store.append_message("s", USER, "x") == 8  # each keeps its own seq counter
    assert store.append_message("s2", USER, "y") == 9


def test_fork_onto_a_taken_name_is_refused(store: SessionStore) -> None:
    store.ensure_session("s", "m")
    store.ensure_session("taken", "m")
    store.append_message("taken", USER, "mine")
    with pytest.raises(SessionExistsError, match="'taken' already exists") as caught:
        store.fork_session("s", "taken")
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    assert contents(store, "taken") == ["mine"]


# -- context window


def test_context_window_keeps_pins_from_before_it(store: SessionStore) -> None:
    store.ensure_session("s", "m")
    converse(store, "s", 3)
    store.pin_message("s", 1)
    store.set_context_start("s", 5)
    assert store.context_start("s") == 5
    assert [m.seq for m in store.context_messages("s")] == [1, 5, 6]
    with pytest.raises(UnknownMessageError):
        store.set_context_start("s", 100)


def test_record_summary_moves_the_window_and_comes_first(store: SessionStore) -> None:
    store.ensure_session("s", "m")
    converse(store, "s", 3)
    seq = store.record_summary("s", "q0..a1 summarised", replaces_through_seq=4)
    assert seq == 7
    assert store.context_start("s") == 5
    summary = store.messages("s")[-1]
    assert (summary.kind, summary.pinned, summary.role) == (MessageKind.SUMMARY, True, ChatRole.SYSTEM)
    assert [m.content for m in store.context_messages("s")] == ["q0..a1 summarised", "q2", "a2"]


def test_record_summary_never_moves_the_window_back(store: SessionStore) -> None:
    store.ensure_session("s", "m")
    converse(store, "s", 3)
    store.set_context_start("s", 6)
    store.record_summary("s", "older turns", replaces_through_seq=2)
    assert store.context_start("s") == 6
    with pytest.raises(UnknownMessageError):
        store.record_summary("s", "future", replaces_through_seq=50)


def test_record_summary_is_one_transaction(store: SessionStore) -> None:
    store.ensure_session("s", "m")
    converse(store, "s", 3)
    # Fail the window update, which runs after the summary row is inserted.
    store._db.execute(
        "CREATE TEMP TRIGGER fail_window BEFORE UPDATE OF context_start ON main.sessions"
        " BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
    )
    with pytest.raises(StoreError, match="injected failure"):
        store.record_summary("s", "summary", replaces_through_seq=4)
    store._db.execute("DROP TRIGGER fail_window")
    assert all(m.kind is MessageKind.NORMAL for m in store.messages("s"))
    assert store.context_start("s") == 0
    assert store.append_message("s", USER, "next") == 7  # the failed summary did not consume a seq


# -- runs


def test_runs_start_finish_and_refuse_a_second_finish(store: SessionStore) -> None:
    store.ensure_session("s", "m")
    run_id = store.start_run("s", "req-1", "smollm2")
    (running,) = store.runs("s")
    assert (running.run_id, running.status, running.stop_reason, running.finished_at) == (
        run_id, RunStatus.RUNNING, None, None,
    )  # fmt: skip
    store.finish_run(run_id, StopReason.STOP, prompt_tokens=120, cached_tokens=100, completion_tokens=8)
    (done,) = store.runs("s")
    assert (done.status, done.stop_reason, done.request_id, done.model) == (
        RunStatus.FINISHED, StopReason.STOP, "req-1", "smollm2",
    )  # fmt: skip
    assert (done.prompt_tokens, done.cached_tokens, done.completion_tokens) == (120, 100, 8)
    assert done.finished_at >= done.started_at
    with pytest.raises(StoreError, match="not open"):
        store.finish_run(run_id, StopReason.ERROR)
    assert store.get_session("s").runs == 1


def test_interrupt_unfinished_runs_marks_only_open_ones(store: SessionStore) -> None:
    store.ensure_session("s", "m")
    finished = store.start_run("s", "r1", "m")
    store.finish_run(finished, StopReason.CANCELLED)
    store.start_run("s", "r2", "m")
    store.start_run("s", "r3", "m")
    assert store.interrupt_unfinished_runs() == 2
    statuses = [run.status for run in store.runs("s")]
    assert statuses == [RunStatus.FINISHED, RunStatus.INTERRUPTED, RunStatus.INTERRUPTED]
    assert store.interrupt_unfinished_runs() == 0


# -- restarts


def test_a_second_store_on_the_same_file_sees_everything(db_path: Path) -> None:
    first = SessionStore.open(db_path)
    first.ensure_session("s", "m")
    converse(first, "s", 2)
    first.add_note("s", "note")
    first.start_run("s", "r1", "m")
    # No close: the first store is simply abandoned, as by a crashing supervisor.
    second = SessionStore.open(db_path)
    assert contents(second, "s") == ["q0", "a0", "q1", "a1", "note"]
    assert second.get_session("s").runs == 1
    second.close()
    first.close()


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from bastion.protocol.sessions import ChatRole
    from bastion.supervisor.store.sessions import SessionStore

    store = SessionStore.open(Path(sys.argv[1]))
    store.ensure_session("s", "m")
    for i in range(50):
        store.append_message("s", ChatRole.USER, f"m{i}")
    store.append_message("s", ChatRole.ASSISTANT, "half a rep", interrupted=True)
    store.start_run("s", "r1", "m")
    print("committed", flush=True)
    time.sleep(120)
    """
)


@pytest.mark.e2e
def test_committed_data_survives_a_killed_supervisor(db_path: Path) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(db_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "committed"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL
    with SessionStore.open(db_path) as reopened:
        messages = reopened.messages("s")
        assert [m.content for m in messages[:50]] == [f"m{i}" for i in range(50)]
        assert messages[-1].interrupted and messages[-1].content == "half a rep"
        assert reopened.interrupt_unfinished_runs() == 1
        assert reopened.runs("s")[0].status is RunStatus.INTERRUPTED


def test_wal_mode_and_pragmas_are_on(store: SessionStore, db_path: Path) -> None:
    raw = sqlite3.connect(db_path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent in the file
    raw.close()
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert store._db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert store._db.execute("PRAGMA busy_timeout").fetchone()[0] == 5000


# -- migrations


def test_migrations_apply_once_and_reopening_is_idempotent(db_path: Path) -> None:
    SessionStore.open(db_path).close()
    with SessionStore.open(db_path) as store:
        store.ensure_session("s", "m")
    with SessionStore.open(db_path) as store:
        assert store.get_session("s") is not None
    raw = sqlite3.connect(db_path, isolation_level=None)
    names = [row[0] for row in raw.execute("SELECT name FROM _migrations ORDER BY rowid")]
    assert names == [migration.__name__ for migration in MIGRATIONS]
    assert migrate(raw, db_path) == []
    raw.close()


def test_a_failing_migration_leaves_nothing_behind(tmp_path: Path) -> None:
    def m001_good(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE good (x)")

    def m002_bad(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE half_done (x)")
        raise RuntimeError("broken migration")

    raw = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    with pytest.raises(RuntimeError):
        migrate(raw, tmp_path / "m.db", [m001_good, m002_bad])
    tables = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "good" in tables and "half_done" not in tables
    assert [row[0] for row in raw.execute("SELECT name FROM _migrations")] == ["m001_good"]
    raw.close()


def test_a_database_from_a_newer_bastion_is_refused(db_path: Path) -> None:
    SessionStore.open(db_path).close()
    raw = sqlite3.connect(db_path)
    with raw:
        raw.execute("INSERT INTO _migrations (name, applied_at) VALUES ('m999_from_the_future', 0)")
    raw.close()
    with pytest.raises(StoreError, match="newer bastion.*m999_from_the_future.*upgrade bastion"):
        SessionStore.open(db_path)


# -- failures


def test_a_file_that_is_not_a_database_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is a text file, certainly not SQLite\n" * 100)
    with pytest.raises(StoreError, match="not a bastion database") as caught:
        SessionStore.open(db_path)
    assert str(db_path) in caught.value.message and "move it aside" in caught.value.message
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)


def test_disk_full_is_translated_and_writes_nothing(store: SessionStore, db_path: Path) -> None:
    store.ensure_session("s", "m")
    converse(store, "s", 2)
    store.pin_message("s", 1)
    store.append_message("s", TOOL, "y" * 50_000, tool_name="cat")  # so that a fork needs many pages
    before = store.messages("s")
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages + 2}")  # SQLite answers SQLITE_FULL past this
    big = "x" * 200_000
    failing = (
        lambda: store.append_message("s", ASSISTANT, big),
        lambda: store.record_summary("s", big, replaces_through_seq=2),
        lambda: store.fork_session("s", "copy"),
    )
    for call in failing:
        with pytest.raises(StoreError) as caught:
            call()
        assert caught.value.message == f"disk full: free space in {db_path.parent}; nothing was written"
    assert store.messages("s") == before
    assert store.context_start("s") == 0
    assert store.get_session("copy") is None
    store._db.execute("PRAGMA max_page_count = 1073741823")
    assert store.append_message("s", USER, "room again") == 6


def test_a_lock_held_past_the_busy_timeout_is_translated(db_path: Path) -> None:
    with SessionStore.open(db_path, busy_timeout=0.1) as store:
        store.ensure_session("s", "m")
        other = sqlite3.connect(db_path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match="locked by another process.*nothing was written"):
            store.append_message("s", USER, "blocked")
        other.execute("ROLLBACK")
        other.close()
        assert store.append_message("s", USER, "free") == 1


def test_a_closed_store_raises_store_error(db_path: Path) -> None:
    store = SessionStore.open(db_path)
    store.close()
    with pytest.raises(StoreError):
        store.list_sessions()


def test_an_unopenable_path_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot open the session database"):
        SessionStore.open(blocker / "bastion.db")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_a_read_only_database_is_a_store_error(db_path: Path) -> None:
    SessionStore.open(db_path).close()
    db_path.chmod(0o400)
    try:
        with pytest.raises(StoreError):
            SessionStore.open(db_path)
    finally:
        db_path.chmod(0o600)
