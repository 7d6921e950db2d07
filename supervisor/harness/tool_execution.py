"""One tool call under trust: gate → run → audit. Every call takes this path,
a model's (the tool round) and a person's (`bastion tools run`).

`ToolExecution.execute` asks the gate (policy, then approvals; the gate audits
its decision before anything runs), runs an allowed call — a built-in in a
thread, a sandboxed tool in the tool sandbox with the workspace writable only
for a tool that writes under a run that allows writes — and has the gate
record the execution. A denied call is not run; its result says why.

With `announce` on, it tells the client as it goes: `tool_decision`, then
`tool_start`, `tool_output`* and `tool_end`, or only `tool_end` (ok=false)
for a call not run — the order protocol/agent_events.py promises.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from bastion.protocol.agent_events import ToolDecision, ToolDecisionKind, ToolEnded, ToolOutput, ToolStarted
from bastion.protocol.sandbox_wire import (
    ConfinementLevel,
    SandboxedArgs,
    ToolEnvelope,
    ToolLimits,
    ToolStream,
)
from bastion.supervisor.runs import ActiveRun
from bastion.supervisor.tools.registry import BuiltinTool, SandboxTool, Tool, ToolRegistry
from bastion.supervisor.tools.sandboxed import to_arguments, writable_for
from bastion.supervisor.trust.gate import GateVerdict
from bastion.supervisor.trust.policy.model import NamedToolCall, PolicyCall


class ToolGate(Protocol):
    """Decides each call before it runs and records what ran (trust/gate.py)."""

    async def decide(self, call_id: str, tool: str, call: PolicyCall) -> GateVerdict: ...

    def executed(self, call_id: str, tool: str, call: PolicyCall, envelope: ToolEnvelope) -> None: ...


class ToolRunner(Protocol):
    """Runs a sandboxed call (processes/sandboxes.py: SandboxPool)."""

    async def run_tool(self, request_id: str, arguments: SandboxedArgs, *, workspace: str, limits: ToolLimits = ...,
                       required_level: ConfinementLevel = ..., writable: bool = ...,
                       on_chunk: Callable[[ToolStream, str], None] | None = ...,
                       cancelled: asyncio.Event | None = ...) -> ToolEnvelope: ...


class Workbench(msgspec.Struct, frozen=True, kw_only=True):
    """Where sandboxed tools act for a run, and whether they may write there."""

    workspace: str | None = None
    allow_write: bool = False


@dataclass(frozen=True)
class PreparedCall:
    """A call ready for the gate: the tool, what policy inspects, and the
    arguments a built-in is given."""

    tool: Tool
    policy: PolicyCall
    arguments: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, tool: Tool, arguments: Mapping[str, Any]) -> PreparedCall:
        """A model's call, whose arguments already passed the tool's schema."""
        match tool:
            case SandboxTool(record=record):
                return cls(tool=tool, policy=to_arguments(record, arguments), arguments=arguments)
            case BuiltinTool(spec=spec):
                return cls(tool=tool, policy=NamedToolCall(name=spec.name), arguments=arguments)


class Executed(msgspec.Struct, frozen=True, kw_only=True):
    verdict: GateVerdict
    envelope: ToolEnvelope | None = None  # None when the call was not run

    @property
    def result(self) -> str:
        """What the model is shown as the call's result."""
        if self.envelope is None:
            return f"not run: {self.verdict.decision.value} ({self.verdict.reason})"
        return self.envelope.content if self.envelope.ok else f"error: {self.envelope.content}"


class ToolExecution:
    def __init__(
        self,
        *,
        run: ActiveRun,
        gate: ToolGate,
        registry: ToolRegistry,
        sandbox: ToolRunner | None,
        workbench: Workbench = Workbench(),
        announce: bool = True,
    ) -> None:
        self._run = run
        self._gate = gate
        self._registry = registry
        self._sandbox = sandbox
        self._workbench = workbench
        self._announce = announce

    async def execute(self, call_id: str, call: PreparedCall) -> Executed:
        name = call.tool.spec.name
        verdict = await self._gate.decide(call_id, name, call.policy)
        self._emit(ToolDecision(request_id=self._run.request_id, call_id=call_id, decision=verdict.decision,
                                reason=verdict.reason))
        if verdict.decision is not ToolDecisionKind.ALLOW:
            executed = Executed(verdict=verdict)
            self._emit(ToolEnded(request_id=self._run.request_id, call_id=call_id, name=name, ok=False,
                                 content=executed.result))
            return executed
        self._emit(ToolStarted(request_id=self._run.request_id, call_id=call_id, name=name))
        envelope = await self._run_allowed(call_id, call)
        self._gate.executed(call_id, name, call.policy, envelope)
        self._emit(ToolEnded(request_id=self._run.request_id, call_id=call_id, name=name, ok=envelope.ok,
                             content=envelope.content, duration_ms=envelope.duration_ms))
        return Executed(verdict=verdict, envelope=envelope)

    async def _run_allowed(self, call_id: str, call: PreparedCall) -> ToolEnvelope:
        match call.tool:
            case BuiltinTool(spec=spec):
                started = time.perf_counter()
                result = await asyncio.to_thread(self._registry.execute, spec.name, call.arguments)
                self._emit(ToolOutput(request_id=self._run.request_id, call_id=call_id, text=result.content))
                return ToolEnvelope(ok=result.ok, content=result.content,
                                    duration_ms=round((time.perf_counter() - started) * 1000, 3))
            case SandboxTool(record=record):
                if self._sandbox is None or self._workbench.workspace is None:
                    return ToolEnvelope(ok=False, content="no sandbox is available for this run")
                assert not isinstance(call.policy, NamedToolCall)

                def chunk(_stream: ToolStream, text: str) -> None:
                    self._emit(ToolOutput(request_id=self._run.request_id, call_id=call_id, text=text))

                return await self._sandbox.run_tool(
                    f"{self._run.request_id}:{call_id}", call.policy, workspace=self._workbench.workspace,
                    required_level=record.required_level,
                    writable=writable_for(record, allow_write=self._workbench.allow_write),
                    on_chunk=chunk, cancelled=self._run.cancelled,
                )  # fmt: skip

    def _emit(self, event: ToolDecision | ToolStarted | ToolOutput | ToolEnded) -> None:
        if self._announce:
            self._run.send(event)
