"""The gate every tool call passes: policy, then approvals, each decision audited.

`TrustGate.decide` turns one parsed call into allow or deny:

- the policy (the home's `policy.toml`, else the bundled default; reloaded
  when the file changes) says allow, deny or ask;
- ask looks for a grant an earlier approval left for exactly this call (tool,
  canonical arguments, workspace, policy hash) and spends one use of it;
  otherwise it records a pending approval, tells the client
  (`approval_required`) and waits for any client to answer; no answer within
  the run's approval timeout is a deny;
- every decision, every approval and every execution is appended to the
  hash-chained audit log before anything runs: if the record cannot be
  written, the call does not run.

`ApprovalWaits` is the supervisor-wide table of runs waiting on an answer, so
a `resolve_approval` from any client reaches the run that asked.

`Trust` is everything the supervisor keeps for trust, built once in the
process shell: the policy (reloaded on change), approvals, the audit log, the
tool sandbox and the waits. `Trust.gate()` makes the per-run `TrustGate`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from bastion.protocol import HomeLayout
from bastion.protocol.agent_events import ToolDecisionKind
from bastion.protocol.sandbox_wire import ConfinementLevel, ToolEnvelope, level_reaches, strictest_level
from bastion.protocol.tool_catalog import SandboxedTool
from bastion.protocol.trust import ApprovalRequired
from bastion.supervisor.errors import AuditError, SupervisorError, TrustFlagError
from bastion.supervisor.processes.sandboxes import SandboxPool
from bastion.supervisor.runs import ActiveRun
from bastion.supervisor.trust.approvals import ApprovalStatus, ApprovalStore, Resolution, canonical_arguments
from bastion.supervisor.trust.audit import AuditedCall, AuditLog
from bastion.supervisor.trust.policy.engine import Policy
from bastion.supervisor.trust.policy.model import NamedToolCall, PolicyCall

log = logging.getLogger(__name__)


class GateVerdict(msgspec.Struct, frozen=True, kw_only=True):
    decision: ToolDecisionKind
    reason: str
    rule: str | None = None


class PolicyWatcher:
    """The policy as of its file's last change; a broken edit fails the next call clearly."""

    def __init__(self, layout: HomeLayout) -> None:
        self._layout = layout
        self._stamp: tuple[int, int] | None = None
        self._policy: Policy | None = None

    def current(self) -> Policy:
        try:
            stat = self._layout.policy_file.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            stamp = (0, 0)
        if self._policy is None or stamp != self._stamp:
            self._policy = None
            self._policy = Policy.for_home(self._layout)
            self._stamp = stamp
        return self._policy


class ApprovalWaits:
    def __init__(self, approvals: ApprovalStore) -> None:
        self._approvals = approvals
        self._waiting: dict[str, asyncio.Future[Resolution]] = {}
        self.sessions_waiting: dict[str, int] = {}

    def register(self, approval_id: str, session: str) -> asyncio.Future[Resolution]:
        future: asyncio.Future[Resolution] = asyncio.get_running_loop().create_future()
        self._waiting[approval_id] = future
        self.sessions_waiting[session] = self.sessions_waiting.get(session, 0) + 1
        future.add_done_callback(lambda _f: self._done(approval_id, session))
        return future

    def _done(self, approval_id: str, session: str) -> None:
        self._waiting.pop(approval_id, None)
        left = self.sessions_waiting.get(session, 1) - 1
        if left <= 0:
            self.sessions_waiting.pop(session, None)
        else:
            self.sessions_waiting[session] = left

    def resolve(self, approval_id: str, approve: bool, *, ttl_s: float | None, uses: int | None) -> Resolution:
        resolution = self._approvals.resolve(approval_id, approve, ttl_s=ttl_s, uses=uses)
        future = self._waiting.get(approval_id)
        if future is not None and not future.done():
            future.set_result(resolution)
        return resolution


class TrustGate:
    def __init__(
        self,
        *,
        policies: PolicyWatcher,
        approvals: ApprovalStore,
        waits: ApprovalWaits,
        audit: AuditLog,
        run: ActiveRun,
        session: str,
        workspace: Path | None,
        sandbox_level: Callable[[], ConfinementLevel | None],
        approval_timeout_s: float,
    ) -> None:
        self._policies = policies
        self._approvals = approvals
        self._waits = waits
        self._audit = audit
        self._run = run
        self._session = session
        self._workspace = workspace
        self._sandbox_level = sandbox_level
        self._timeout = approval_timeout_s

    async def decide(self, call_id: str, tool: str, call: PolicyCall) -> GateVerdict:
        policy = self._policies.current()
        audited = self._audited(call_id, tool, call, policy.hash)
        workspace = self._workspace or Path("/nonexistent-workspace")
        if self._workspace is None and not isinstance(call, NamedToolCall):
            verdict = GateVerdict(decision=ToolDecisionKind.DENY,
                                  reason="file and shell tools need a workspace (--workspace)")
        else:
            decided = policy.decide(call, workspace=workspace)
            verdict = GateVerdict(decision=decided.decision, reason=decided.reason, rule=decided.rule)
            if verdict.decision is ToolDecisionKind.ASK:
                verdict = await self._ask(call_id, tool, call, verdict, policy.hash, audited)
        try:
            self._audit.append(audited.decided(verdict.decision, verdict.rule or "default"))
        except AuditError as exc:
            return GateVerdict(decision=ToolDecisionKind.DENY, reason=f"not run: {exc.message}")
        return verdict

    def executed(self, call_id: str, tool: str, call: PolicyCall, envelope: ToolEnvelope) -> None:
        try:
            policy_hash = self._policies.current().hash
        except SupervisorError:
            policy_hash = "unavailable"
        try:
            self._audit.append(self._audited(call_id, tool, call, policy_hash).executed(envelope))
        except AuditError as exc:
            log.error("an execution was not audited: %s", exc.message)

    def _audited(self, call_id: str, tool: str, call: PolicyCall, policy_hash: str) -> AuditedCall:
        return AuditedCall(
            session=self._session, request_id=self._run.request_id, call_id=call_id, tool=tool,
            arguments=canonical_arguments(call), policy_hash=policy_hash, sandbox_level=self._sandbox_level(),
        )  # fmt: skip

    async def _ask(self, call_id: str, tool: str, call: PolicyCall, verdict: GateVerdict, policy_hash: str,
                   audited: AuditedCall) -> GateVerdict:
        arguments = canonical_arguments(call)
        workspace = str(self._workspace)
        grant = self._approvals.find_grant(tool, arguments, workspace, policy_hash, time.time())
        if grant is not None and self._approvals.consume(grant, time.time()):
            return GateVerdict(decision=ToolDecisionKind.ALLOW,
                               reason=f"approved earlier (approval {grant.approval_id})", rule=verdict.rule)
        pending = self._approvals.create_ask(
            session=self._session, request_id=self._run.request_id, call_id=call_id, tool=tool,
            arguments=arguments, workspace=workspace, policy_hash=policy_hash, wait_s=self._timeout,
            reason=verdict.reason,
        )  # fmt: skip
        waiting = self._waits.register(pending.id, self._session)
        self._run.send(ApprovalRequired(
            request_id=self._run.request_id, approval_id=pending.id, call_id=call_id, tool=tool,
            arguments=arguments, reason=verdict.reason, expires_at=pending.expires_at,
        ))  # fmt: skip
        cancelled = asyncio.ensure_future(self._run.cancelled.wait())
        try:
            racers: set[asyncio.Future[Any]] = {waiting, cancelled}
            await asyncio.wait(racers, timeout=self._timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cancelled.cancel()
        if not waiting.done():
            waiting.cancel()
            # This ask only (other runs' asks wait on), and any whose deadline passed unwatched.
            self._approvals.expire(pending.id, time.time())
            self._approvals.expire_waits(time.time())
            why = "the run was cancelled" if self._run.cancel_requested else "no answer in time"
            self._record_approval(audited, pending.id, ApprovalStatus.EXPIRED)
            return GateVerdict(decision=ToolDecisionKind.DENY, reason=f"approval {pending.id}: {why}")
        resolution = waiting.result()
        self._record_approval(audited, pending.id, resolution.approval.status)
        if resolution.grant is not None and self._approvals.consume(resolution.grant, time.time()):
            return GateVerdict(decision=ToolDecisionKind.ALLOW, reason=f"approved (approval {pending.id})",
                               rule=verdict.rule)
        return GateVerdict(decision=ToolDecisionKind.DENY,
                           reason=f"{resolution.approval.status.value} (approval {pending.id})", rule=verdict.rule)

    def _record_approval(self, audited: AuditedCall, approval_id: str, status: ApprovalStatus) -> None:
        try:
            self._audit.append(audited.approval(approval_id, status))
        except AuditError as exc:
            log.error("an approval was not audited: %s", exc.message)


@dataclass(frozen=True)
class Trust:
    policies: PolicyWatcher
    approvals: ApprovalStore
    waits: ApprovalWaits
    audit: AuditLog
    sandboxes: SandboxPool

    def gate(self, run: ActiveRun, session: str, workspace: str | None, approval_timeout_s: float) -> TrustGate:
        return TrustGate(
            policies=self.policies, approvals=self.approvals, waits=self.waits, audit=self.audit, run=run,
            session=session, workspace=Path(workspace) if workspace else None,
            sandbox_level=lambda: self.sandboxes.report.level if self.sandboxes.report else None,
            approval_timeout_s=approval_timeout_s,
        )  # fmt: skip

    async def require_confinement(self, tools: Iterable[SandboxedTool]) -> None:
        """Refuse tools that need more confinement than this machine's sandbox
        offers (TrustFlagError, before anything runs); the sandbox refuses
        such a call too, as the last wall."""
        records = list(tools)
        report = await self.sandboxes.diagnose()
        required = strictest_level(record.required_level for record in records)
        if not level_reaches(report.level, required):
            names = ", ".join(record.name for record in records)
            verb = "needs" if len(records) == 1 else "need"
            raise TrustFlagError(f"{names} {verb} {required.value} confinement; this machine offers "
                                 f"{report.level.value} (see bastion doctor)")
