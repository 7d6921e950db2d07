"""One model call over a conversation an API client holds (protocol/completion.py).

The gateway's chat requests are stateless: every request carries the whole
conversation, and the client runs the tools it offered. `Completion` renders
that conversation with the model's template (through the same PromptBuilder as
a run, so tools are listed and an overlong conversation is pruned the same
way), constrains the reply when the client asked for a call or for JSON, makes
the one model call, and reports the calls it finds in the reply as `tool_call`
events, streaming only the prose around them (call_hold.py).

Two things keep the worker's KV cache warm across stateless requests:
- `conversation_key`: requests that continue one conversation (same model,
  same system prompt and first question) share a KV session id, so the
  worker's snapshot of that conversation is found again even when other
  clients' requests came in between;
- `ReplyMemory`: a reply that held calls is remembered by its call ids, and
  when the client sends the assistant turn back (as OpenAI clients do, with
  structured `tool_calls` and the prose), the prompt gets the reply exactly as
  the model wrote it. A turn whose ids bastion never issued is written in the
  call syntax the prompt teaches.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import msgspec

from bastion.protocol import ErrorCode, StopReason
from bastion.protocol.agent_events import RunWarning, ToolCallParsed, WarningCode
from bastion.protocol.common import SamplingParams, TokenDelta
from bastion.protocol.completion import CallRecord, FunctionTool, OutputKind, ResponseFormat, Turn
from bastion.protocol.control import ToolChoice, ToolChoiceMode
from bastion.protocol.sessions import ChatRole
from bastion.protocol.worker_wire import CallGrammar, schema_problem
from bastion.supervisor.errors import InvalidRequestError, ToolSchemaError
from bastion.supervisor.harness.constraints import FENCED, CallConstraint, CallSyntax
from bastion.supervisor.harness.model_calls import ModelCalls
from bastion.supervisor.harness.prompt_builder import PromptBuilder
from bastion.supervisor.runs import ActiveRun, GenerationOutcome
from bastion.supervisor.templates.formatter import ChatMessage
from bastion.supervisor.tools.call_hold import remainder_after
from bastion.supervisor.tools.calls import parse_tool_calls
from bastion.supervisor.tools.reasoning import ReasoningFormat, prompt_opens_reasoning, split_reasoning
from bastion.supervisor.tools.registry import ToolSpec
from bastion.supervisor.tools.schema import check_schema

# Replies remembered for their call ids: enough for many concurrent clients' tool loops.
_REMEMBERED_REPLIES = 1024


class ReplyMemory:
    """Replies that held tool calls, by the ids given to their calls and by the calls themselves
    (name and arguments: Ollama's clients send calls back without ids), each kept for the
    conversation it belongs to, so one client's reply never lands in another's prompt; least
    recently used out."""

    def __init__(self, capacity: int = _REMEMBERED_REPLIES) -> None:
        self._capacity = capacity
        self._replies: OrderedDict[tuple[str, str], str] = OrderedDict()

    def remember(self, conversation: str, calls: Sequence[CallRecord], reply: str) -> None:
        for key in (*(call.id for call in calls), _signature(calls)):
            self._replies[(conversation, key)] = reply
            self._replies.move_to_end((conversation, key))
        while len(self._replies) > self._capacity:
            self._replies.popitem(last=False)

    def reply_for(self, conversation: str, calls: Sequence[CallRecord]) -> str | None:
        """The reply of this conversation that made exactly these calls; None otherwise."""
        if all(call.id for call in calls):
            replies = {self._replies.get((conversation, call.id)) for call in calls}
            if len(replies) == 1 and None not in replies:
                return replies.pop()
        return self._replies.get((conversation, _signature(calls)))


def _signature(calls: Sequence[CallRecord]) -> str:
    parts = []
    for call in calls:
        try:
            arguments = json.dumps(json.loads(call.arguments or "{}"), sort_keys=True, separators=(",", ":"))
        except ValueError:
            arguments = call.arguments
        parts.append(f"{call.name}({arguments})")
    return "calls:" + ";".join(parts)


def conversation_key(model: str, messages: Sequence[Turn]) -> str:
    """The KV session id of the conversation these messages continue: its model, system prompt and
    first user message. Two conversations that share them share a snapshot, and the worker reuses
    only the prefix they really have in common."""
    system = next((m.content for m in messages if m.role is ChatRole.SYSTEM), "")
    first = next((m.content for m in messages if m.role is ChatRole.USER), "")
    digest = hashlib.blake2b(f"{model}\0{system}\0{first}".encode(), digest_size=8).hexdigest()
    return f"api-{digest}"


def client_tool(tool: FunctionTool) -> ToolSpec:
    """A tool the client offers, as the parser and templates see it. Arguments are checked against
    its schema where the schema uses what bastion's validator enforces; parts it cannot enforce
    (a `$ref`, a `format`) are left unchecked rather than refused: the client runs the tool. A
    schema too large or too deep to handle is refused."""
    parameters = tool.parameters or {"type": "object", "properties": {}}
    problem = schema_problem(parameters)
    if problem is not None:
        raise InvalidRequestError(f"tool {tool.name}: {problem}")
    return ToolSpec(name=tool.name, description=tool.description, parameters=_checkable(parameters),
                    read_only=True)


def _checkable(schema: dict[str, Any]) -> dict[str, Any]:
    try:
        check_schema(schema)
        return schema
    except ToolSchemaError:
        pass
    properties = schema.get("properties")
    kept: dict[str, Any] = {}
    if isinstance(properties, dict):
        for name, sub in properties.items():
            try:
                check_schema(sub)
                kept[name] = sub
            except ToolSchemaError:
                kept[name] = {}
    required = [name for name in schema.get("required", []) if isinstance(name, str)]
    return {"type": "object", "properties": kept, "required": required}


def written_calls(calls: Sequence[CallRecord], syntax: CallSyntax) -> str:
    """Calls bastion did not issue, written the way the prompt teaches the model to write them."""
    blocks = []
    for call in calls:
        try:
            arguments = json.loads(call.arguments) if call.arguments.strip() else {}
        except ValueError:
            arguments = call.arguments  # kept as the client sent it
        body = json.dumps({"name": call.name, syntax.arguments_key: arguments}, ensure_ascii=False)
        blocks.append(f"{syntax.prefix}{body}{syntax.suffix}")
    return "\n".join(blocks)


def chat_messages(
    messages: Sequence[Turn], memory: ReplyMemory, syntax: CallSyntax, *, fenced_results: bool, conversation: str = ""
) -> list[ChatMessage]:
    """The client's conversation as the template renders it (see the module docstring)."""
    names: dict[str, str] = {}  # call id -> tool name, from the assistant turns
    out: list[ChatMessage] = []
    for turn in messages:
        match turn.role:
            case ChatRole.ASSISTANT if turn.tool_calls:
                names.update((call.id, call.name) for call in turn.tool_calls)
                written = memory.reply_for(conversation, turn.tool_calls)
                if written is None:
                    prose = turn.content.strip()
                    written = (prose + "\n" if prose else "") + written_calls(turn.tool_calls, syntax)
                out.append(ChatMessage(role=ChatRole.ASSISTANT, content=written, reasoning=turn.reasoning))
            case ChatRole.TOOL:
                name = names.get(turn.tool_call_id) or turn.name or "tool"
                content = f"```tool_result\n{turn.content}\n```" if fenced_results else turn.content
                out.append(ChatMessage(role=ChatRole.TOOL, content=content, tool_name=name))
            case _:
                out.append(ChatMessage(role=turn.role, content=turn.content, reasoning=turn.reasoning))
    return out


def output_grammar(response_format: ResponseFormat) -> CallGrammar | None:
    """The grammar that makes the reply the JSON the client asked for."""
    match response_format.kind:
        case OutputKind.JSON_OBJECT:
            return CallGrammar(schema={"type": "object"})
        case OutputKind.JSON_SCHEMA:
            if not isinstance(response_format.schema, dict):
                raise InvalidRequestError("response_format json_schema needs a schema (an object)")
            problem = schema_problem(response_format.schema)
            if problem is not None:
                raise InvalidRequestError(f"response_format: {problem}")
            return CallGrammar(schema=response_format.schema)
        case _:
            return None


class Completion:
    """One `complete` request's model call, its events and its outcome."""

    def __init__(
        self,
        *,
        run: ActiveRun,
        calls: ModelCalls,
        sampling: SamplingParams,
        session_id: str,
        memory: ReplyMemory,
        prompts: PromptBuilder | None = None,
        raw_prompt: str | None = None,
        tools: Sequence[ToolSpec] = (),
        syntax: CallSyntax = FENCED,
        tool_choice: ToolChoice = ToolChoice(),
        response_format: ResponseFormat = ResponseFormat(),
        reasoning: ReasoningFormat = ReasoningFormat.NONE,
    ) -> None:
        assert (prompts is None) != (raw_prompt is None), "a completion renders messages or takes a raw prompt"
        self._run = run
        self._calls = calls
        self._sampling = sampling
        self._session_id = session_id
        self._memory = memory
        self._prompts = prompts
        self._raw_prompt = raw_prompt
        offered = tool_choice.mode is not ToolChoiceMode.NONE
        self._tools = {spec.name: spec for spec in tools} if offered else {}
        self._constraint = CallConstraint(list(self._tools.values()), syntax, tool_choice) if self._tools else None
        self._output = output_grammar(response_format)
        self._reasoning = reasoning if raw_prompt is None else ReasoningFormat.NONE

    async def complete(self) -> StopReason:
        prompt = self._raw_prompt if self._prompts is None else await self._prompts.next_prompt()
        assert prompt is not None
        grammar = self._grammar()
        outcome = await self._calls.generate(
            prompt, self._sampling, self._session_id, grammar=grammar, reasoning=self._reasoning,
            hold_calls=frozenset(self._tools) if self._tools else None,
        )  # fmt: skip
        if grammar is not None and not grammar.lazy and outcome.stats is not None and outcome.stats.grammar_note:
            self._warn(WarningCode.GRAMMAR_UNAVAILABLE,
                       f"the reply could not be constrained ({outcome.stats.grammar_note}); it is free text")
        if outcome.stop_reason in (StopReason.ERROR, StopReason.CANCELLED):
            return self._ended(outcome)
        if self._tools:
            self._report_calls(prompt, outcome)
        return outcome.stop_reason

    def _grammar(self) -> CallGrammar | None:
        """A forced call wins over an output format; an output format over a lazy call grammar."""
        call = self._constraint.for_turn(1) if self._constraint is not None else None
        if call is not None and (not call.lazy or self._output is None):
            return call
        return self._output

    def _report_calls(self, prompt: str, outcome: GenerationOutcome) -> None:
        reply = split_reasoning(outcome.text, self._reasoning,
                                starts_inside=prompt_opens_reasoning(prompt, self._reasoning))
        parsed = parse_tool_calls(reply.content, self._tools)
        records = []
        for call in parsed.calls:
            record = CallRecord(id=f"call_{secrets.token_hex(6)}", name=call.name,
                                arguments=msgspec.json.encode(call.arguments).decode())
            records.append(record)
            self._run.send(ToolCallParsed(request_id=self._run.request_id, call_id=record.id, name=call.name,
                                          arguments=record.arguments, format=call.format))
        for problem in parsed.problems:
            self._run.send(RunWarning(request_id=self._run.request_id, code=WarningCode.TOOL_CALL_INVALID,
                                      message=problem.message, resembled=problem.resembled))
        if records:
            self._memory.remember(self._session_id, records, reply.content)
        prose = parsed.prose if parsed.calls else reply.content
        rest = remainder_after(outcome.streamed, prose)
        if rest:
            self._run.send(TokenDelta(request_id=self._run.request_id, text=rest, n=outcome.tokens,
                                      tokens_per_s=outcome.stats.decode_tokens_per_s if outcome.stats else 0.0))

    def _ended(self, outcome: GenerationOutcome) -> StopReason:
        error = outcome.error
        if outcome.stop_reason is StopReason.ERROR:
            self._run.fail(error.code if error else ErrorCode.INTERNAL,
                           error.message if error and error.message else "generation failed",
                           retryable=error.retryable if error else False,
                           retry_after_ms=error.retry_after_ms if error else None)
        return outcome.stop_reason

    def _warn(self, code: WarningCode, message: str) -> None:
        self._run.send(RunWarning(request_id=self._run.request_id, code=code, message=message))
