"""Policy test cases: a file of tool calls, each with the decision it must get.

Owns the cases format and `run_cases` (for `bastion policy test CASES`):

    [[cases]]
    name = "a denied command hidden after an allowed one"
    tool = "shell"
    arguments = { command = "ls; rm -rf /" }
    expect = "deny"                    # allow | deny | ask

`arguments` are the tool's own (protocol/sandbox_wire.py); the fields policy
never reads (`content`, `old`, `new`) may be left out. A tool outside the
sandbox (`clock`) needs no arguments: policy decides it by name.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from bastion.protocol.agent_events import ToolDecisionKind
from bastion.protocol.sandbox_wire import SandboxedArgs
from bastion.protocol.tool_catalog import sandboxed_tool
from bastion.supervisor.errors import PolicyError
from bastion.supervisor.trust.policy.engine import Policy
from bastion.supervisor.trust.policy.loader import convert
from bastion.supervisor.trust.policy.locate import read_document
from bastion.supervisor.trust.policy.model import NamedToolCall, PolicyCall, Source

# Fields policy never reads, so a case need not spell them out.
_UNREAD = {"write_file": {"content": ""}, "edit_file": {"old": "", "new": ""}}


class PolicyCase(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    call: PolicyCall
    expect: ToolDecisionKind
    source: Source


class CaseResult(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    expected: ToolDecisionKind
    actual: ToolDecisionKind
    passed: bool
    reason: str  # the policy's reason for `actual`
    rule: str | None  # the deciding rule, file:line
    source: Source  # where the case is written


class _RawCase(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    tool: str
    arguments: dict[str, Any] = {}
    expect: ToolDecisionKind


class _RawCases(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    cases: list[_RawCase]


def load_cases(path: Path) -> list[PolicyCase]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{path}: cannot read the cases: {exc}") from exc
    data, lines = read_document(str(path), text)
    raw = convert(data, _RawCases, lines)
    cases = []
    for index, case in enumerate(raw.cases):
        if sandboxed_tool(case.tool) is not None:
            fields = {**_UNREAD.get(case.tool, {}), **case.arguments, "tool": case.tool}
            call: PolicyCall = convert(fields, SandboxedArgs, lines,  # type: ignore[arg-type]
                                       prefix=("cases", index, "arguments"))
        else:
            call = NamedToolCall(name=case.tool)
        source = Source(file=str(path), line=lines.line(("cases", index)))
        cases.append(PolicyCase(name=case.name, call=call, expect=case.expect, source=source))
    return cases


def run_cases(policy: Policy, cases_path: Path, *, workspace: Path | None = None) -> list[CaseResult]:
    """Each case's decision under `policy`. Without a workspace the cases run in an empty
    temporary one, so their outcome does not depend on the directory they are run from."""
    cases = load_cases(cases_path)
    if workspace is not None:
        return [_run(policy, case, workspace) for case in cases]
    with tempfile.TemporaryDirectory(prefix="bastion-policy-cases-") as scratch:
        return [_run(policy, case, Path(scratch)) for case in cases]


def policy_call(tool: str, arguments: Mapping[str, Any]) -> PolicyCall:
    """The call policy decides for a tool name and its JSON arguments (msgspec.ValidationError
    when a sandboxed tool's arguments do not fit its Struct)."""
    if sandboxed_tool(tool) is None:
        return NamedToolCall(name=tool)
    return msgspec.convert({**arguments, "tool": tool}, type=SandboxedArgs)  # type: ignore[arg-type]


def _run(policy: Policy, case: PolicyCase, workspace: Path) -> CaseResult:
    decision = policy.decide(case.call, workspace=workspace)
    return CaseResult(name=case.name, expected=case.expect, actual=decision.decision,
                      passed=decision.decision is case.expect, reason=decision.reason, rule=decision.rule,
                      source=case.source)
