"""Approvals against a real session database: asks, grants bound to one exact call, time limits,
use counts, denials, waits that run out, and a restart."""

from __future__ import annotations

import contextlib
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion.protocol import ErrorCode
from bastion.protocol.sandbox_wire import ShellArgs
from bastion.protocol.sessions import ChatRole
from bastion.supervisor.errors import ApprovalError
from bastion.supervisor.store.migrations import MIGRATIONS
from bastion.supervisor.store.sessions import SessionStore
from bastion.supervisor.trust import approvals
from bastion.supervisor.trust.approvals import (
    ApprovalStatus,
    ApprovalStore,
    PendingApproval,
    canonical_arguments,
)

ARGS = canonical_arguments({"command": "make test"})
WORKSPACE = "/work/project"
POLICY = "a" * 64


class Clock:
    """A clock the test sets."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "home" / "bastion.db"


@pytest.fixture
def store(db_path: Path, clock: Clock) -> Iterator[ApprovalStore]:
    with ApprovalStore.open(db_path, clock=clock) as opened:
        yield opened


def ask(store: ApprovalStore, *, arguments: str = ARGS, wait_s: float = 300) -> PendingApproval:
    return store.create_ask(
        session="main", request_id="r1", call_id="c1", tool="shell", arguments=arguments, workspace=WORKSPACE,
        policy_hash=POLICY, wait_s=wait_s, reason="policy.toml:4 asks for make",
    )  # fmt: skip


def find(store: ApprovalStore, now: float, *, tool: str = "shell", arguments: str = ARGS,
         workspace: str = WORKSPACE, policy: str = POLICY):  # fmt: skip
    return store.find_grant(tool, arguments, workspace, policy, now)


# -- canonical arguments


def test_canonical_arguments_are_sorted_and_compact() -> None:
    assert (
        canonical_arguments({"b": 1, "a": {"d": [1, 2], "c": "x y"}}) == '{"a":{"c":"x y","d":[1,2]},"b":1}'
    )
    assert canonical_arguments({"a": 1, "b": 2}) == canonical_arguments({"b": 2, "a": 1})
    assert canonical_arguments(ShellArgs(command="ls")) == '{"command":"ls","timeout_s":null,"tool":"shell"}'


# -- asks


def test_an_ask_is_pending_with_a_short_id(store: ApprovalStore, clock: Clock) -> None:
    pending = ask(store)
    assert re.fullmatch(r"[0-9a-f]{8}", pending.id)
    assert (pending.status, pending.created_at, pending.expires_at) == (
        ApprovalStatus.PENDING,
        1000.0,
        1300.0,
    )
    assert store.pending() == [pending]
    assert store.get(pending.id) == pending


def test_pending_ids_never_collide(store: ApprovalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = iter(["deadbeef", "deadbeef", "0badf00d"])
    monkeypatch.setattr(approvals.secrets, "token_hex", lambda n: next(drawn))
    assert [ask(store).id, ask(store).id] == ["deadbeef", "0badf00d"]


def test_a_resolved_id_may_be_drawn_again(store: ApprovalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(approvals.secrets, "token_hex", lambda n: "deadbeef")
    store.resolve(ask(store).id, False)
    again = ask(store)
    assert again.id == "deadbeef" and store.get("deadbeef") == again


# -- approving: a grant for exactly that call


def test_an_approval_grants_the_same_call_only(store: ApprovalStore, clock: Clock) -> None:
    resolution = store.resolve(ask(store).id, True)
    grant = resolution.grant
    assert resolution.approval.status is ApprovalStatus.APPROVED and grant is not None
    assert (grant.uses_left, grant.expires_at) == (None, None)
    assert store.pending() == []
    assert find(store, clock.now) == grant
    assert find(store, clock.now, arguments=canonical_arguments({"command": "make test; rm -rf /"})) is None
    assert find(store, clock.now, workspace="/work/other") is None
    assert find(store, clock.now, policy="b" * 64) is None  # the policy changed
    assert find(store, clock.now, tool="write_file") is None


def test_a_grant_expires_after_its_ttl(store: ApprovalStore, clock: Clock) -> None:
    grant = store.resolve(ask(store).id, True, ttl_s=60).grant
    assert grant is not None and grant.expires_at == 1060.0
    assert find(store, 1059.9) == grant
    assert find(store, 1060.0) is None
    assert not store.consume(grant, 1060.0)
    assert store.grants(1060.0) == []


def test_a_grant_covers_only_its_uses(store: ApprovalStore, clock: Clock) -> None:
    grant = store.resolve(ask(store).id, True, uses=2).grant
    assert grant is not None
    assert store.consume(grant, clock.now)  # the call that waited
    left = find(store, clock.now)
    assert left is not None and left.uses_left == 1
    assert store.consume(left, clock.now)
    assert find(store, clock.now) is None
    assert not store.consume(grant, clock.now)  # a stale copy spends nothing


def test_an_unlimited_grant_is_never_used_up(store: ApprovalStore, clock: Clock) -> None:
    grant = store.resolve(ask(store).id, True).grant
    assert grant is not None
    assert all(store.consume(grant, clock.now) for _ in range(50))
    assert find(store, clock.now) == grant


def test_consuming_is_atomic_across_connections(db_path: Path, store: ApprovalStore, clock: Clock) -> None:
    grant = store.resolve(ask(store).id, True, uses=1).grant
    assert grant is not None
    with ApprovalStore.open(db_path, clock=clock) as other:
        seen = find(other, clock.now)
        assert seen == grant
        assert [store.consume(grant, clock.now), other.consume(seen, clock.now)] == [True, False]


def test_bad_ttl_or_uses_are_refused(store: ApprovalStore) -> None:
    pending = ask(store)
    for terms in ({"ttl_s": 0}, {"ttl_s": -5.0}, {"uses": 0}):
        with pytest.raises(ApprovalError):
            store.resolve(pending.id, True, **terms)
    assert store.pending() == [pending]
    with pytest.raises(ApprovalError, match="positive"):
        ask(store, wait_s=0)


# -- denying, unknown ids, waits that run out


def test_a_denial_grants_nothing(store: ApprovalStore, clock: Clock) -> None:
    pending = ask(store)
    resolution = store.resolve(pending.id, False)
    assert resolution.approval.status is ApprovalStatus.DENIED and resolution.grant is None
    assert resolution.approval.resolved_at == clock.now
    assert find(store, clock.now) is None and store.pending() == []
    with pytest.raises(ApprovalError, match="no longer pending: it was denied") as again:
        store.resolve(pending.id, True)
    assert again.value.code is ErrorCode.INVALID_REQUEST


def test_an_unknown_id_is_refused(store: ApprovalStore) -> None:
    with pytest.raises(ApprovalError, match="no approval 'nope'"):
        store.resolve("nope", True)


def test_waits_expire(store: ApprovalStore, clock: Clock) -> None:
    early = ask(store, wait_s=10)
    late = ask(store, wait_s=100)
    assert store.expire_waits(1009.9) == []
    expired = store.expire_waits(1010.0)
    assert [(a.id, a.status, a.resolved_at) for a in expired] == [(early.id, ApprovalStatus.EXPIRED, 1010.0)]
    assert store.pending() == [late]
    with pytest.raises(ApprovalError, match="it was expired"):
        store.resolve(early.id, True)


def test_an_answer_after_the_deadline_is_too_late(store: ApprovalStore, clock: Clock) -> None:
    pending = ask(store, wait_s=10)
    clock.now = 1010.0  # nobody swept yet
    resolution = store.resolve(pending.id, True, uses=1)
    assert resolution.approval.status is ApprovalStatus.EXPIRED and resolution.grant is None
    assert find(store, clock.now) is None


# -- persistence and the shared database


def test_asks_and_grants_survive_a_reopen(db_path: Path, store: ApprovalStore, clock: Clock) -> None:
    waiting = ask(store, arguments=canonical_arguments({"command": "make lint"}))
    grant = store.resolve(ask(store).id, True, ttl_s=3600, uses=3).grant
    assert grant is not None and store.consume(grant, clock.now)
    store.close()
    with ApprovalStore.open(db_path, clock=clock) as reopened:
        assert reopened.pending() == [waiting]
        found = find(reopened, clock.now + 10)
        assert found is not None and (found.id, found.uses_left, found.expires_at) == (grant.id, 2, 4600.0)


def test_lives_beside_the_session_store(db_path: Path, clock: Clock) -> None:
    with SessionStore.open(db_path) as sessions, ApprovalStore.open(db_path, clock=clock) as store:
        sessions.ensure_session("main", "smollm2")
        pending = ask(store)
        sessions.append_message("main", ChatRole.USER, "hi")
        assert store.pending() == [pending]
        assert len(sessions.messages("main")) == 1
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        applied = [row[0] for row in db.execute("SELECT name FROM _migrations ORDER BY rowid")]
    assert applied == [migration.__name__ for migration in MIGRATIONS]
    assert "m004_approvals" in applied


def test_expiring_one_ask_leaves_the_others_pending(tmp_path: Path) -> None:
    store = ApprovalStore.open(tmp_path / "a.db", clock=lambda: 1000.0)
    first = store.create_ask(session="s", request_id="r1", call_id="c", tool="write_file", arguments="{}",
                             workspace="/w", policy_hash="h", wait_s=300)
    second = store.create_ask(session="t", request_id="r2", call_id="c", tool="write_file", arguments="{}",
                              workspace="/w", policy_hash="h", wait_s=300)
    assert store.expire(first.id, 1001.0)
    assert not store.expire(first.id, 1002.0)  # no longer pending
    assert [ask.id for ask in store.pending()] == [second.id]
    assert store.get(first.id).status is ApprovalStatus.EXPIRED  # type: ignore[union-attr]
