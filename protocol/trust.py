"""Requests and events about tools, trust policy, approvals, the audit log and
the sandbox's confinement (client ↔ supervisor).

An `ask` decision pauses the run: the stream carries `approval_required` with
an id, and any client may answer with `resolve_approval`; the run then goes on
with the call allowed or denied (a wait that times out is a deny).
"""

from __future__ import annotations

from typing import Any

import msgspec

from bastion.protocol.agent_events import ToolDecisionKind
from bastion.protocol.common import Message
from bastion.protocol.remote import RemoteProbe
from bastion.protocol.sandbox_wire import ConfinementReport, SandboxedArgs, ToolEnvelope
from bastion.protocol.tool_catalog import TrustFlag


class ApprovalRequired(Message, frozen=True, tag="approval_required"):
    request_id: str
    approval_id: str
    call_id: str
    tool: str
    arguments: str  # canonical JSON
    reason: str  # why policy asks
    expires_at: float  # unix seconds; no answer by then is a deny


class ApprovalInfo(msgspec.Struct, frozen=True, kw_only=True):
    approval_id: str
    session: str
    tool: str
    arguments: str
    workspace: str
    reason: str
    created_at: float
    expires_at: float


class ListApprovals(Message, frozen=True, tag="list_approvals"):
    request_id: str


class ApprovalList(Message, frozen=True, tag="approvals"):
    request_id: str
    approvals: list[ApprovalInfo]


class ResolveApproval(Message, frozen=True, tag="resolve_approval"):
    request_id: str
    approval_id: str
    approve: bool
    ttl_s: float | None = None  # how long the grant stays valid (None: until the policy changes)
    uses: int | None = None  # how many identical calls it covers (None: unlimited; default 1 via the CLI)


class ApprovalResolved(Message, frozen=True, tag="approval_resolved"):
    request_id: str
    approval_id: str
    approved: bool


class ToolInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str
    parameters: dict[Any, Any]
    sandboxed: bool
    writes: bool
    needs_flag: TrustFlag | None = None  # the flag that turns it on, when it is off by default


class ListTools(Message, frozen=True, tag="list_tools"):
    request_id: str


class ToolList(Message, frozen=True, tag="tools"):
    request_id: str
    tools: list[ToolInfo]


class InvokeTool(Message, frozen=True, tag="invoke_tool"):
    """`bastion tools run`: one call through exactly the gate and sandbox a model's call would use."""

    request_id: str
    arguments: SandboxedArgs
    workspace: str
    allow_shell: bool = False
    allow_write: bool = False


class ToolInvoked(Message, frozen=True, tag="tool_invoked"):
    request_id: str
    decision: ToolDecisionKind  # after approvals: allow or deny
    reason: str
    envelope: ToolEnvelope | None = None  # None when the call was not run


class ShowPolicy(Message, frozen=True, tag="show_policy"):
    request_id: str


class PolicyShown(Message, frozen=True, tag="policy"):
    request_id: str
    source: str  # the file it was loaded from
    hash: str
    text: str  # the effective rules, each with where it came from


class CheckPolicy(Message, frozen=True, tag="check_policy"):
    request_id: str
    cases_path: str
    workspace: str


class PolicyCaseResult(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    expected: ToolDecisionKind
    actual: ToolDecisionKind
    passed: bool
    reason: str = ""


class PolicyChecked(Message, frozen=True, tag="policy_checked"):
    request_id: str
    results: list[PolicyCaseResult]


class VerifyAudit(Message, frozen=True, tag="verify_audit"):
    request_id: str


class AuditVerified(Message, frozen=True, tag="audit_verified"):
    request_id: str
    ok: bool
    records: int
    problems: list[str]
    path: str


class Diagnose(Message, frozen=True, tag="diagnose"):
    request_id: str


class Diagnosis(Message, frozen=True, tag="diagnosis"):
    request_id: str
    confinement: ConfinementReport
    notes: list[str]
    remotes: list[RemoteProbe] = []  # each remote model's engine, tried
