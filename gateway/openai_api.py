"""OpenAI-compatible routes: `/v1/models`, `/v1/chat/completions`, `/v1/completions`.

Request bodies are validated by pydantic models that ignore fields they do not
know, as llama.cpp's server and vLLM do. A chat request becomes a `complete`
(one model call; the client runs the tools it offers) or, with bastion's
extension, a `run` (bastion's own agent loop with its sandboxed tools, policy,
approvals and audit):

    {"model": "smollm2-135m", "messages": [...],
     "bastion": {"tools": ["files"], "workspace": "/abs/dir", "allow_write": false,
                 "session": "name", "max_iterations": 8}}

or, as a shorthand, a model named `MODEL+TOOL[,TOOL]` (`smollm2-135m+calculator,clock`).
A session (`bastion.session`, or the `X-Bastion-Session` header) persists the
conversation in bastion: its last user message continues the stored session,
and the earlier messages a stateless client resends are left to the session.
Everything of an agent run that OpenAI's chunks cannot carry (tool calls bastion
ran, decisions, approvals, warnings) travels as extra chunks with
`"choices": []` and a `"bastion"` object, which standard clients skip.

Streaming follows llama.cpp's server (tools/server/tests/utils.py invariants):
one id on every chunk; `role` only in the first; non-empty content deltas; a
tool call's first delta carries id, type and name with empty arguments, the
next its arguments; a finish chunk with an empty delta; a usage chunk with
`choices: []` when `stream_options.include_usage`; then `data: [DONE]`. An error
after the stream began is a `data:` line with an `error` object (the openai
SDK raises it as `APIError`). Reasoning is `delta.reasoning_content`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import msgspec
from pydantic import Field

from bastion.gateway.bodies import (
    Lenient,
    Seed,
    TokenCount,
    ToolIn,
    TopK,
    TopLogprobs,
    function_tools,
)
from bastion.gateway.errors import ApiError
from bastion.gateway.exchange import Exchange
from bastion.gateway.logprobs import LogprobTrail, openai_chat, openai_legacy
from bastion.protocol import StopReason, TokenDelta, TokenLogprobs
from bastion.protocol.agent_events import ReasoningDelta, RunWarning, ToolCallParsed
from bastion.protocol.common import GenerationStats, RequestFailed
from bastion.protocol.completion import CallRecord, Complete, OutputKind, ResponseFormat, Turn
from bastion.protocol.control import (
    ControlEvent,
    LoadProgress,
    Run,
    RunFinished,
    RunStarted,
    SamplingRequest,
    ToolChoice,
    ToolChoiceMode,
)
from bastion.protocol.sessions import ChatRole

# Without max_tokens, a reply may run this long (the context and the loop guard end it sooner).
DEFAULT_MAX_TOKENS = 1024
# OpenAI's own default for the legacy completions route.
DEFAULT_COMPLETION_TOKENS = 16
class ContentPart(Lenient):
    type: str
    text: str | None = None


class FunctionCallIn(Lenient):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(Lenient):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCallIn


class MessageIn(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class NamedFunction(Lenient):
    name: str


class NamedToolChoice(Lenient):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaIn(Lenient):
    name: str = "response"
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    strict: bool | None = None


class ResponseFormatIn(Lenient):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaIn | None = None


class StreamOptions(Lenient):
    include_usage: bool = False


class BastionRun(Lenient):
    """bastion's extension: run its own agent loop with its own tools."""

    tools: list[str] = []
    workspace: str | None = None
    allow_shell: bool = False
    allow_write: bool = False
    session: str | None = None
    max_iterations: Annotated[int, Field(ge=1, le=64)] = 8
    approval_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 300.0
    template: str | None = None


class Sampling(Lenient):
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: TopK | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repeat_penalty: Annotated[float, Field(gt=0)] | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False  # as llama.cpp's server: generate max_tokens whatever the model says
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    def sampling(self, max_tokens: int, logprobs: int | None = None) -> SamplingRequest:
        if self.n != 1:
            raise ApiError(400, "n must be 1: bastion generates one choice per request", param="n")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stop) > 16:
            raise ApiError(400, "at most 16 stop strings", param="stop")
        return SamplingRequest(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                               top_k=self.top_k, min_p=self.min_p, repeat_penalty=self.repeat_penalty,
                               seed=self.seed, stop=stop, ignore_eos=self.ignore_eos, logprobs=logprobs)  # fmt: skip


class ChatRequest(Sampling):
    model: str | None = None
    messages: Annotated[list[MessageIn], Field(min_length=1)]
    max_tokens: TokenCount | None = None
    max_completion_tokens: TokenCount | None = None
    response_format: ResponseFormatIn | None = None
    tools: list[ToolIn] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    bastion: BastionRun | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None

    def logprobs_asked(self) -> int | None:
        """How many alternatives to report per token; None: no log-probabilities."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(Sampling):
    model: str | None = None
    prompt: str | list[str]
    max_tokens: TokenCount | None = None
    echo: bool = False
    suffix: str | None = None
    logprobs: TopLogprobs | None = None  # the legacy API's count of alternatives per token


# --- chat requests into control requests -------------------------------------------------


def _text(content: str | list[ContentPart] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise ApiError(400, f"{where}: only text content parts are supported, not {part.type!r}", param=where)
        texts.append(part.text)
    return "\n".join(texts)


def _arguments(arguments: str | dict[str, Any]) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def turns(messages: list[MessageIn]) -> tuple[Turn, ...]:
    out = []
    for index, message in enumerate(messages):
        where = f"messages.{index}.content"
        role = {"developer": "system", "function": "tool"}.get(message.role, message.role)
        calls = tuple(CallRecord(id=call.id, name=call.function.name, arguments=_arguments(call.function.arguments))
                      for call in message.tool_calls or ())  # fmt: skip
        out.append(Turn(role=ChatRole(role), content=_text(message.content, where), tool_calls=calls,
                        tool_call_id=message.tool_call_id or "", name=message.name or "",
                        reasoning=message.reasoning_content or ""))  # fmt: skip
    return tuple(out)


def tool_choice_of(choice: Literal["auto", "none", "required"] | NamedToolChoice | None) -> ToolChoice:
    if choice is None or choice == "auto":
        return ToolChoice()
    if isinstance(choice, NamedToolChoice):
        return ToolChoice(mode=ToolChoiceMode.FUNCTION, name=choice.function.name)
    return ToolChoice(mode=ToolChoiceMode(choice))


def response_format_of(requested: ResponseFormatIn | None) -> ResponseFormat:
    if requested is None or requested.type == "text":
        return ResponseFormat()
    if requested.type == "json_object":
        return ResponseFormat(kind=OutputKind.JSON_OBJECT)
    schema = requested.json_schema.schema_ if requested.json_schema else None
    if not isinstance(schema, dict):
        raise ApiError(400, "response_format.json_schema.schema: a JSON schema (an object) is required",
                       param="response_format")
    return ResponseFormat(kind=OutputKind.JSON_SCHEMA, schema=schema)


def chat_control_request(body: ChatRequest, request_id: str, agent_tools: tuple[str, ...] | None,
                         model: str | None) -> Run | Complete:
    """The control request a chat request becomes: `complete`, or `run` for a server-side agent run."""
    max_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS
    sampling = body.sampling(max_tokens, body.logprobs_asked())
    messages = turns(body.messages)
    if agent_tools is None:
        return Complete(request_id=request_id, model=model, messages=messages, tools=function_tools(body.tools),
                        tool_choice=tool_choice_of(body.tool_choice),
                        response_format=response_format_of(body.response_format), sampling=sampling)
    extension = body.bastion or BastionRun()
    if body.tools:
        raise ApiError(400, "a bastion agent run uses bastion's own tools; drop `tools` or the extension",
                       param="tools")
    *history, last = messages
    if last.role is not ChatRole.USER:
        raise ApiError(400, "a bastion run answers a user message: the last message must be the user's",
                       param="messages")
    system = next((turn.content for turn in reversed(history) if turn.role is ChatRole.SYSTEM), None)
    if extension.session is not None:
        history = []  # the session holds the conversation: the new user message continues it
    return Run(request_id=request_id, prompt=last.content, model=model, sampling=sampling, system=system,
               session=extension.session, tools=agent_tools, template=extension.template,
               max_iterations=extension.max_iterations, workspace=extension.workspace,
               allow_shell=extension.allow_shell, allow_write=extension.allow_write,
               approval_timeout_s=extension.approval_timeout_s, tool_choice=tool_choice_of(body.tool_choice),
               history=tuple(turn for turn in history if turn.role is not ChatRole.SYSTEM))  # fmt: skip


# --- responses -------------------------------------------------------------------------


def finish_reason(reason: StopReason | None, called: bool) -> str:
    if reason is StopReason.LENGTH:
        return "length"
    return "tool_calls" if called else "stop"


def event_object(event: ControlEvent) -> dict[str, Any]:
    """A control event as the `bastion` object of an extension chunk (its `--json` shape)."""
    data: dict[str, Any] = msgspec.to_builtins(event)
    data.pop("request_id", None)
    return data


class ChatResponder:
    """Turns one exchange's events into OpenAI chat chunks, or into one chat completion."""

    def __init__(self, exchange: Exchange, *, agent: bool, include_usage: bool, logprobs: bool = False) -> None:
        self._exchange = exchange
        self._agent = agent  # tool calls are bastion's own: extension chunks, not `tool_calls`
        self._include_usage = include_usage
        self._logprobs = logprobs
        self.trail = LogprobTrail()
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[ToolCallParsed] = []
        self.extensions: list[dict[str, Any]] = []

    def _reports(self, event: ControlEvent) -> bool:
        """Whether an event travels as an extension chunk: an agent run's activity, or a warning."""
        if isinstance(event, RunWarning):
            return True
        standard = (TokenDelta, TokenLogprobs, ReasoningDelta, GenerationStats, RunStarted, RunFinished, LoadProgress,
                    RequestFailed)
        return self._agent and not isinstance(event, standard)

    def _chunk(self, delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> str:
        body: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                "model": self._exchange.model, "system_fingerprint": "bastion"}  # fmt: skip
        logprobs = openai_chat(self.trail.take()) if self._logprobs and delta is not None else None
        body["choices"] = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": logprobs,
                                                      "finish_reason": finish}]  # fmt: skip
        body.update(extra)
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def stream(self) -> AsyncIterator[str]:
        yield self._chunk({"role": "assistant", "content": None})
        async for event in self._exchange.events():
            match event:
                case None:
                    yield ": keep-alive\n\n"
                case TokenLogprobs():
                    self.trail.add(event)  # sent with the next chunk that carries text, a call or the end
                case TokenDelta(text=text) if text:
                    self.content.append(text)
                    yield self._chunk({"content": text})
                case ReasoningDelta(text=text) if text:
                    self.reasoning.append(text)
                    yield self._chunk({"reasoning_content": text})
                case ToolCallParsed() if not self._agent:
                    index = len(self.calls)
                    self.calls.append(event)
                    yield self._chunk({"tool_calls": [{"index": index, "id": event.call_id, "type": "function",
                                                       "function": {"name": event.name, "arguments": ""}}]})
                    yield self._chunk({"tool_calls": [{"index": index, "function": {"arguments": event.arguments}}]})
                case RunFinished(stop_reason=reason):
                    if self._exchange.failed:
                        yield f"data: {json.dumps(self._exchange.error().openai_body())}\n\n"
                    else:
                        yield self._chunk({}, finish_reason(reason, bool(self.calls)))
                        if self._include_usage:
                            yield self._chunk(None, usage=self._exchange.usage.openai())
                    yield "data: [DONE]\n\n"
                case _ if self._reports(event):
                    yield self._chunk(None, bastion=event_object(event))
                case _:
                    pass

    async def collect(self) -> dict[str, Any]:
        async for event in self._exchange.events():
            match event:
                case TokenLogprobs():
                    self.trail.add(event)
                case TokenDelta(text=text):
                    self.content.append(text)
                case ReasoningDelta(text=text):
                    self.reasoning.append(text)
                case ToolCallParsed() if not self._agent:
                    self.calls.append(event)
                case _ if event is not None and self._reports(event):
                    self.extensions.append(event_object(event))
                case _:
                    pass
        if self._exchange.failed:
            raise self._exchange.error()
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content) or None}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.calls:
            message["tool_calls"] = [{"id": call.call_id, "type": "function",
                                      "function": {"name": call.name, "arguments": call.arguments}}
                                     for call in self.calls]  # fmt: skip
        body: dict[str, Any] = {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self._exchange.model,
            "system_fingerprint": "bastion",
            "choices": [{"index": 0, "message": message,
                         "logprobs": openai_chat(self.trail.all) if self._logprobs else None,
                         "finish_reason": finish_reason(self._exchange.stop_reason, bool(self.calls))}],
            "usage": self._exchange.usage.openai(),
        }  # fmt: skip
        if self.extensions:
            body["bastion"] = {"events": self.extensions}
        return body


class TextResponder:
    """The legacy completions route: the same exchange, as `text_completion` objects."""

    def __init__(self, exchange: Exchange, *, include_usage: bool, logprobs: bool = False) -> None:
        self._exchange = exchange
        self._include_usage = include_usage
        self._logprobs = logprobs
        self.trail = LogprobTrail()
        self._offset = 0  # characters of text sent so far, where the next token's text_offset starts
        self.id = f"cmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.text: list[str] = []

    def _object(self, text: str, finish: str | None, **extra: Any) -> dict[str, Any]:
        logprobs = None
        if self._logprobs:
            reports = self.trail.take()
            logprobs = openai_legacy(reports, self._offset)
            self._offset += sum(len(r.chosen.token) for r in reports)
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self._exchange.model,
                "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}], **extra}

    async def stream(self) -> AsyncIterator[str]:
        async for event in self._exchange.events():
            match event:
                case None:
                    yield ": keep-alive\n\n"
                case TokenLogprobs():
                    self.trail.add(event)
                case TokenDelta(text=text) if text:
                    yield f"data: {json.dumps(self._object(text, None), ensure_ascii=False)}\n\n"
                case RunFinished(stop_reason=reason):
                    if self._exchange.failed:
                        yield f"data: {json.dumps(self._exchange.error().openai_body())}\n\n"
                    else:
                        last = self._object("", finish_reason(reason, False))
                        if self._include_usage:
                            last["usage"] = self._exchange.usage.openai()
                        yield f"data: {json.dumps(last)}\n\n"
                    yield "data: [DONE]\n\n"
                case _:
                    pass

    async def collect(self) -> dict[str, Any]:
        async for event in self._exchange.events():
            if isinstance(event, TokenDelta):
                self.text.append(event.text)
            elif isinstance(event, TokenLogprobs):
                self.trail.add(event)
        if self._exchange.failed:
            raise self._exchange.error()
        return self._object("".join(self.text), finish_reason(self._exchange.stop_reason, False),
                            usage=self._exchange.usage.openai())


def completion_control_request(body: CompletionRequest, request_id: str, model: str | None) -> Complete:
    if body.echo or body.suffix:
        raise ApiError(400, "echo and suffix are not supported", param="echo" if body.echo else "suffix")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise ApiError(400, "prompt: give one prompt (a string) per request", param="prompt")
    sampling = body.sampling(body.max_tokens or DEFAULT_COMPLETION_TOKENS, body.logprobs)
    return Complete(request_id=request_id, model=model, prompt=prompts[0], sampling=sampling)
