"""Trust in-process: the gate every tool call passes (policy, approvals, audit)
in a run and in `bastion tools run` (InvokeTool), and the trust requests,
against the real supervisor wired as the daemon wires it (tests/inprocess.py).

The FakeSandbox runs nothing: what reached it is what would have run.
test_trust_e2e.py runs the same rules through the real processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bastion.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    ErrorCode,
    Hello,
    HelloAccepted,
    Role,
    StopReason,
    TokenDelta,
)
from bastion.protocol.agent_events import ToolDecision, ToolDecisionKind, ToolEnded, ToolStarted
from bastion.protocol.control import ControlEvent, ControlRequest, RunFinished
from bastion.protocol.sandbox_wire import (
    ConfinementLevel,
    ConfinementReport,
    ReadFileArgs,
    ShellArgs,
    ToolEnvelope,
    WriteFileArgs,
)
from bastion.protocol.sessions import ChatRole, ListSessions, SessionState
from bastion.protocol.tool_catalog import TrustFlag
from bastion.protocol.trust import (
    ApprovalRequired,
    CheckPolicy,
    InvokeTool,
    ListApprovals,
    ListTools,
    ResolveApproval,
    ShowPolicy,
    ToolInvoked,
    VerifyAudit,
)
from tests.inprocess import (
    InProcessSupervisor,
    failure_of,
    of_type,
    request_id,
    run_request,
    script,
    tool_call,
    types_of,
)

OTHER = b"client-2"  # a second client: another terminal answering the approval




async def connect(sup: InProcessSupervisor, client: bytes = OTHER) -> None:
    """Another client says hello, as every client must before its first request."""
    sup.send(Hello(protocol_version=PROTOCOL_VERSION, role=Role.CLIENT), client)
    await sup.wait_for(lambda: any(c == client and isinstance(e, HelloAccepted) for c, e in sup.events))


async def ask_as(sup: InProcessSupervisor, request: ControlRequest, client: bytes) -> ControlEvent:
    """Send a one-answer request from `client` and return the answer it got."""
    sup.send(request, client)
    request_id = request.request_id  # type: ignore[union-attr]
    return await sup.wait_for(lambda: next(  # type: ignore[return-value]
        (e for c, e in sup.events if c == client and getattr(e, "request_id", None) == request_id), None))


async def asked(sup: InProcessSupervisor, request_id: str, count: int = 1) -> ApprovalRequired:
    """The run's `count`-th approval request, once it has arrived."""
    found = await sup.wait_for(lambda: len(asks := of_type(sup.of(request_id), ApprovalRequired)) >= count and asks)
    return found[count - 1]  # type: ignore[index]


async def finished(sup: InProcessSupervisor, request_id: str) -> list[ControlEvent]:
    await sup.wait_for(lambda: of_type(sup.of(request_id), RunFinished))
    return sup.of(request_id)


async def session_states(sup: InProcessSupervisor) -> dict[str, SessionState]:
    listing = await sup.ask(ListSessions(request_id=request_id("sessions")))
    return {summary.name: summary.state for summary in listing.sessions}  # type: ignore[union-attr]


def audit_records(sup: InProcessSupervisor) -> list[dict]:
    return [json.loads(line) for line in sup.layout.audit_log.read_text().splitlines()]


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "ws"
    path.mkdir()
    (path / "notes.txt").write_text("hello from the workspace\n")
    return path



# --- approvals in a run -----------------------------------------------------------


def test_a_write_asks_and_an_approval_from_another_client_lets_it_run(supervised, tmp_path, workspace) -> None:
    model = script(tmp_path, tool_call("write_file", path="out.txt", content="hi\n"), "Done.")

    async def test(sup: InProcessSupervisor) -> None:
        request = run_request(model, tools=("files",), allow_write=True, workspace=str(workspace), session="w")
        sup.send(request)
        ask = await asked(sup, request.request_id)
        assert ask.tool == "write_file" and json.loads(ask.arguments)["path"] == "out.txt"
        # While it waits: the session says so, the approval is listed, nothing ran.
        assert (await session_states(sup))["w"] is SessionState.WAITING_FOR_APPROVAL
        [pending] = (await sup.ask(ListApprovals(request_id="pending"))).approvals  # type: ignore[union-attr]
        assert (pending.approval_id, pending.session, pending.tool) == (ask.approval_id, "w", "write_file")
        assert pending.workspace == str(workspace) and sup.sandbox.calls == []
        await connect(sup)
        resolved = await ask_as(sup, ResolveApproval(request_id="yes", approval_id=ask.approval_id, approve=True),
                                OTHER)
        assert resolved.approved  # type: ignore[union-attr]
        events = await finished(sup, request.request_id)
        [decision] = of_type(events, ToolDecision)
        assert decision.decision is ToolDecisionKind.ALLOW and ask.approval_id in decision.reason
        assert types_of(events).index("approval_required") < types_of(events).index("tool_decision")
        assert sup.sandbox.calls == [(WriteFileArgs(path="out.txt", content="hi\n"), str(workspace), True)]
        assert events[-1].stop_reason is StopReason.STOP
        # Answered: nothing pending, the session idle again; the audit log has the approval first.
        assert (await sup.ask(ListApprovals(request_id="after"))).approvals == []  # type: ignore[union-attr]
        assert (await session_states(sup))["w"] is SessionState.IDLE
        assert [r["kind"] for r in audit_records(sup)] == ["approval", "decision", "execution"]

    supervised(test)


def test_a_denial_becomes_a_result_the_model_sees_and_the_run_goes_on(supervised, tmp_path, workspace) -> None:
    model = script(tmp_path, tool_call("write_file", path="out.txt", content="x"), "Understood, not written.")

    async def test(sup: InProcessSupervisor) -> None:
        request = run_request(model, tools=("files",), allow_write=True, workspace=str(workspace), session="d")
        sup.send(request)
        ask = await asked(sup, request.request_id)
        await connect(sup)
        resolved = await ask_as(sup, ResolveApproval(request_id="no", approval_id=ask.approval_id, approve=False),
                                OTHER)
        assert not resolved.approved  # type: ignore[union-attr]
        events = await finished(sup, request.request_id)
        [decision] = of_type(events, ToolDecision)
        assert decision.decision is ToolDecisionKind.DENY and "denied" in decision.reason
        [end] = of_type(events, ToolEnded)
        assert not end.ok and end.content.startswith("not run: deny")
        assert not of_type(events, ToolStarted) and sup.sandbox.calls == []
        [result] = [m for m in sup.store.messages("d") if m.role is ChatRole.TOOL]
        assert result.content == end.content and result.tool_name == "write_file"
        # The model was called again, with the denial as the call's result.
        assert "".join(e.text for e in of_type(events, TokenDelta)).endswith("Understood, not written.")
        assert events[-1].stop_reason is StopReason.STOP

    supervised(test)


def test_an_unanswered_approval_times_out_as_a_deny(supervised, tmp_path, workspace) -> None:
    model = script(tmp_path, tool_call("write_file", path="out.txt", content="x"), "ok")

    async def test(sup: InProcessSupervisor) -> None:
        events = await sup.run(run_request(model, tools=("files",), allow_write=True, workspace=str(workspace),
                                           approval_timeout_s=0.3))
        assert len(of_type(events, ApprovalRequired)) == 1
        [decision] = of_type(events, ToolDecision)
        assert decision.decision is ToolDecisionKind.DENY and "no answer in time" in decision.reason
        assert sup.sandbox.calls == [] and events[-1].stop_reason is StopReason.STOP
        assert (await sup.ask(ListApprovals(request_id="left"))).approvals == []  # type: ignore[union-attr]
        approval, deny = audit_records(sup)
        assert approval["kind"] == "approval" and approval["status"] == "expired"
        assert deny["kind"] == "decision" and deny["decision"] == "deny"

    supervised(test)


def test_an_approval_with_two_uses_covers_two_identical_calls_only(supervised, tmp_path, workspace) -> None:
    same = tool_call("write_file", path="a.txt", content="same\n")
    model = script(tmp_path, same, same, tool_call("write_file", path="a.txt", content="different\n"), "done")

    async def test(sup: InProcessSupervisor) -> None:
        request = run_request(model, tools=("files",), allow_write=True, workspace=str(workspace))
        sup.send(request)
        first = await asked(sup, request.request_id)
        await connect(sup)
        await ask_as(sup, ResolveApproval(request_id="twice", approval_id=first.approval_id, approve=True, uses=2),
                     OTHER)
        second = await asked(sup, request.request_id, count=2)  # the third call, with other arguments
        assert json.loads(second.arguments)["content"] == "different\n"
        await ask_as(sup, ResolveApproval(request_id="not", approval_id=second.approval_id, approve=False), OTHER)
        events = await finished(sup, request.request_id)
        decisions = of_type(events, ToolDecision)
        assert [d.decision for d in decisions] == [ToolDecisionKind.ALLOW, ToolDecisionKind.ALLOW,
                                                   ToolDecisionKind.DENY]
        assert "approved earlier" in decisions[1].reason and len(of_type(events, ApprovalRequired)) == 2
        assert [args for args, _, _ in sup.sandbox.calls] == [WriteFileArgs(path="a.txt", content="same\n")] * 2

    supervised(test)


def test_a_cancel_while_waiting_for_an_approval_ends_the_run_and_withdraws_its_ask(
    supervised, tmp_path, workspace
) -> None:
    model = script(tmp_path, tool_call("write_file", path="out.txt", content="x"), "never")

    async def test(sup: InProcessSupervisor) -> None:
        request = run_request(model, tools=("files",), allow_write=True, workspace=str(workspace), session="c")
        sup.send(request)
        await asked(sup, request.request_id)
        sup.send(Cancel(request_id=request.request_id))
        events = await finished(sup, request.request_id)
        assert events[-1].stop_reason is StopReason.CANCELLED and sup.sandbox.calls == []
        [decision] = of_type(events, ToolDecision)
        assert decision.decision is ToolDecisionKind.DENY and "cancelled" in decision.reason
        assert (await sup.ask(ListApprovals(request_id="left"))).approvals == []  # type: ignore[union-attr]
        assert (await session_states(sup))["c"] is SessionState.IDLE

    supervised(test)


def test_cancelling_one_waiting_run_leaves_another_runs_approval_answerable(supervised, tmp_path, workspace) -> None:
    first = script(tmp_path, tool_call("write_file", path="a.txt", content="a"), "never", name="first")
    second = script(tmp_path, tool_call("write_file", path="b.txt", content="b"), "Done.", name="second")

    async def test(sup: InProcessSupervisor) -> None:
        flags = dict(tools=("files",), allow_write=True, workspace=str(workspace))
        cancelled, waiting = run_request(first, **flags), run_request(second, **flags)
        sup.send(cancelled)
        await asked(sup, cancelled.request_id)
        sup.send(waiting)
        ask = await asked(sup, waiting.request_id)
        sup.send(Cancel(request_id=cancelled.request_id))
        await finished(sup, cancelled.request_id)
        pending = (await sup.ask(ListApprovals(request_id="left"))).approvals  # type: ignore[union-attr]
        assert [p.approval_id for p in pending] == [ask.approval_id]
        resolved = await sup.ask(ResolveApproval(request_id="yes", approval_id=ask.approval_id, approve=True))
        assert resolved.approved  # type: ignore[union-attr]
        events = await finished(sup, waiting.request_id)
        assert [d.decision for d in of_type(events, ToolDecision)] == [ToolDecisionKind.ALLOW]

    supervised(test)


# --- refusals before anything runs ------------------------------------------------------


@pytest.mark.parametrize(("tools", "with_workspace", "named"), [
    (("write_file",), True, "--allow-write"),
    (("edit_file",), True, "--allow-write"),
    (("shell",), True, "--allow-shell"),
    (("files",), False, "workspace"),
])  # fmt: skip
def test_a_tool_its_trust_flags_leave_off_is_refused_before_the_model_loads(
    supervised, tmp_path, workspace, tools, with_workspace, named
) -> None:
    model = script(tmp_path, "never")

    async def test(sup: InProcessSupervisor) -> None:
        events = await sup.run(run_request(model, tools=tools, workspace=str(workspace) if with_workspace else None))
        failure = failure_of(events)
        assert failure is not None and failure.code is ErrorCode.INVALID_REQUEST and named in failure.message
        assert types_of(events) == ["error", "run_end"] and sup.workers.started == []

    supervised(test)


def test_a_tool_the_sandbox_cannot_confine_enough_is_refused(supervised, tmp_path, workspace) -> None:
    model = script(tmp_path, tool_call("read_file", path="notes.txt"), "read")

    async def test(sup: InProcessSupervisor) -> None:
        sup.sandbox.report = ConfinementReport(level=ConfinementLevel.MINIMAL, layers=[])
        events = await sup.run(run_request(model, tools=("write_file",), allow_write=True,
                                           workspace=str(workspace)))
        failure = failure_of(events)
        assert failure is not None and failure.code is ErrorCode.INVALID_REQUEST
        assert "write_file needs partial confinement" in failure.message and "minimal" in failure.message
        assert sup.workers.started == []
        invoked = await sup.ask(InvokeTool(request_id="cli-write", arguments=WriteFileArgs(path="a", content="b"),
                                           workspace=str(workspace), allow_write=True))
        assert invoked.code is ErrorCode.INVALID_REQUEST and "partial" in invoked.message  # type: ignore[union-attr]
        # What minimal confinement suffices for still runs.
        events = await sup.run(run_request(model, tools=("read_file",), workspace=str(workspace)))
        assert [e.ok for e in of_type(events, ToolEnded)] == [True] and len(sup.sandbox.calls) == 1

    supervised(test)


# --- the audit log ------------------------------------------------------------------------


def test_the_audit_log_records_decision_then_execution_and_detects_tampering(
    supervised, tmp_path, workspace
) -> None:
    model = script(tmp_path, tool_call("read_file", path="notes.txt"), tool_call("calculator", expression="2+2"),
                   "done")

    async def test(sup: InProcessSupervisor) -> None:
        events = await sup.run(run_request(model, tools=("files", "calculator"), workspace=str(workspace)))
        assert events[-1].stop_reason is StopReason.STOP
        records = audit_records(sup)
        assert [(r["kind"], r["tool"]) for r in records] == [
            ("decision", "read_file"), ("execution", "read_file"),
            ("decision", "calculator"), ("execution", "calculator"),
        ]  # fmt: skip
        assert records[0]["decision"] == "allow" and records[0]["request_id"] == events[0].request_id
        text = sup.layout.audit_log.read_text()
        assert "notes.txt" not in text and "2+2" not in text  # digests and lengths, never the arguments
        verified = await sup.ask(VerifyAudit(request_id="verify"))
        assert verified.ok and verified.records == 4 and verified.problems == []  # type: ignore[union-attr]
        lines = text.splitlines()
        lines[1] = lines[1].replace('"ok":true', '"ok":false')
        sup.layout.audit_log.write_text("\n".join(lines) + "\n")
        tampered = await sup.ask(VerifyAudit(request_id="verify-again"))
        assert not tampered.ok  # type: ignore[union-attr]
        assert any(p.startswith("line 2") for p in tampered.problems), tampered.problems  # type: ignore[union-attr]

    supervised(test)


# --- tools run (InvokeTool) ---------------------------------------------------------------


def test_tools_run_runs_an_allowed_read_in_the_sandbox_with_one_answer(supervised, workspace) -> None:
    async def test(sup: InProcessSupervisor) -> None:
        sup.sandbox.answer = lambda args: ToolEnvelope(ok=True, content="hello from the workspace\n")
        request = InvokeTool(request_id="cli-read", arguments=ReadFileArgs(path="notes.txt"),
                             workspace=str(workspace))
        invoked = await sup.ask(request)
        assert invoked.decision is ToolDecisionKind.ALLOW  # type: ignore[union-attr]
        assert invoked.envelope == ToolEnvelope(ok=True, content="hello from the workspace\n")  # type: ignore
        assert sup.sandbox.calls == [(ReadFileArgs(path="notes.txt"), str(workspace), False)]
        assert types_of(sup.of("cli-read")) == ["tool_invoked"]
        assert [r["kind"] for r in audit_records(sup)] == ["decision", "execution"]

    supervised(test)


def test_tools_run_does_not_run_a_shell_command_the_policy_denies(supervised, workspace) -> None:
    async def test(sup: InProcessSupervisor) -> None:
        refused = await sup.ask(InvokeTool(request_id="cli-no-flag", arguments=ShellArgs(command="ls"),
                                           workspace=str(workspace)))
        assert refused.code is ErrorCode.INVALID_REQUEST and "--allow-shell" in refused.message  # type: ignore
        invoked = await sup.ask(InvokeTool(request_id="cli-curl", arguments=ShellArgs(command="ls; curl http://x"),
                                           workspace=str(workspace), allow_shell=True))
        assert invoked.decision is ToolDecisionKind.DENY and "curl" in invoked.reason  # type: ignore[union-attr]
        assert invoked.envelope is None and sup.sandbox.calls == []  # type: ignore[union-attr]
        assert types_of(sup.of("cli-curl")) == ["tool_invoked"]  # no tool_decision/start/end of its own
        assert [(r["kind"], r["decision"]) for r in audit_records(sup)] == [("decision", "deny")]

    supervised(test)


def test_tools_run_asks_like_a_run_and_writes_only_once_approved(supervised, workspace) -> None:
    async def test(sup: InProcessSupervisor) -> None:
        request = InvokeTool(request_id="cli-write", arguments=WriteFileArgs(path="out.txt", content="x"),
                             workspace=str(workspace), allow_write=True)
        sup.send(request)
        ask = await asked(sup, "cli-write")
        assert ask.tool == "write_file" and sup.sandbox.calls == []
        await connect(sup)
        await ask_as(sup, ResolveApproval(request_id="ok", approval_id=ask.approval_id, approve=True), OTHER)
        [invoked] = await sup.wait_for(lambda: of_type(sup.of("cli-write"), ToolInvoked))  # type: ignore[misc]
        assert invoked.decision is ToolDecisionKind.ALLOW  # type: ignore[union-attr]
        assert sup.sandbox.calls == [(WriteFileArgs(path="out.txt", content="x"), str(workspace), True)]
        assert types_of(sup.of("cli-write")) == ["approval_required", "tool_invoked"]

    supervised(test)


# --- policy and the tool list ---------------------------------------------------------------


def test_show_policy_names_its_file_and_a_broken_edit_fails_naming_the_line(supervised, tmp_path) -> None:
    cases = tmp_path / "cases.toml"
    cases.write_text('[[cases]]\nname = "the calculator"\ntool = "calculator"\nexpect = "allow"\n'
                     '[[cases]]\nname = "a read"\ntool = "read_file"\nexpect = "allow"\n'
                     '[cases.arguments]\npath = "x.txt"\n')

    async def test(sup: InProcessSupervisor) -> None:
        shown = await sup.ask(ShowPolicy(request_id="show-default"))
        assert shown.source.endswith("default_policy.toml") and "deny" in shown.text  # type: ignore[union-attr]
        checked = await sup.ask(CheckPolicy(request_id="check-default", cases_path=str(cases), workspace=""))
        assert [(r.actual, r.passed) for r in checked.results] == [  # type: ignore[union-attr]
            (ToolDecisionKind.ALLOW, True), (ToolDecisionKind.ALLOW, True)]
        policy = sup.layout.policy_file
        policy.write_text('include = ["bundled:default_policy.toml"]\n\n'
                          '[[rules]]\ndecision = "deny"\ntools = ["calculator"]\n')
        edited = await sup.ask(ShowPolicy(request_id="show-edited"))
        assert edited.source == str(policy) and edited.hash != shown.hash  # type: ignore[union-attr]
        checked = await sup.ask(CheckPolicy(request_id="check-edited", cases_path=str(cases), workspace=""))
        calculator, read = checked.results  # type: ignore[union-attr]
        assert calculator.expected is ToolDecisionKind.ALLOW and calculator.actual is ToolDecisionKind.DENY
        assert not calculator.passed and read.passed
        policy.write_text('default = "bogus"\n')
        broken = await sup.ask(ShowPolicy(request_id="show-broken"))
        assert broken.code is ErrorCode.INVALID_REQUEST and "policy.toml:1" in broken.message  # type: ignore

    supervised(test)


def test_list_tools_lists_each_tool_once_with_the_flag_that_turns_it_on(supervised) -> None:
    async def test(sup: InProcessSupervisor) -> None:
        tools = (await sup.ask(ListTools(request_id="tools"))).tools  # type: ignore[union-attr]
        names = [tool.name for tool in tools]
        assert len(names) == len(set(names))
        assert {tool.name: tool.needs_flag for tool in tools} == {
            "clock": None, "calculator": None, "read_file": None, "list_dir": None, "glob": None, "grep": None,
            "shell": TrustFlag.ALLOW_SHELL, "write_file": TrustFlag.ALLOW_WRITE, "edit_file": TrustFlag.ALLOW_WRITE,
        }  # fmt: skip
        assert {tool.name for tool in tools if tool.sandboxed} == set(names) - {"clock", "calculator"}

    supervised(test)
