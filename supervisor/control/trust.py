"""Answers to the trust requests.

    list_tools                                   → tools {tools}
    invoke_tool   {arguments, workspace, flags}  → approval_required? → tool_invoked {decision, reason, envelope}
    show_policy                                  → policy {source, hash, text}
    check_policy  {cases_path, workspace}        → policy_checked {results}
    list_approvals                               → approvals {approvals}
    resolve_approval {approval_id, approve, ttl_s, uses} → approval_resolved {approved}
    verify_audit                                 → audit_verified {ok, records, problems, path}
    diagnose                                     → diagnosis {confinement, notes}

`bastion tools run` (invoke_tool) goes through exactly the path a model's call
takes (harness/tool_execution.py): the same trust flags, policy, approvals,
audit records and sandbox.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path

from bastion.protocol.remote import RemoteProbe
from bastion.protocol.sandbox_wire import level_reaches, tool_name
from bastion.protocol.tool_catalog import SANDBOXED_TOOLS
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
from bastion.supervisor.errors import TrustFlagError
from bastion.supervisor.harness.tool_execution import PreparedCall, ToolExecution, Workbench
from bastion.supervisor.runs import ActiveRun, ClientSink
from bastion.supervisor.tools.registry import SandboxTool, Tool, ToolRegistry, check_trust_flags
from bastion.supervisor.trust.audit_verify import verify
from bastion.supervisor.trust.gate import Trust
from bastion.supervisor.trust.policy.cases import run_cases

TrustRequest = ListTools | InvokeTool | ShowPolicy | CheckPolicy | ListApprovals | ResolveApproval | VerifyAudit | Diagnose
TrustAnswer = (ToolList | ToolInvoked | PolicyShown | PolicyChecked | ApprovalList | ApprovalResolved | AuditVerified
               | Diagnosis)

# How long `bastion tools run` waits for an approval before the ask counts as a deny.
INVOKE_APPROVAL_TIMEOUT_S = 300.0


async def _no_remotes() -> list[RemoteProbe]:
    return []


class TrustRequests:
    def __init__(self, *, trust: Trust, tools: ToolRegistry, audit_path: Path,
                 remote_probes: Callable[[], Awaitable[list[RemoteProbe]]] = _no_remotes) -> None:
        self._trust = trust
        self._remote_probes = remote_probes
        self._tools = tools
        self._audit_path = audit_path
        self._calls = itertools.count(1)

    async def answer(self, request: TrustRequest, client: bytes, sink: ClientSink) -> TrustAnswer:
        match request:
            case ListTools(request_id=request_id):
                return ToolList(request_id=request_id, tools=[tool_info(tool) for tool in self._tools.tools()])
            case InvokeTool():
                return await self._invoke(request, client, sink)
            case ShowPolicy(request_id=request_id):
                policy = self._trust.policies.current()
                return PolicyShown(request_id=request_id, source=str(policy.source), hash=policy.hash,
                                   text=policy.describe())
            case CheckPolicy(request_id=request_id, cases_path=cases_path, workspace=workspace):
                policy = self._trust.policies.current()
                results = await asyncio.to_thread(run_cases, policy, Path(cases_path),
                                                  workspace=Path(workspace) if workspace else None)
                return PolicyChecked(request_id=request_id, results=[
                    PolicyCaseResult(name=r.name, expected=r.expected, actual=r.actual, passed=r.passed,
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
                confinement, remotes = await asyncio.gather(self._trust.sandboxes.diagnose(), self._remote_probes())
                level = confinement.level
                notes = [f"{record.name} needs {record.required_level.value} confinement" +
                         ("" if level_reaches(level, record.required_level) else " — NOT AVAILABLE")
                         for record in SANDBOXED_TOOLS]  # fmt: skip
                return Diagnosis(request_id=request_id, confinement=confinement, notes=notes, remotes=remotes)

    async def _invoke(self, request: InvokeTool, client: bytes, sink: ClientSink) -> ToolInvoked:
        tool = self._tools.tool(tool_name(request.arguments))
        assert isinstance(tool, SandboxTool)  # InvokeTool carries sandboxed arguments only
        check_trust_flags(tool.record, allow_shell=request.allow_shell, allow_write=request.allow_write)
        workspace = Path(request.workspace)
        if not workspace.is_absolute() or not workspace.is_dir():
            raise TrustFlagError(f"the workspace must be an existing directory, not {workspace}")
        await self._trust.require_confinement([tool.record])
        run = ActiveRun(request_id=request.request_id, client=client, sink=sink)
        gate = self._trust.gate(run, "(tools run)", str(workspace), INVOKE_APPROVAL_TIMEOUT_S)
        # The answer is one tool_invoked: no per-call events (an ask still says approval_required).
        execution = ToolExecution(run=run, gate=gate, registry=self._tools, sandbox=self._trust.sandboxes,
                                  workbench=Workbench(workspace=str(workspace), allow_write=request.allow_write),
                                  announce=False)
        executed = await execution.execute(f"cli_{next(self._calls)}",
                                           PreparedCall(tool=tool, policy=request.arguments))
        return ToolInvoked(request_id=request.request_id, decision=executed.verdict.decision,
                           reason=executed.verdict.reason, envelope=executed.envelope)


def tool_info(tool: Tool) -> ToolInfo:
    spec = tool.spec
    match tool:
        case SandboxTool(record=record):
            return ToolInfo(name=spec.name, description=spec.description, parameters=spec.parameters,
                            sandboxed=True, writes=record.writes, needs_flag=record.enabled_by)
        case _:
            return ToolInfo(name=spec.name, description=spec.description, parameters=spec.parameters,
                            sandboxed=False, writes=False)
