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
    FUNCTION_TAG = "function_tag"  # <function=NAME>{json}</function>, <function name="NAME">: Functionary
    QWEN3_CODER = "qwen3_coder"  # <function=NAME><parameter=K>v</parameter></function>: Qwen3-Coder, Seed-OSS
    GLM = "glm"  # <tool_call>NAME<arg_key>K</arg_key><arg_value>v</arg_value></tool_call>: GLM 4.5+
    MINIMAX = "minimax"  # <minimax:tool_call><invoke name="NAME"><parameter name="K">: MiniMax M2
    FUNCTIONARY = "functionary"  # >>>NAME then {json}: Functionary v3.2
    PYTHONIC_LIST = "pythonic_list"  # a reply that is only [name(a=1), other()]: Llama 3.2, Llama 4
    PYTHON_START = "python_start"  # <|python_start|>[name(a=1)]<|python_end|>: Llama 4
    TOOL_CODE = "tool_code"  # a ```tool_code fence holding name(a=1): Gemma
    DEEPSEEK = "deepseek"  # <｜tool▁call▁begin｜>...<｜tool▁sep｜>...: DeepSeek R1, V3, V3.1
    HARMONY = "harmony"  # <|channel|>commentary to=functions.NAME<|message|>{json}: GPT-OSS
    KIMI = "kimi"  # <|tool_call_begin|>functions.NAME:0<|tool_call_argument_begin|>{json}: Kimi K2
    APERTUS = "apertus"  # <|tools_prefix|>[{"NAME": {...}}]<|tools_suffix|>: Apertus
    COMMAND_R = "command_r"  # <|START_ACTION|>[{"tool_name": ...}]<|END_ACTION|>: Command R7B
    GRANITE = "granite"  # <|tool_call|>[{...}]: Granite 3, Phi-4-mini (closed by <|/tool_call|>)
    FUNCTOOLS = "functools"  # functools[{...}]: Phi-4-mini, Firefunction v2
    FUNCTION_CALL_TAG = "function_call_tag"  # <function_call>{json}</function_call>, <functioncall>: Glaive
    JSON_TAG = "json_tag"  # JSON in <tool_calls>, <TOOLCALL>, <|tool_call_start|>: Jamba, Nemotron, LFM2


class WarningCode(enum.Enum):
    MAX_ITERATIONS = "max_iterations"
    CONTEXT_PRUNED = "context_pruned"
    SUMMARY_FAILED = "summary_failed"
    TEMPLATE_UNSTABLE = "template_unstable"  # the template re-rendered history differently
    TEMPLATE_FALLBACK = "template_fallback"  # the model's template rejected a message; a built-in was used
    TOOL_CALL_INVALID = "tool_call_invalid"
    GENERATION_RETRIED = "generation_retried"  # its worker died before any of it was streamed; asked again
    GRAMMAR_UNAVAILABLE = "grammar_unavailable"  # a call was to be constrained and could not be: free text
    REPETITION = "repetition"  # the reply kept repeating itself and was cut where the loop began


class TurnStarted(Message, frozen=True, tag="turn_start"):
    request_id: str
    session: str
    iteration: int


class TokenCounting(enum.Enum):
    """How a context budget's token counts were made."""

    VOCABULARY = "vocabulary"  # with the model's own tokenizer: exact
    REMOTE = "remote"  # by the remote server's own tokenizer (its /tokenize)
    ESTIMATE = "estimate"  # from the text's length (a remote model without its vocabulary here)


class ContextBudget(Message, frozen=True, tag="context_budget"):
    request_id: str
    used_tokens: int  # the prompt about to be sent
    max_tokens: int  # what the prompt may use: context size minus room for the reply
    context_size: int
    messages_kept: int
    messages_pruned: int  # dropped (or summarised) from the oldest turns this time
    strategy: ContextStrategy
    counting: TokenCounting = TokenCounting.VOCABULARY


class ReasoningDelta(Message, frozen=True, tag="reasoning"):
    """Reasoning the model wrote before (or between) its answer, streamed apart
    from `token` text; never parsed for tool calls. `n` counts every generated
    token, reasoning and answer alike."""

    request_id: str
    text: str
    n: int


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
    resembled: CallFormat | None = None  # tool_call_invalid: the call format the unusable text was written in


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
    # Where the built-in template used renders otherwise than the family's official one, one line each.
    departures: tuple[str, ...] = ()
