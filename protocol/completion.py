"""One model call over a conversation the client holds (client ↔ supervisor).

`complete` is what an API client needs that `run` is not: the client sends the
whole conversation every time (OpenAI and Ollama chat APIs are stateless),
offers tools it will execute itself, and gets back the reply and the calls the
model made, parsed from whatever format it wrote them in:

    client -> Complete {messages | prompt, tools, tool_choice, response_format, sampling}
    supervisor -> LoadProgress* RunStarted ContextBudget (TokenDelta | ReasoningDelta)*
                  GenerationStats ToolCallParsed* RunWarning* TokenDelta? RunFinished
                  (RequestFailed before RunFinished when something fails)

Nothing is executed and nothing is stored. `TokenDelta`s carry only the
answer's prose: once the reply may be opening a call, text is held back and
whatever prose is left after parsing comes in one last delta, after the calls; they come as
`tool_call` events with ids the client sends back in the assistant message, so
the supervisor can put the reply into the next prompt exactly as the model
wrote it (and the worker's KV cache keeps matching).

`prompt` instead of `messages` is a raw completion: the text goes to the model
as it is, with no chat template and no tools.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from bastion.protocol.common import Message
from bastion.protocol.control_options import SamplingRequest, ToolChoice
from bastion.protocol.sessions import ChatRole


class CallRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A tool call as the client has it: an id the supervisor issued (or the client made up), the
    tool's name and its arguments as JSON text."""

    id: str
    name: str
    arguments: str = "{}"


class Turn(msgspec.Struct, frozen=True, kw_only=True):
    role: ChatRole
    content: str = ""
    reasoning: str = ""  # an assistant turn's reasoning, when the client sends it back
    tool_calls: tuple[CallRecord, ...] = ()  # an assistant turn's calls
    tool_call_id: str = ""  # a tool turn: the call it answers
    name: str = ""  # a tool turn: the tool's name, when the client says it


class FunctionTool(msgspec.Struct, frozen=True, kw_only=True):
    """A tool the client offers and executes itself (OpenAI's `function`)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = {}


class OutputKind(enum.Enum):
    TEXT = "text"
    JSON_OBJECT = "json_object"  # any JSON object
    JSON_SCHEMA = "json_schema"  # JSON that matches `schema`


class ResponseFormat(msgspec.Struct, frozen=True, kw_only=True):
    """The shape the reply must take, enforced while sampling (a grammar in the worker)."""

    kind: OutputKind = OutputKind.TEXT
    schema: dict[str, Any] | None = None


class Complete(Message, frozen=True, tag="complete"):
    request_id: str
    model: str | None = None  # a registry name, a GGUF path, `scripted:FILE`; None: the default model
    messages: tuple[Turn, ...] = ()
    prompt: str | None = None  # a raw completion: no template, no tools
    tools: tuple[FunctionTool, ...] = ()
    tool_choice: ToolChoice = ToolChoice()
    response_format: ResponseFormat = ResponseFormat()
    sampling: SamplingRequest = SamplingRequest()
    template: str | None = None  # a built-in template instead of the model's own
    keep_alive_s: float | None = None
