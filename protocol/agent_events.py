"""Events of the agent loop, streamed to the client that started a run.

A run is one or more turns; a turn is one model call plus the tool calls its
reply contains. Guarantees, per run (request_id):

- `turn_start` opens every turn and `turn_end` closes it, in order;
  `iteration` counts turns from 1.
- `context_budget` comes once per turn, before the model call, after pruning.
- `generation_stats` comes exactly once per completed or cancelled generation.
- For each tool call the model made: `tool_call`, then `tool_decision`; if the
  decision is `allow`, `tool_start`, `tool_output`*, `tool_end`; if not,
  `tool_end` with `ok=false` (the model sees the refusal as the result).
  `call_id` ties them together.
- `warning` may come at any time and never ends anything.
- `prompt` (only with show_prompt) carries the exact text the model would
  receive next; such a run generates nothing.
"""

from __future__ import annotations

import enum

from bastion.protocol.common import Message, StopReason


class ToolDecisionKind(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    ASK = "ask"


class ContextStrategy(enum.Enum):
    WINDOW = "window"  # drop the oldest whole turns
    SUMMARIZE = "summarize"  # fold the oldest turns into one pinned summary (falls back to window)


class CallFormat(enum.Enum):
    """How the model wrote a tool call."""

    FENCED = "fenced"  # ```tool_call or ```tool
    FENCED_JSON = "fenced_json"  # ```json or an unlabelled fence
    PYTHONIC = "pythonic"  # a fence holding only `known_tool("a", b=1)`, as small models write it
    BARE_JSON = "bare_json"  # a JSON object or array in the prose
    TAGGED = "tagged"  # <tool_call>...</tool_call>
    PYTHON_TAG = "python_tag"  # <|python_tag|>
    MISTRAL = "mistral"  # [TOOL_CALLS]


class WarningCode(enum.Enum):
    MAX_ITERATIONS = "max_iterations"
    CONTEXT_PRUNED = "context_pruned"
    SUMMARY_FAILED = "summary_failed"
    TEMPLATE_UNSTABLE = "template_unstable"  # the template re-rendered history differently
    TEMPLATE_FALLBACK = "template_fallback"  # the model's template rejected a message; a built-in was used
    TOOL_CALL_INVALID = "tool_call_invalid"
    GENERATION_RETRIED = "generation_retried"  # its worker died before any of it was streamed; asked again


class TurnStarted(Message, frozen=True, tag="turn_start"):
    request_id: str
    session: str
    iteration: int


class ContextBudget(Message, frozen=True, tag="context_budget"):
    request_id: str
    used_tokens: int  # the prompt about to be sent
    max_tokens: int  # what the prompt may use: context size minus room for the reply
    context_size: int
    messages_kept: int
    messages_pruned: int  # dropped (or summarised) from the oldest turns this time
    strategy: ContextStrategy


class ToolCallParsed(Message, frozen=True, tag="tool_call"):
    request_id: str
    call_id: str
    name: str
    arguments: str  # canonical JSON
    format: CallFormat


class ToolDecision(Message, frozen=True, tag="tool_decision"):
    request_id: str
    call_id: str
    decision: ToolDecisionKind
    reason: str


class ToolStarted(Message, frozen=True, tag="tool_start"):
    request_id: str
    call_id: str
    name: str


class ToolOutput(Message, frozen=True, tag="tool_output"):
    request_id: str
    call_id: str
    text: str


class ToolEnded(Message, frozen=True, tag="tool_end"):
    request_id: str
    call_id: str
    name: str
    ok: bool
    content: str  # what the model is shown as the result
    duration_ms: float = 0.0


class RunWarning(Message, frozen=True, tag="warning"):
    request_id: str
    code: WarningCode
    message: str


class TurnFinished(Message, frozen=True, tag="turn_end"):
    request_id: str
    iteration: int
    stop_reason: StopReason
    tool_calls: int = 0


class PromptRendered(Message, frozen=True, tag="prompt"):
    request_id: str
    model: str
    template: str
    prompt: str
    tokens: int
