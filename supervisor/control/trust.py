"""Answers to the trust requests: tools list/run, policy show/check, approvals,
audit verification and the confinement diagnosis (`bastion doctor`).

`bastion tools run` goes through exactly the gate and sandbox a model's call
would use: the same policy, approvals, audit records and confinement.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

from bastion.protocol.agent_events import ToolDecisionKind
from bastion.protocol.control import ControlEvent
from bastion.protocol.sandbox_wire import WRITE_TOOLS, level_reaches
from bastion.protocol.trust import (
    ApprovalInfo,
    ApprovalList,
    ApprovalResolved,
    AuditVerified,
    CheckPolicy,
    Diagnose,
    Diagnosis,
    InvokeTool,
    ListApprovals,
    ListTools,
    PolicyCaseResult,
    PolicyChecked,
    PolicyShown,
    ResolveApproval,
    ShowPolicy,
    ToolInfo,
    ToolInvoked,
    ToolList,
    VerifyAudit,
)
from bastion.supervisor.errors import SupervisorError, TrustFlagError
from bastion.supervisor.runs import ActiveRun
from bastion.supervisor.tools.registry import ToolRegistry
from bastion.supervisor.tools.sandboxed import REQUIRED_LEVEL, SANDBOXED, check_trust_flags, writable_for
from bastion.supervisor.trust.audit_verify import verify
from bastion.supervisor.trust.gate import Trust
from bastion.supervisor.trust.policy.cases import run_cases

TrustRequest = ListTools | InvokeTool | ShowPolicy | CheckPolicy | ListApprovals | ResolveApproval | VerifyAudit | Diagnose


class TrustRequests:
    def __init__(self, *, trust: Trust, tools: ToolRegistry, audit_path: Path) -> None:
        self._trust = trust
        self._tools = tools
        self._audit_path = audit_path
        self._calls = itertools.count(1)

    async def answer(self, request: TrustRequest, client: bytes, send) -> ControlEvent:
        match request:
            case ListTools(request_id=request_id):
                return ToolList(request_id=request_id, tools=self._tool_infos())
            case InvokeTool():
                return await self._invoke(request, client, send)
            case ShowPolicy(request_id=request_id):
                policy = self._trust.policies.current()
                source = str(policy.spec.source) if hasattr(policy.spec, "source") else ""
                return PolicyShown(request_id=request_id, source=source, hash=policy.hash, text=policy.describe())
            case CheckPolicy(request_id=request_id, cases_path=cases_path, workspace=workspace):
                policy = self._trust.policies.current()
                results = await asyncio.to_thread(run_cases, policy, Path(cases_path),
                                                  workspace=Path(workspace) if workspace else None)
                return PolicyChecked(request_id=request_id, results=[
                    PolicyCaseResult(name=r.name, expected=r.expected.value, actual=r.actual.value, passed=r.passed,
                                     reason=r.reason)
                    for r in results
                ])  # fmt: skip
            case ListApprovals(request_id=request_id):
                return ApprovalList(request_id=request_id, approvals=[
                    ApprovalInfo(approval_id=p.id, session=p.session, tool=p.tool, arguments=p.arguments,
                                 workspace=p.workspace, reason=p.reason, created_at=p.created_at,
                                 expires_at=p.expires_at)
                    for p in self._trust.approvals.pending()
                ])  # fmt: skip
            case ResolveApproval(request_id=request_id, approval_id=approval_id, approve=approve):
                resolution = self._trust.waits.resolve(approval_id, approve, ttl_s=request.ttl_s, uses=request.uses)
                return ApprovalResolved(request_id=request_id, approval_id=approval_id,
                                        approved=resolution.grant is not None)
            case VerifyAudit(request_id=request_id):
                report = await asyncio.to_thread(verify, self._audit_path, expected=self._trust.audit.head)
                return AuditVerified(request_id=request_id, ok=report.ok, records=report.records,
                                     problems=[p.describe() for p in report.problems], path=str(self._audit_path))
            case Diagnose(request_id=request_id):
                report = await self._trust.sandboxes.diagnose()
                notes = [f"{name} needs {level.value} confinement" +
                         ("" if level_reaches(report.level, level) else " — NOT AVAILABLE")
                         for name, level in REQUIRED_LEVEL.items()]  # fmt: skip
                return Diagnosis(request_id=request_id, confinement=report, notes=notes)
        raise SupervisorError(f"unhandled request {type(request).__name__}")

    def _tool_infos(self) -> list[ToolInfo]:
        infos = [ToolInfo(name=name, description=self._tools.get(name).description,
                          parameters=self._tools.get(name).parameters, sandboxed=False, writes=False)
                 for name in self._tools.names()]  # fmt: skip
        for name, spec in SANDBOXED.items():
            flag = "--allow-shell" if name == "shell" else "--allow-write" if name in WRITE_TOOLS else ""
            infos.append(ToolInfo(name=name, description=spec.description, parameters=spec.parameters,
                                  sandboxed=True, writes=name in WRITE_TOOLS or name == "shell", needs_flag=flag))
        return infos

    async def _invoke(self, request: InvokeTool, client: bytes, send) -> ToolInvoked:
        tool = type(request.arguments).__struct_config__.tag
        assert isinstance(tool, str)
        check_trust_flags(tool, allow_shell=request.allow_shell, allow_write=request.allow_write)
        workspace = Path(request.workspace)
        if not workspace.is_absolute() or not workspace.is_dir():
            raise TrustFlagError(f"the workspace must be an existing directory, not {workspace}")
        run = ActiveRun(request_id=request.request_id, client=client, emit=lambda event: send(client, event))
        call_id = f"cli_{next(self._calls)}"
        gate = self._trust.gate(run, "(tools run)", str(workspace), 300.0)
        verdict = await gate.decide(call_id, tool, request.arguments)
        if verdict.decision is not ToolDecisionKind.ALLOW:
            return ToolInvoked(request_id=request.request_id, decision=verdict.decision.value, reason=verdict.reason)
        report = await self._trust.sandboxes.diagnose()
        required = REQUIRED_LEVEL[tool]
        if not level_reaches(report.level, required):
            raise TrustFlagError(f"{tool} needs {required.value} confinement; this machine offers {report.level.value}")
        envelope = await self._trust.sandboxes.run_tool(
            f"{request.request_id}:{call_id}", request.arguments, workspace=str(workspace), required_level=required,
            writable=writable_for(tool, allow_write=request.allow_write), cancelled=run.cancelled,
        )  # fmt: skip
        gate.executed(call_id, tool, request.arguments, envelope)
        return ToolInvoked(request_id=request.request_id, decision=verdict.decision.value, reason=verdict.reason,
                           envelope=envelope)

