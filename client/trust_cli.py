"""Trust commands: tools, policy, approvals, the audit log and `doctor`.

    bastion tools list                              every tool, and what turns it on
    bastion tools run NAME --args JSON [-w DIR]     one call through the real gate and sandbox
    bastion policy show                             the effective policy, each rule with its source
    bastion policy test CASES                       expected decisions for a file of tool calls
    bastion approvals                               calls waiting for an answer
    bastion approve ID [--ttl 1h] [--uses N]        allow it (and identical calls, within limits)
    bastion deny ID
    bastion audit verify                            check the hash chain of the audit log
    bastion doctor                                  which confinement layers work on this machine
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

import msgspec
import typer

from bastion.client import render
from bastion.client.command_io import EXIT_FAILURE, EXIT_USAGE, connect, exit_for, expect, new_id
from bastion.client.run_options import AllowShellOption, AllowWriteOption, WorkspaceOption
from bastion.protocol import RequestFailed
from bastion.protocol.sandbox_wire import SandboxedArgs
from bastion.protocol.trust import (
    ApprovalList,
    ApprovalRequired,
    ApprovalResolved,
    AuditVerified,
    CheckPolicy,
    Diagnose,
    Diagnosis,
    InvokeTool,
    ListApprovals,
    ListTools,
    PolicyChecked,
    PolicyShown,
    ResolveApproval,
    ShowPolicy,
    ToolInvoked,
    ToolList,
    VerifyAudit,
)

tools_app = typer.Typer(help="List the tools, or run one through the gate and the sandbox.", no_args_is_help=True, rich_markup_mode=None)
policy_app = typer.Typer(help="Show or test the tool policy.", no_args_is_help=True, rich_markup_mode=None)
audit_app = typer.Typer(help="Check the audit log.", no_args_is_help=True, rich_markup_mode=None)
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON.")]
_SandboxedArgs = msgspec.json.Decoder(SandboxedArgs)


def _connection(as_json: bool = False):
    connection = connect(as_json, start=True)
    assert connection is not None
    return connection


@tools_app.command("list")
def list_tools(as_json: JsonFlag = False) -> None:
    """Every tool a model can be offered, and which flag turns it on."""
    with _connection(as_json) as connection:
        listing = expect(connection, ListTools(request_id=new_id()), ToolList, as_json)
    if as_json:
        render.json_line(listing)
        return
    for tool in listing.tools:
        where = "sandbox" if tool.sandboxed else "built-in"
        flag = f"  (needs {tool.needs_flag.value})" if tool.needs_flag else ""
        print(f"{tool.name:<12} {where:<9} {tool.description}{flag}")


@tools_app.command("run")
def run_tool(
    name: Annotated[str, typer.Argument(help="The tool, e.g. read_file or shell.")],
    args: Annotated[str, typer.Option("--args", help='Its arguments as JSON, e.g. \'{"path": "README.md"}\'.')],
    workspace: WorkspaceOption = None,
    allow_shell: AllowShellOption = False,
    allow_write: AllowWriteOption = False,
    as_json: JsonFlag = False,
) -> None:
    """Run one tool call exactly as a model's call would run: same policy, approvals, audit and sandbox."""
    try:
        fields = json.loads(args)
        if not isinstance(fields, dict):
            raise ValueError("--args must be a JSON object")
        arguments = _SandboxedArgs.decode(msgspec.json.encode({**fields, "tool": name}))
    except (ValueError, msgspec.ValidationError) as exc:
        render.error(f"bad arguments for {name}: {exc}", "see `bastion tools list --json` for each tool's schema")
        raise typer.Exit(EXIT_USAGE) from None
    request = InvokeTool(request_id=new_id(), arguments=arguments,
                         workspace=str((workspace or Path.cwd()).expanduser().absolute()),
                         allow_shell=allow_shell, allow_write=allow_write)  # fmt: skip
    with _connection(as_json) as connection:
        connection.send(request)
        result = None
        for event in connection.events(request.request_id):
            if as_json:
                render.json_line(event)
            match event:
                case ToolInvoked():
                    result = event
                    break
                case ApprovalRequired(approval_id=approval_id) if not as_json:
                    render.say(f"waiting for approval {approval_id}: bastion approve {approval_id}")
                case RequestFailed(code=code, message=message):
                    if not as_json:
                        render.error(message)
                    raise typer.Exit(exit_for(code))
    assert result is not None
    if as_json:
        raise typer.Exit(0 if result.envelope and result.envelope.ok else EXIT_FAILURE)
    if result.envelope is None:
        render.error(f"not run: {result.decision.value} ({result.reason})")
        raise typer.Exit(EXIT_FAILURE)
    print(result.envelope.content, end="" if result.envelope.content.endswith("\n") else "\n")
    if not result.envelope.ok:
        raise typer.Exit(EXIT_FAILURE)


@policy_app.command("show")
def show_policy(as_json: JsonFlag = False) -> None:
    """The effective policy: default, every rule with the file and line it came from, protected paths."""
    with _connection(as_json) as connection:
        shown = expect(connection, ShowPolicy(request_id=new_id()), PolicyShown, as_json)
    if as_json:
        render.json_line(shown)
    else:
        print(shown.text)


@policy_app.command("test")
def test_policy(
    cases: Annotated[Path, typer.Argument(help="A TOML file of tool calls with their expected decisions.")],
    workspace: WorkspaceOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Check the effective policy against expected decisions; exit 1 if any case fails."""
    request = CheckPolicy(request_id=new_id(), cases_path=str(cases.expanduser().absolute()),
                          workspace=str(workspace.expanduser().absolute()) if workspace else "")
    with _connection(as_json) as connection:
        checked = expect(connection, request, PolicyChecked, as_json)
    failed = [r for r in checked.results if not r.passed]
    if as_json:
        render.json_line(checked)
    else:
        for result in checked.results:
            mark = "ok  " if result.passed else "FAIL"
            detail = "" if result.passed else f"  (expected {result.expected.value}: {result.reason})"
            print(f"{mark} {result.name}: {result.actual.value}{detail}")
        print(f"{len(checked.results) - len(failed)} passed, {len(failed)} failed")
    if failed:
        raise typer.Exit(EXIT_FAILURE)


def approvals(as_json: JsonFlag = False) -> None:
    """Tool calls waiting for an answer."""
    with _connection(as_json) as connection:
        listing = expect(connection, ListApprovals(request_id=new_id()), ApprovalList, as_json)
    if as_json:
        render.json_line(listing)
        return
    if not listing.approvals:
        print("nothing is waiting for approval")
    for item in listing.approvals:
        print(f"{item.approval_id}  {item.tool} {item.arguments}  (session {item.session}; {item.reason})")


def _seconds(text: str | None) -> float | None:
    if text is None:
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not match:
        raise typer.BadParameter("use a number with s, m, h or d, e.g. 90s, 10m, 1h")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def approve(
    approval_id: Annotated[str, typer.Argument(help="The id from `bastion approvals` or the approval event.")],
    ttl: Annotated[str | None, typer.Option("--ttl", help="How long identical calls stay allowed, e.g. 1h.")] = None,
    uses: Annotated[int, typer.Option("--uses", min=1, help="How many identical calls this covers.")] = 1,
) -> None:
    """Allow a waiting tool call."""
    _resolve(approval_id, True, _seconds(ttl), uses)


def deny(approval_id: Annotated[str, typer.Argument(help="The id from `bastion approvals`.")]) -> None:
    """Refuse a waiting tool call; the model sees the refusal as the result."""
    _resolve(approval_id, False, None, None)


def _resolve(approval_id: str, approve_it: bool, ttl_s: float | None, uses: int | None) -> None:
    request = ResolveApproval(request_id=new_id(), approval_id=approval_id, approve=approve_it, ttl_s=ttl_s,
                              uses=uses)
    with _connection() as connection:
        resolved = expect(connection, request, ApprovalResolved, False)
    render.say(f"{'approved' if resolved.approved else 'denied'} {approval_id}")


@audit_app.command("verify")
def verify_audit(as_json: JsonFlag = False) -> None:
    """Check every record's hash chain; exit 1 and say where if anything was edited, dropped or reordered."""
    with _connection(as_json) as connection:
        verified = expect(connection, VerifyAudit(request_id=new_id()), AuditVerified, as_json)
    if as_json:
        render.json_line(verified)
    elif verified.ok:
        print(f"audit log intact: {verified.records} records ({verified.path})")
    else:
        print(f"audit log TAMPERED or damaged ({verified.path}):")
        for problem in verified.problems:
            print(f"  {problem}")
    if not verified.ok:
        raise typer.Exit(EXIT_FAILURE)


def doctor(as_json: JsonFlag = False) -> None:
    """Which confinement layers work on this machine, why the others do not, and how to fix them;
    and whether each remote model's engine answers (reachable, model listed, context size, streaming)."""
    with _connection(as_json) as connection:
        diagnosis = expect(connection, Diagnose(request_id=new_id()), Diagnosis, as_json)
    if as_json:
        render.json_line(diagnosis)
        if not all(remote.ok for remote in diagnosis.remotes):
            raise typer.Exit(EXIT_FAILURE)
        return
    print(f"confinement level: {diagnosis.confinement.level.value}")
    for layer in diagnosis.confinement.layers:
        state = "active " if layer.active else "MISSING"
        print(f"  {state} {layer.name:<18} {layer.detail}")
        if not layer.active and layer.fix:
            print(f"          fix: {layer.fix}")
    for note in diagnosis.notes:
        print(f"  {note}")
    if diagnosis.remotes:
        print("remote models:")
    for remote in diagnosis.remotes:
        print(f"  {remote.model}: {remote.engine.value} at {remote.url}: {'ok' if remote.ok else 'NOT USABLE'}")
        for step in remote.steps:
            print(f"    {'ok    ' if step.ok else 'FAILED'} {step.name:<10} {step.detail}")
            if not step.ok and step.fix:
                print(f"           fix: {step.fix}")
    if not all(remote.ok for remote in diagnosis.remotes):
        raise typer.Exit(EXIT_FAILURE)
