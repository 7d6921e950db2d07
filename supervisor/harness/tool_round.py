"""The tool round of a turn: parse the reply → gate → run → append each result.

`ToolRound.read` parses a reply for calls of the run's tools (tools/calls.py:
the formats small models write, arguments checked against each tool's
schema). `record_problems` warns about unusable calls and appends one repair
hint for the model. `execute` runs the calls in order through the one
gate → run → audit path (tool_execution.py) and appends each result, so every
call — run, denied, or skipped because the run was cancelled between two
calls — leaves a result in the conversation, and none is left dangling.

When the model was taught bastion's own fenced call format (its template
cannot list tools), each result comes back the same way, in a ```tool_result
block: small models then restate the result instead of calling again.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import msgspec

from bastion.protocol.agent_events import RunWarning, ToolCallParsed, WarningCode
from bastion.protocol.sessions import ChatRole
from bastion.supervisor.harness.conversation import Conversation
from bastion.supervisor.harness.tool_execution import PreparedCall, ToolExecution
from bastion.supervisor.runs import ActiveRun
from bastion.supervisor.templates.formatter import ChatMessage
from bastion.supervisor.tools.calls import (
    CallProblem,
    ParsedCall,
    ParseOutcome,
    parse_tool_calls,
    repair_hint,
)
from bastion.supervisor.tools.registry import Tool, ToolSpec


class ToolRound:
    def __init__(
        self, *, run: ActiveRun, conversation: Conversation, tools: Sequence[Tool], execution: ToolExecution,
        fenced_results: bool = False,
    ) -> None:
        self._run = run
        self._fenced_results = fenced_results
        self._conversation = conversation
        self._tools = {tool.spec.name: tool for tool in tools}
        self._execution = execution
        self._call_ids = itertools.count(1)

    @property
    def specs(self) -> list[ToolSpec]:
        return [tool.spec for tool in self._tools.values()]

    def read(self, reply: str) -> ParseOutcome:
        return parse_tool_calls(reply, {name: tool.spec for name, tool in self._tools.items()})

    def record_problems(self, problems: Sequence[CallProblem]) -> None:
        for problem in problems:
            self._run.send(RunWarning(request_id=self._run.request_id, code=WarningCode.TOOL_CALL_INVALID,
                                      message=problem.message, resembled=problem.resembled))
        self._conversation.append(
            ChatMessage(role=ChatRole.TOOL, content=repair_hint(problems), tool_name=problems[0].name or "error")
        )

    async def execute(self, calls: Sequence[ParsedCall]) -> bool:
        """Run each call in order; False when the run was cancelled before all ran."""
        for index, call in enumerate(calls):
            call_id = f"call_{next(self._call_ids)}"
            self._run.send(ToolCallParsed(request_id=self._run.request_id, call_id=call_id, name=call.name,
                                          arguments=msgspec.json.encode(call.arguments).decode(), format=call.format))
            if self._run.cancel_requested:
                for skipped in calls[index:]:
                    self._append_result(skipped.name, "not run: the run was cancelled")
                return False
            executed = await self._execution.execute(call_id, PreparedCall.of(self._tools[call.name], call.arguments))
            self._append_result(call.name, executed.result)
        return not self._run.cancel_requested

    def _append_result(self, name: str, content: str) -> None:
        if self._fenced_results:
            content = f"```tool_result\n{content}\n```"
        self._conversation.append(ChatMessage(role=ChatRole.TOOL, content=content, tool_name=name))
