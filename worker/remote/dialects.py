"""What each remote engine's HTTP API looks like, as data: the request that
asks for a streamed completion of a raw prompt, and what one event of its
stream means. Pure functions, no I/O (core.py does the HTTP).

    llama-server  POST /completion, server-sent events; the last event has
                  `stop: true`, `stop_type` and `timings` (prompt_n, cache_n,
                  predicted_n): the server's own token figures
    openai        POST /v1/completions, server-sent events ending in
                  `data: [DONE]`; `usage` (with `stream_options.include_usage`)
                  in the last chunk, `prompt_tokens_details.cached_tokens`
                  where the server counts them
    ollama        POST /api/generate with `raw: true`, one JSON object a line;
                  the last has `done: true`, `done_reason`, `prompt_eval_count`
                  (the tokens it evaluated, not the prompt's) and `eval_count`

A server's error arrives as an HTTP status, or as an `error` member inside
the stream (all three put it there when they fail mid-reply; llama.cpp's
server sends it as an SSE `error:` field instead of `data:`, which core.py
hands over as that member).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

import msgspec

from bastion.protocol import SamplingParams, StopReason
from bastion.protocol.common import GrammarUse
from bastion.protocol.remote import RemoteEndpoint, RemoteEngine
from bastion.protocol.worker_wire import CallGrammar
from bastion.worker.engine import GrammarOutcome


class Framing(enum.Enum):
    SSE = "sse"  # `data: {...}` lines, blank-line separated
    NDJSON = "ndjson"  # one JSON object a line


class MalformedEvent(ValueError):
    """An event that is not what the engine's protocol says it sends."""


@dataclass(frozen=True)
class Event:
    """One event of a reply stream, in bastion's terms."""

    text: str = ""
    tokens: int = 0  # tokens this event's text is made of, where the server says
    end: StopReason | None = None  # set on the event that ends the reply
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    error: str = ""  # the server reported a failure in the stream
    slot: int | None = None  # the llama-server slot that served the reply
    # Chat mode: pieces of tool calls the server parsed itself, (index, name, arguments) each;
    # OpenAI streams a call's name once and its JSON arguments in fragments, Ollama whole calls.
    call_parts: tuple[tuple[int, str, str], ...] = ()


@dataclass(frozen=True)
class CompletionRequest:
    path: str
    body: dict[str, Any]
    framing: Framing


def completion_request(endpoint: RemoteEndpoint, prompt: str, sampling: SamplingParams,
                       slot: int | None = None) -> CompletionRequest:
    """The HTTP request that streams a completion of `prompt` from `endpoint`."""
    match endpoint.engine:
        case RemoteEngine.LLAMA_SERVER:
            body: dict[str, Any] = {
                "prompt": prompt, "stream": True, "n_predict": sampling.max_tokens,
                "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
                "min_p": sampling.min_p, "repeat_penalty": sampling.repeat_penalty,
                "seed": -1 if sampling.seed is None else sampling.seed, "stop": list(sampling.stop),
                "ignore_eos": sampling.ignore_eos, "cache_prompt": True,
                "id_slot": -1 if slot is None else slot,
            }  # fmt: skip
            return CompletionRequest("/completion", body, Framing.SSE)
        case RemoteEngine.OPENAI:
            body = {
                "model": endpoint.model, "prompt": prompt, "stream": True,
                "stream_options": {"include_usage": True}, "max_tokens": sampling.max_tokens,
                "temperature": sampling.temperature, "top_p": sampling.top_p,
            }  # fmt: skip
            if sampling.seed is not None:
                body["seed"] = sampling.seed
            if sampling.stop:
                body["stop"] = list(sampling.stop)
            return CompletionRequest("/v1/completions", body, Framing.SSE)
        case RemoteEngine.OLLAMA:
            options: dict[str, Any] = {
                "num_predict": sampling.max_tokens, "temperature": sampling.temperature, "top_k": sampling.top_k,
                "top_p": sampling.top_p, "min_p": sampling.min_p, "repeat_penalty": sampling.repeat_penalty,
            }  # fmt: skip
            if sampling.seed is not None:
                options["seed"] = sampling.seed
            if sampling.stop:
                options["stop"] = list(sampling.stop)
            body = {"model": endpoint.model, "prompt": prompt, "raw": True, "stream": True, "options": options}
            return CompletionRequest("/api/generate", body, Framing.NDJSON)
    raise AssertionError(endpoint.engine)


def chat_request(endpoint: RemoteEndpoint, document: str, sampling: SamplingParams) -> CompletionRequest:
    """The HTTP request that streams a chat reply to the conversation `document` (the JSON
    `{"messages": [...], "tools": [...]}` a chat-mode model's formatter writes). A tool result
    goes to Ollama as a `tool` message; to an OpenAI-compatible server, which would want the
    call's id, as a user message saying which tool answered."""
    try:
        conversation = json.loads(document)
        messages, tools = conversation["messages"], conversation.get("tools")
    except (ValueError, KeyError, TypeError) as exc:
        raise MalformedEvent(f"a chat-mode prompt is the conversation as JSON: {exc}") from None
    sent = [_chat_message(endpoint.engine, message) for message in messages]
    if endpoint.engine is RemoteEngine.OLLAMA:
        request = completion_request(endpoint, "", sampling)
        body = {"model": endpoint.model, "messages": sent, "stream": True, "options": request.body["options"]}
        if tools:
            body["tools"] = tools
        return CompletionRequest("/api/chat", body, Framing.NDJSON)
    request = completion_request(_as_openai(endpoint), "", sampling)
    body = {key: value for key, value in request.body.items() if key != "prompt"}
    body["messages"] = sent
    if tools:
        body["tools"] = tools
    return CompletionRequest("/v1/chat/completions", body, Framing.SSE)


def _as_openai(endpoint: RemoteEndpoint) -> RemoteEndpoint:
    """`endpoint` spoken to as an OpenAI-compatible server (llama-server's chat route is one)."""
    return msgspec.structs.replace(endpoint, engine=RemoteEngine.OPENAI)


def _chat_message(engine: RemoteEngine, message: dict[str, Any]) -> dict[str, Any]:
    role, content = message.get("role"), message.get("content", "")
    if role == "tool":
        name = message.get("name") or "the tool"
        if engine is RemoteEngine.OLLAMA:
            return {"role": "tool", "content": content, "tool_name": name}
        return {"role": "user", "content": f"[{name} returned]\n{content}"}
    return {"role": role, "content": content}


def parse_chat_event(engine: RemoteEngine, payload: Any) -> Event:
    """What one event of a chat stream says (OpenAI's chunks, or Ollama's /api/chat lines)."""
    if not isinstance(payload, dict):
        raise MalformedEvent(f"an event must be a JSON object, not {type(payload).__name__}")
    if "error" in payload and payload["error"]:
        return Event(error=_error_text(payload["error"]))
    if engine is RemoteEngine.OLLAMA:
        found = payload.get("message")
        message: dict[str, Any] = found if isinstance(found, dict) else {}
        calls = []
        for i, call in enumerate(message.get("tool_calls") or []):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict):
                raise MalformedEvent("a tool call must be an object with a `function` object")
            calls.append((i, str(function.get("name", "")), json.dumps(function.get("arguments", {}))))
        done = _ollama_event({**payload, "response": _text(message, "content") if message else ""})
        return Event(text=done.text, tokens=done.tokens, end=done.end, prompt_tokens=done.prompt_tokens,
                     completion_tokens=done.completion_tokens, call_parts=tuple(calls))  # fmt: skip
    choices = payload.get("choices")
    if not isinstance(choices, list):
        raise MalformedEvent("a chat chunk without `choices`")
    delta = choices[0].get("delta") if choices and isinstance(choices[0], dict) else None
    text, parts = "", []
    if isinstance(delta, dict):
        text = delta.get("content") or ""
        if not isinstance(text, str):
            raise MalformedEvent("`delta.content` must be a string")
        for call in delta.get("tool_calls") or []:
            if not isinstance(call, dict):
                raise MalformedEvent("a tool call must be a JSON object")
            function, index = call.get("function") or {}, call.get("index", 0)
            if not isinstance(function, dict) or not isinstance(index, int):
                raise MalformedEvent("a tool call's `function` must be an object and its `index` a number")
            parts.append((index, str(function.get("name") or ""), str(function.get("arguments") or "")))
    reshaped = {**payload, "choices": [{**choices[0], "text": text}] if choices else []}
    completion = _openai_event(reshaped)
    return Event(text=completion.text, tokens=completion.tokens, end=completion.end,
                 prompt_tokens=completion.prompt_tokens, cached_tokens=completion.cached_tokens,
                 completion_tokens=completion.completion_tokens, call_parts=tuple(parts))  # fmt: skip


def calls_as_text(calls: dict[int, list[str]]) -> str:
    """The tool calls a server parsed itself, written back as text bastion's parser reads."""
    blocks = []
    for _, (name, arguments) in sorted(calls.items()):
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            parsed = arguments  # left for the parser's repair and its error to the model
        blocks.append("<tool_call>\n" + json.dumps({"name": name, "arguments": parsed}) + "\n</tool_call>")
    return "\n".join(blocks)


def parse_event(engine: RemoteEngine, payload: Any) -> Event:
    """What one decoded JSON event of `engine`'s stream says; MalformedEvent if it is not one."""
    if not isinstance(payload, dict):
        raise MalformedEvent(f"an event must be a JSON object, not {type(payload).__name__}")
    if "error" in payload and payload["error"]:
        return Event(error=_error_text(payload["error"]))
    match engine:
        case RemoteEngine.LLAMA_SERVER:
            return _llama_server_event(payload)
        case RemoteEngine.OPENAI:
            return _openai_event(payload)
        case RemoteEngine.OLLAMA:
            return _ollama_event(payload)
    raise AssertionError(engine)


def _llama_server_event(payload: dict[str, Any]) -> Event:
    text = _text(payload, "content")
    slot = payload.get("id_slot")
    slot = slot if isinstance(slot, int) and slot >= 0 else None
    if not payload.get("stop"):
        return Event(text=text, tokens=1 if text else 0, slot=slot)
    timings = payload.get("timings") if isinstance(payload.get("timings"), dict) else {}
    prompt_n, cache_n = _int(timings, "prompt_n"), _int(timings, "cache_n")
    end = StopReason.LENGTH if payload.get("stop_type") == "limit" else StopReason.STOP
    return Event(
        text=text, tokens=1 if text else 0, end=end, slot=slot,
        prompt_tokens=(prompt_n or 0) + (cache_n or 0) if prompt_n is not None else _int(payload, "tokens_evaluated"),
        cached_tokens=cache_n, completion_tokens=_int(timings, "predicted_n") or _int(payload, "tokens_predicted"),
    )  # fmt: skip


def _openai_event(payload: dict[str, Any]) -> Event:
    usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else None
    choices = payload.get("choices")
    if not isinstance(choices, list):
        raise MalformedEvent("a completion chunk without `choices`")
    text, end = "", None
    if choices:
        choice = choices[0]
        if not isinstance(choice, dict):
            raise MalformedEvent("a choice must be a JSON object")
        text = _text(choice, "text")
        reason = choice.get("finish_reason")
        if reason is not None:
            end = StopReason.LENGTH if reason == "length" else StopReason.STOP
    if usage is None:
        return Event(text=text, tokens=1 if text else 0, end=end)
    details = usage.get("prompt_tokens_details")
    cached = _int(details, "cached_tokens") if isinstance(details, dict) else None
    return Event(text=text, tokens=1 if text else 0, end=end, prompt_tokens=_int(usage, "prompt_tokens"),
                 cached_tokens=cached, completion_tokens=_int(usage, "completion_tokens"))


def _ollama_event(payload: dict[str, Any]) -> Event:
    text = _text(payload, "response")
    if not payload.get("done"):
        return Event(text=text, tokens=1 if text else 0)
    end = StopReason.LENGTH if payload.get("done_reason") == "length" else StopReason.STOP
    # prompt_eval_count counts the tokens Ollama evaluated: the prompt less what its cache held.
    return Event(text=text, tokens=1 if text else 0, end=end, prompt_tokens=_int(payload, "prompt_eval_count"),
                 completion_tokens=_int(payload, "eval_count"))


def _text(payload: dict[str, Any], key: str) -> str:
    value = payload.get(key, "")
    if not isinstance(value, str):
        raise MalformedEvent(f"`{key}` must be a string")
    return value


def _int(payload: Any, key: str) -> int | None:
    value = payload.get(key) if isinstance(payload, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)[:500]
    return str(error)[:500]


# llama.cpp's COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN_FULL
TRIGGER_PATTERN_FULL = 3


def constrain(engine: RemoteEngine, grammar: CallGrammar, body: dict[str, Any]) -> GrammarOutcome:
    """Put `grammar` in a completion request where the engine takes one (llama.cpp's server: GBNF,
    lazy with a trigger pattern, as the local worker builds it); say why not elsewhere."""
    if engine is not RemoteEngine.LLAMA_SERVER:
        return GrammarOutcome(GrammarUse.UNAVAILABLE, f"{engine.value} servers are not sent grammars; the reply "
                                                      "was free text, parsed as usual")  # fmt: skip
    from bastion.worker.grammar import (  # imports llama_cpp: only here
        GrammarError,
        call_gbnf,
        trigger_pattern,
    )

    try:
        body["grammar"] = call_gbnf(grammar)
    except GrammarError as exc:
        return GrammarOutcome(GrammarUse.FAILED, str(exc))
    if not grammar.lazy:
        return GrammarOutcome(GrammarUse.FULL)
    body["grammar_lazy"] = True
    # llama.cpp's COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN_FULL: the whole reply so far must match; the
    # grammar is fed from the first capture group on.
    body["grammar_triggers"] = [{"type": TRIGGER_PATTERN_FULL, "value": trigger_pattern(grammar.start)}]
    return GrammarOutcome(GrammarUse.LAZY)
