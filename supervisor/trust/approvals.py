"""Approvals: asks waiting for a person, and the grants their approval creates.

Owns the `approvals` and `grants` tables of the session database (created by
`m004_approvals` in migrations.py) and every row in them. It decides nothing:
policy says when to ask, the gate waits and enforces; this module remembers.

An ask (`PendingApproval`) is created when policy says "ask"; it has a short
id people type (8 hex digits, unique among pending asks) and a deadline for the
wait. Resolving it approves or denies; a wait past its deadline is expired,
which the gate must treat as a deny. Approving creates a `Grant` bound to the
tool, the canonical arguments, the workspace and the policy hash: a different
call, another workspace or a changed policy never matches it. A grant may carry
a time limit (`ttl_s`; None lasts until the policy changes) and a use count
(`uses`; None is unlimited). The waiting call is not exempt: the gate consumes
one use for it like for any later identical call.

Concurrency: the supervisor is the only writer and calls this from its event
loop thread. Every mutating call is one `BEGIN IMMEDIATE` transaction, and
`consume` decrements in a single guarded UPDATE, so even a second writer could
never spend a use twice or spend an expired grant.

The connection: `ApprovalStore(db, ...)` takes any autocommit-mode connection
to the session database, e.g. the one `SessionStore` uses. `ApprovalStore.open`
opens a second connection to the same file instead (WAL lets readers and the
one-at-a-time writers of both coexist), because `SessionStore` does not expose
its own.
"""

from __future__ import annotations

import enum
import secrets
import sqlite3
from typing import cast

import msgspec

from bastion.supervisor.errors import ApprovalError

# Private to store/sessions.py, reused rather than copied so both stores open the file
# alike and say the same things about a full disk or a locked database.
from bastion.supervisor.store.database import SqliteStore

_ENCODER = msgspec.json.Encoder(order="sorted")
_ID_ATTEMPTS = 16


class ApprovalStatus(enum.Enum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"  # nobody answered in time: a deny


class PendingApproval(msgspec.Struct, frozen=True, kw_only=True):
    """An ask, from the moment policy asked until (and after) it was resolved."""

    id: str  # 8 hex digits; unique among pending asks only
    session: str
    request_id: str
    call_id: str
    tool: str
    arguments: str  # canonical JSON (`canonical_arguments`)
    workspace: str
    policy_hash: str
    reason: str  # why policy asks, shown to whoever answers
    created_at: float
    expires_at: float  # the wait's deadline
    status: ApprovalStatus = ApprovalStatus.PENDING
    resolved_at: float | None = None


class Grant(msgspec.Struct, frozen=True, kw_only=True):
    """Permission to run exactly one (tool, arguments, workspace, policy) call, maybe limited."""

    id: int
    approval_id: str
    tool: str
    arguments: str
    workspace: str
    policy_hash: str
    uses_left: int | None  # None: unlimited
    expires_at: float | None  # None: until the policy changes (its hash stops matching)
    created_at: float


class Resolution(msgspec.Struct, frozen=True, kw_only=True):
    """What resolving did: `approval.status` is approved, denied or (too late) expired."""

    approval: PendingApproval
    grant: Grant | None  # only when approved


def canonical_arguments(args: object) -> str:
    """A stable JSON text for a call's arguments: keys sorted at every depth, no whitespace.

    Equal values give equal text, so it can be compared and hashed. Canonicalise
    one kind of value consistently: a typed argument Struct (which includes its
    tool tag and defaults) and the dict it was decoded from give different texts.
    """
    return _ENCODER.encode(args).decode()


_APPROVAL_COLUMNS = (
    "code, session, request_id, call_id, tool, arguments, workspace, policy_hash, reason, created_at,"
    " expires_at, status, resolved_at"
)
_GRANT_COLUMNS = (
    "g.id, a.code, g.tool, g.arguments, g.workspace, g.policy_hash, g.uses_left, g.expires_at, g.created_at"
)
_GRANT_FROM = "grants g JOIN approvals a ON a.id = g.approval_id"
# A grant still usable at time ?: not used up and not past its time limit.
_LIVE = "(g.uses_left IS NULL OR g.uses_left > 0) AND (g.expires_at IS NULL OR g.expires_at > ?)"


class ApprovalStore(SqliteStore):
    """Pending asks and the grants approvals leave, in the supervisor's database."""

    # -- asks

    def create_ask(
        self, *, session: str, request_id: str, call_id: str, tool: str, arguments: str, workspace: str,
        policy_hash: str, wait_s: float, reason: str = "",
    ) -> PendingApproval:  # fmt: skip
        """Record an ask that waits at most `wait_s` seconds for an answer."""
        if not wait_s > 0:
            raise ApprovalError(f"an approval wait must be positive, not {wait_s}s")
        now = self._clock()
        ask = PendingApproval(
            id="", session=session, request_id=request_id, call_id=call_id, tool=tool, arguments=arguments,
            workspace=workspace, policy_hash=policy_hash, reason=reason, created_at=now,
            expires_at=now + wait_s,
        )  # fmt: skip
        with self._write() as db:
            for _ in range(_ID_ATTEMPTS):
                ask = msgspec.structs.replace(ask, id=secrets.token_hex(4))
                try:
                    db.execute(
                        f"INSERT INTO approvals ({_APPROVAL_COLUMNS}) VALUES ({', '.join('?' * 13)})",
                        _approval_row(ask),
                    )
                except sqlite3.IntegrityError:
                    continue  # the id is taken by another pending ask: draw again
                return ask
        raise ApprovalError(f"could not draw an unused approval id in {_ID_ATTEMPTS} attempts")

    def pending(self) -> list[PendingApproval]:
        """Asks still waiting, oldest first (including any past their deadline until `expire_waits`)."""
        return self._asks("status = ? ORDER BY id", (ApprovalStatus.PENDING.value,))

    def get(self, approval_id: str) -> PendingApproval | None:
        """The most recent ask with this id, whatever its status."""
        found = self._asks("code = ? ORDER BY id DESC LIMIT 1", (approval_id,))
        return found[0] if found else None

    def resolve(
        self, approval_id: str, approve: bool, *, ttl_s: float | None = None, uses: int | None = None
    ) -> Resolution:
        """Approve (creating a grant) or deny a pending ask.

        An ask past its deadline is marked expired instead, and the Resolution
        says so: the gate has treated it as a deny. Raises ApprovalError for an
        unknown or already resolved id, or a non-positive ttl or use count.
        """
        if ttl_s is not None and not ttl_s > 0:
            raise ApprovalError(f"a grant's ttl must be positive, not {ttl_s}s")
        if uses is not None and uses < 1:
            raise ApprovalError(f"a grant must allow at least one use, not {uses}")
        with self._write() as db:
            now = self._clock()
            row = db.execute(
                f"SELECT id, {_APPROVAL_COLUMNS} FROM approvals WHERE code = ? AND status = ?",
                (approval_id, ApprovalStatus.PENDING.value),
            ).fetchone()
            if row is None:
                raise ApprovalError(self._not_pending(approval_id))
            key, ask = row[0], _approval(row[1:])
            if ask.expires_at <= now:
                status = ApprovalStatus.EXPIRED
            else:
                status = ApprovalStatus.APPROVED if approve else ApprovalStatus.DENIED
            db.execute(
                "UPDATE approvals SET status = ?, resolved_at = ? WHERE id = ?", (status.value, now, key)
            )
            ask = msgspec.structs.replace(ask, status=status, resolved_at=now)
            grant = None
            if status is ApprovalStatus.APPROVED:
                grant = _insert_grant(db, key, ask, now, ttl_s, uses)
        return Resolution(approval=ask, grant=grant)

    def expire(self, approval_id: str, now: float) -> bool:
        """Mark one pending ask expired (its wait ended unanswered); False if it was no longer pending."""
        with self._write() as db:
            cursor = db.execute(
                "UPDATE approvals SET status = ?, resolved_at = ? WHERE code = ? AND status = ?",
                (ApprovalStatus.EXPIRED.value, now, approval_id, ApprovalStatus.PENDING.value),
            )
        return cursor.rowcount == 1

    def expire_waits(self, now: float) -> list[PendingApproval]:
        """Mark every pending ask whose deadline has passed as expired; return them (now expired)."""
        with self._write() as db:
            rows = db.execute(
                f"SELECT id, {_APPROVAL_COLUMNS} FROM approvals WHERE status = ? AND expires_at <= ?"
                " ORDER BY id",
                (ApprovalStatus.PENDING.value, now),
            ).fetchall()
            db.executemany(
                "UPDATE approvals SET status = ?, resolved_at = ? WHERE id = ?",
                [(ApprovalStatus.EXPIRED.value, now, row[0]) for row in rows],
            )
        return [
            msgspec.structs.replace(_approval(row[1:]), status=ApprovalStatus.EXPIRED, resolved_at=now)
            for row in rows
        ]

    # -- grants

    def find_grant(
        self, tool: str, canonical_args: str, workspace: str, policy_hash: str, now: float
    ) -> Grant | None:
        """A live grant for exactly this call, or None. Does not spend a use: `consume` does."""
        with self._translated():
            row = self._db.execute(
                f"SELECT {_GRANT_COLUMNS} FROM {_GRANT_FROM} WHERE g.tool = ? AND g.arguments = ?"
                f" AND g.workspace = ? AND g.policy_hash = ? AND {_LIVE} ORDER BY g.id LIMIT 1",
                (tool, canonical_args, workspace, policy_hash, now),
            ).fetchone()
        return None if row is None else _grant(row)

    def consume(self, grant: Grant, now: float) -> bool:
        """Spend one use of `grant`; False (and nothing spent) if it expired or was used up meanwhile."""
        with self._write() as db:
            changed = db.execute(
                f"UPDATE grants AS g SET uses_left = uses_left - 1 WHERE g.id = ? AND {_LIVE}",
                (grant.id, now),
            ).rowcount
        # An unlimited grant's uses_left stays NULL (NULL - 1 is NULL).
        return changed == 1

    def grants(self, now: float) -> list[Grant]:
        """Every grant still usable at `now`, oldest first."""
        with self._translated():
            rows = self._db.execute(
                f"SELECT {_GRANT_COLUMNS} FROM {_GRANT_FROM} WHERE {_LIVE} ORDER BY g.id", (now,)
            ).fetchall()
        return [_grant(row) for row in rows]

    # -- plumbing

    def _not_pending(self, approval_id: str) -> str:
        last = self.get(approval_id)
        if last is None:
            return f"no approval {approval_id!r}: see `bastion approvals` for the pending ones"
        return f"approval {approval_id!r} is no longer pending: it was {last.status.value}"

    def _asks(self, where: str, params: tuple[object, ...]) -> list[PendingApproval]:
        with self._translated():
            rows = self._db.execute(f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE {where}", params)
            return [_approval(row) for row in rows.fetchall()]


def _insert_grant(
    db: sqlite3.Connection, key: int, ask: PendingApproval, now: float, ttl_s: float | None, uses: int | None
) -> Grant:
    expires_at = None if ttl_s is None else now + ttl_s
    cursor = db.execute(
        "INSERT INTO grants (approval_id, tool, arguments, workspace, policy_hash, uses_left, expires_at,"
        " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (key, ask.tool, ask.arguments, ask.workspace, ask.policy_hash, uses, expires_at, now),
    )
    grant_id = cast(int, cursor.lastrowid)  # set by every INSERT
    return Grant(
        id=grant_id, approval_id=ask.id, tool=ask.tool, arguments=ask.arguments, workspace=ask.workspace,
        policy_hash=ask.policy_hash, uses_left=uses, expires_at=expires_at, created_at=now,
    )  # fmt: skip


def _approval_row(ask: PendingApproval) -> tuple[object, ...]:
    return (
        ask.id, ask.session, ask.request_id, ask.call_id, ask.tool, ask.arguments, ask.workspace,
        ask.policy_hash, ask.reason, ask.created_at, ask.expires_at, ask.status.value, ask.resolved_at,
    )  # fmt: skip


def _approval(row: tuple) -> PendingApproval:
    (code, session, request_id, call_id, tool, arguments, workspace, policy_hash, reason, created_at,
     expires_at, status, resolved_at) = row  # fmt: skip
    return PendingApproval(
        id=code, session=session, request_id=request_id, call_id=call_id, tool=tool, arguments=arguments,
        workspace=workspace, policy_hash=policy_hash, reason=reason, created_at=created_at,
        expires_at=expires_at, status=ApprovalStatus(status), resolved_at=resolved_at,
    )  # fmt: skip


def _grant(row: tuple) -> Grant:
    grant_id, approval_id, tool, arguments, workspace, policy_hash, uses_left, expires_at, created_at = row
    return Grant(
        id=grant_id, approval_id=approval_id, tool=tool, arguments=arguments, workspace=workspace,
        policy_hash=policy_hash, uses_left=uses_left, expires_at=expires_at, created_at=created_at,
    )  # fmt: skip
