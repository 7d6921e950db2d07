"""Ollama-compatible routes: `/api/chat`, `/api/generate`, `/api/tags`, `/api/ps`, `/api/show`, `/api/version`.

Shapes follow ollama/ollama's docs/api.md, as the `ollama` Python client reads
them: NDJSON lines while streaming (the default), one object otherwise; the
last line has `done: true`, `done_reason` and Ollama's timings in nanoseconds
(`total_duration`, `load_duration`, `prompt_eval_count`, `prompt_eval_duration`,
`eval_count`, `eval_duration`). Tool calls are `message.tool_calls` with
arguments as an object; reasoning is `message.thinking`. `options` maps onto
bastion's sampling (`num_predict`, `temperature`, `top_p`, `top_k`, `min_p`,
`seed`, `stop`, `repeat_penalty`; `num_ctx` is the model's registry setting,
not per request). `keep_alive` takes Ollama's durations; `/api/generate` with
no prompt loads the model (or unloads it, with `keep_alive: 0`). Models are
bastion's registry names (or a GGUF path, or `scripted:FILE`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bastion.gateway.bodies import (
    Lenient,
    Seed,
    ToolIn,
    TopK,
    TopLogprobs,
    function_tools,
    parse_body,
)
from bastion.gateway.errors import ApiError
from bastion.gateway.exchange import Exchange
from bastion.gateway.logprobs import LogprobTrail, ollama
from bastion.gateway.openai_api import DEFAULT_MAX_TOKENS
from bastion.gateway.service import Gateway, json_body, respond
from bastion.protocol import StopReason, TokenDelta, TokenLogprobs
from bastion.protocol.agent_events import ReasoningDelta, ToolCallParsed
from bastion.protocol.completion import CallRecord, Complete, OutputKind, ResponseFormat, Turn
from bastion.protocol.control import (
    LoadModel,
    ModelStatus,
    RunFinished,
    SamplingRequest,
    UnloadModel,
)
from bastion.protocol.quantities import parse_duration
from bastion.protocol.sessions import ChatRole

_VERSION = "0.1.0"


class Options(Lenient):
    num_predict: Annotated[int, Field(ge=-2, le=1_000_000)] | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: TopK | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    seed: Seed | None = None
    stop: list[str] | str | None = None
    repeat_penalty: Annotated[float, Field(gt=0)] | None = None

    def sampling(self) -> SamplingRequest:
        max_tokens = self.num_predict if self.num_predict and self.num_predict > 0 else DEFAULT_MAX_TOKENS
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingRequest(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                               top_k=self.top_k, min_p=self.min_p, repeat_penalty=self.repeat_penalty,
                               seed=self.seed, stop=stop)  # fmt: skip


class OllamaFunctionCall(Lenient):
    name: str
    arguments: dict[str, Any] | str = {}


class OllamaToolCall(Lenient):
    id: str | None = None
    function: OllamaFunctionCall


class OllamaMessage(Lenient):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None


class _Common(Lenient):
    model: str
    format: Literal["json", ""] | dict[str, Any] | None = None
    options: Options = Options()
    stream: bool = True
    keep_alive: float | str | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None

    def sampling(self) -> SamplingRequest:
        """`options` as sampling, with the log-probabilities asked for beside them."""
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return msgspec.structs.replace(self.options.sampling(), logprobs=logprobs)

    def keep_alive_s(self) -> float | None:
        if self.keep_alive is None:
            return None
        try:
            return parse_duration(self.keep_alive)
        except ValueError as exc:
            raise ApiError(400, f"keep_alive: {exc}", param="keep_alive") from exc

    def response_format(self) -> ResponseFormat:
        if self.format == "json":
            return ResponseFormat(kind=OutputKind.JSON_OBJECT)
        if isinstance(self.format, dict):
            return ResponseFormat(kind=OutputKind.JSON_SCHEMA, schema=self.format)
        return ResponseFormat()


class ChatBody(_Common):
    messages: list[OllamaMessage] = []
    tools: list[ToolIn] | None = None


class GenerateBody(_Common):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: list[str] | None = None


class ShowBody(Lenient):
    model: str | None = None
    name: str | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


# "Never unloaded", as a date ten years ahead (a datetime cannot hold an arbitrary keep_alive).
_FAR_S = 10 * 365 * 86400.0


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat().replace("+00:00", "Z") if unix else _now()


def _turns(messages: list[OllamaMessage]) -> tuple[Turn, ...]:
    out = []
    for index, message in enumerate(messages):
        if message.images:
            raise ApiError(400, f"messages.{index}.images: this server takes text only", param="messages")
        calls = tuple(CallRecord(id=call.id or "", name=call.function.name,
                                 arguments=call.function.arguments if isinstance(call.function.arguments, str)
                                 else json.dumps(call.function.arguments, ensure_ascii=False))
                      for call in message.tool_calls or ())  # fmt: skip
        out.append(Turn(role=ChatRole(message.role), content=message.content, reasoning=message.thinking or "",
                        tool_calls=calls, name=message.tool_name or ""))  # fmt: skip
    return tuple(out)


class OllamaResponder:
    """One exchange as Ollama's NDJSON lines, or as one object."""

    def __init__(self, exchange: Exchange, *, chat: bool, logprobs: bool = False) -> None:
        self._exchange = exchange
        self._chat = chat
        self._logprobs = logprobs
        self.trail = LogprobTrail()

    def _piece(self, text: str = "", thinking: str = "", calls: list[ToolCallParsed] | None = None) -> dict[str, Any]:
        line: dict[str, Any] = {"model": self._exchange.model, "created_at": _now()}
        if self._chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = [{"function": {"name": call.name, "arguments": json.loads(call.arguments)}}
                                         for call in calls]  # fmt: skip
            line["message"] = message
        else:
            line["response"] = text
            if thinking:
                line["thinking"] = thinking
        if self._logprobs:
            line["logprobs"] = ollama(self.trail.take())
        line["done"] = False
        return line

    def _final(self, line: dict[str, Any]) -> dict[str, Any]:
        usage = self._exchange.usage
        reason = self._exchange.stop_reason
        line.update(done=True, done_reason="length" if reason is StopReason.LENGTH else "stop",
                    total_duration=int((usage.prefill_ms + usage.decode_ms + self._exchange.load_ms) * 1e6),
                    load_duration=int(self._exchange.load_ms * 1e6), prompt_eval_count=usage.prompt_tokens,
                    prompt_eval_duration=int(usage.prefill_ms * 1e6), eval_count=usage.completion_tokens,
                    eval_duration=int(usage.decode_ms * 1e6))  # fmt: skip
        return line

    async def stream(self) -> AsyncIterator[str]:
        calls: list[ToolCallParsed] = []
        async for event in self._exchange.events():
            match event:
                case TokenLogprobs():
                    self.trail.add(event)
                case TokenDelta(text=text) if text:
                    yield json.dumps(self._piece(text)) + "\n"
                case ReasoningDelta(text=text) if text:
                    yield json.dumps(self._piece(thinking=text)) + "\n"
                case ToolCallParsed():
                    calls.append(event)
                case RunFinished() if self._exchange.failed:
                    yield json.dumps({"error": self._exchange.error().message}) + "\n"
                case RunFinished():
                    if calls:
                        yield json.dumps(self._piece(calls=calls)) + "\n"
                    yield json.dumps(self._final(self._piece())) + "\n"
                case _:
                    pass

    async def collect(self) -> dict[str, Any]:
        text, thinking, calls = [], [], []
        async for event in self._exchange.events():
            match event:
                case TokenLogprobs():
                    self.trail.add(event)
                case TokenDelta(text=piece):
                    text.append(piece)
                case ReasoningDelta(text=piece):
                    thinking.append(piece)
                case ToolCallParsed():
                    calls.append(event)
                case _:
                    pass
        if self._exchange.failed:
            raise self._exchange.error()
        return self._final(self._piece("".join(text), "".join(thinking), calls))


async def _respond(request: Request, control: Complete, *, chat: bool, stream: bool) -> Response:
    gateway: Gateway = request.app.state.gateway
    exchange = gateway.exchange(control)
    responder = OllamaResponder(exchange, chat=chat, logprobs=control.sampling.logprobs is not None)
    return await respond(request, exchange, stream=stream, lines=responder.stream, collect=responder.collect,
                         media_type="application/x-ndjson")


async def chat(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    body = parse_body(ChatBody, await json_body(request, gateway.settings))
    if not body.messages:
        return await _load_or_unload(gateway, body, chat=True)
    control = Complete(request_id=gateway.link.new_id("ochat"), model=body.model, messages=_turns(body.messages),
                       tools=function_tools(body.tools), response_format=body.response_format(), sampling=body.sampling(),
                       keep_alive_s=body.keep_alive_s())  # fmt: skip
    return await _respond(request, control, chat=True, stream=body.stream)


async def generate(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    body = parse_body(GenerateBody, await json_body(request, gateway.settings))
    if body.images:
        raise ApiError(400, "images: this server takes text only", param="images")
    if not body.prompt:
        return await _load_or_unload(gateway, body, chat=False)
    request_id = gateway.link.new_id("ogen")
    if body.raw:
        control = Complete(request_id=request_id, model=body.model, prompt=body.prompt,
                           sampling=body.sampling(), keep_alive_s=body.keep_alive_s())
    else:
        messages = ((Turn(role=ChatRole.SYSTEM, content=body.system),) if body.system else ()) + (
            Turn(role=ChatRole.USER, content=body.prompt),)
        control = Complete(request_id=request_id, model=body.model, messages=messages,
                           response_format=body.response_format(), sampling=body.sampling(),
                           keep_alive_s=body.keep_alive_s())  # fmt: skip
    return await _respond(request, control, chat=False, stream=body.stream)


async def _load_or_unload(gateway: Gateway, body: _Common, *, chat: bool) -> Response:
    """Ollama's way to load a model (an empty request) or unload it (the same with keep_alive 0)."""
    keep_alive = body.keep_alive_s()
    if keep_alive == 0:
        await gateway.ask(UnloadModel(request_id=gateway.link.new_id("unload"), model=body.model))
        reason = "unload"
    else:
        await gateway.ask(LoadModel(request_id=gateway.link.new_id("load"), model=body.model, keep_alive_s=keep_alive))
        reason = "load"
    line: dict[str, Any] = {"model": body.model, "created_at": _now(), "done": True, "done_reason": reason}
    if chat:
        line["message"] = {"role": "assistant", "content": ""}
    else:
        line["response"] = ""
    return JSONResponse(line)


def _details(status: ModelStatus | None) -> dict[str, Any]:
    return {"format": "gguf", "family": status.architecture if status else "", "families": None,
            "parameter_size": "", "quantization_level": "", "parent_model": ""}  # fmt: skip


async def tags(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    catalog, loaded = await gateway.models()
    by_name = {status.name: status for status in loaded}
    return JSONResponse({"models": [
        {"name": entry.name, "model": entry.name, "modified_at": _iso(entry.modified_at), "size": entry.file_size,
         "digest": "", "details": _details(by_name.get(entry.name))}
        for entry in catalog
    ]})  # fmt: skip


async def ps(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    loaded = await gateway.loaded()
    now = datetime.now(UTC).timestamp()
    return JSONResponse({"models": [
        {"name": status.name, "model": status.name, "size": status.memory_estimate_bytes or status.rss_bytes,
         "size_vram": 0, "digest": "", "details": _details(status),
         "expires_at": _iso(now + min(status.expires_in_s, _FAR_S)) if status.expires_in_s is not None
         else _iso(now + _FAR_S),
         "context_length": status.n_ctx}
        for status in loaded
    ]})  # fmt: skip


async def show(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    body = parse_body(ShowBody, await json_body(request, gateway.settings))
    name = body.model or body.name
    if not name:
        raise ApiError(400, "model: which model to show", param="model")
    catalog, loaded = await gateway.models()
    entry = next((e for e in catalog if e.name == name), None)
    status = next((s for s in loaded if s.name == name), None)
    if entry is None and status is None:
        raise ApiError(404, f"model {name!r} not found; known models: {', '.join(e.name for e in catalog)}")
    n_ctx = status.n_ctx if status else entry.n_ctx if entry else 0
    architecture = status.architecture if status else ""
    return JSONResponse({
        "modelfile": "", "parameters": "", "template": status.chat_template if status else "",
        "details": _details(status),
        "model_info": {"general.architecture": architecture, f"{architecture or 'general'}.context_length": n_ctx},
        "capabilities": ["completion", "tools"],
        "modified_at": _iso(entry.modified_at if entry else 0),
    })  # fmt: skip


async def version(request: Request) -> Response:
    return JSONResponse({"version": _VERSION})


def routes() -> list[Route]:
    return [
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/tags", tags),
        Route("/api/ps", ps),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/version", version),
    ]
