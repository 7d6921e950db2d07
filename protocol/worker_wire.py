"""Messages between the supervisor and a model worker.

The worker's DEALER connects to the supervisor's workers ROUTER and speaks first:

    worker  -> Hello(role=worker, name=<worker id>)
    supervisor -> HelloAccepted | RequestFailed(protocol_mismatch)
    worker  -> WorkerReady | WorkerLoadFailed        (after loading the GGUF)
    supervisor -> Generate ...; worker -> (TokenLogprobs? TokenDelta)* GenerationStats GenerationFinished
                                         | RequestFailed
    supervisor -> CountTokens;  worker -> TokenCount | RequestFailed   (a remote model's tokenizer)
    both ways  Heartbeat every second
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec

from bastion.protocol.common import (
    Cancel,
    GenerationStats,
    Heartbeat,
    Hello,
    HelloAccepted,
    Message,
    RequestFailed,
    SamplingParams,
    Shutdown,
    StopReason,
    TokenDelta,
    TokenLogprobs,
)
from bastion.protocol.errors import ErrorCode


class CallGrammar(msgspec.Struct, frozen=True, kw_only=True):
    """Constrain a generation to a tool call: `prefix`, then one JSON value that
    matches `schema`, then `suffix` — the call in the model's own syntax.

    With `lazy`, the reply is free text until `trigger` (by default `prefix`)
    appears in it; the grammar takes over from where the trigger begins, so the
    trigger must be how the grammar's own text starts (`{"name"` for a bare JSON
    call). A model that answers without a call is not forced into one. Without
    `lazy`, the reply is the call from its first token."""

    schema: dict[str, Any]
    prefix: str = ""
    suffix: str = ""
    lazy: bool = False
    trigger: str = ""

    @property
    def start(self) -> str:
        """The text whose appearance switches a lazy grammar on."""
        return self.trigger or self.prefix

    def problem(self) -> str | None:
        """Why a worker must refuse to build this grammar, or None. A grammar grows with the
        schema's bounds: `maxItems: 10**7` alone writes hundreds of megabytes of rules."""
        return schema_problem(self.schema)


# The largest schema a grammar is built from, and the largest count or repeat it may ask for.
GRAMMAR_SCHEMA_BYTES = 64 * 1024
GRAMMAR_SCHEMA_DEPTH = 32
GRAMMAR_REPEAT_LIMIT = 4096
_REPEAT_KEYS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties")
_PATTERN_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def schema_problem(schema: Any) -> str | None:
    """Why a JSON schema is too large to become a grammar, or None."""
    try:
        size = len(json.dumps(schema))
    except (TypeError, ValueError, RecursionError):
        return "the schema is not plain JSON"
    if size > GRAMMAR_SCHEMA_BYTES:
        return f"the schema is {size} bytes; at most {GRAMMAR_SCHEMA_BYTES}"
    return _bounds_problem(schema, 0)


def _bounds_problem(node: Any, depth: int) -> str | None:
    if depth > GRAMMAR_SCHEMA_DEPTH:
        return f"the schema nests deeper than {GRAMMAR_SCHEMA_DEPTH} levels"
    if isinstance(node, list):
        return next((found for item in node if (found := _bounds_problem(item, depth + 1))), None)
    if not isinstance(node, dict):
        return None
    for key in _REPEAT_KEYS:
        value = node.get(key)
        if isinstance(value, int | float) and value > GRAMMAR_REPEAT_LIMIT:
            return f"{key} {value} is more than a grammar can spell out (at most {GRAMMAR_REPEAT_LIMIT})"
    pattern = node.get("pattern")
    if isinstance(pattern, str):
        for repeat in _PATTERN_REPEAT.finditer(pattern):
            counts = [int(number) for number in repeat.groups() if number]
            if any(count > GRAMMAR_REPEAT_LIMIT for count in counts):
                return f"the pattern repeats {max(counts)} times (at most {GRAMMAR_REPEAT_LIMIT})"
    return next((found for value in node.values() if (found := _bounds_problem(value, depth + 1))), None)


class Generate(Message, frozen=True, tag="generate"):
    """Generate a completion of `prompt` (already rendered by the supervisor).

    `session_id` names whose KV state this is; the worker reuses the longest
    common prefix with the state it holds and evaluates only the rest.
    `snapshot`: keep this session's KV state as a snapshot at the turn boundary
    (in RAM, spilled to disk) so a later turn can restore it; False for calls
    nobody continues (one-shot runs, hidden summaries)."""

    request_id: str
    session_id: str
    prompt: str
    sampling: SamplingParams = SamplingParams()
    snapshot: bool = True
    grammar: CallGrammar | None = None


class ModelDescription(msgspec.Struct, frozen=True, kw_only=True):
    """What a worker holds, sent once it has loaded its GGUF."""

    name: str
    path: str
    architecture: str
    n_ctx: int
    n_ctx_train: int
    n_vocab: int
    n_params: int
    threads: int
    has_chat_template: bool
    chat_template: str
    bos_token: str
    eos_token: str
    file_size: int
    load_ms: float
    rss_bytes: int
    gguf_name: str = ""  # general.name, '' when the GGUF has none


class WorkerReady(Message, frozen=True, tag="worker_ready"):
    model: ModelDescription


class WorkerLoadFailed(Message, frozen=True, tag="load_failed"):
    code: ErrorCode
    message: str


class GenerationFinished(Message, frozen=True, tag="generation_finished"):
    request_id: str
    stop_reason: StopReason
    completion_tokens: int
    kv_tokens: int
    # With stop reason `repetition`: how many characters of the streamed text
    # came before the loop (the rest repeats them and is not part of the reply).
    keep_chars: int | None = None


class CountTokens(Message, frozen=True, tag="count_tokens"):
    """How many tokens `text` is to the model, as it would be a prompt (special tokens parsed,
    BOS as the model adds it). Asked of a remote model's worker, which asks the server's own
    tokenizer; answered with TokenCount, or RequestFailed when the server cannot say. Takes no
    generation slot."""

    request_id: str
    text: str


class TokenCount(Message, frozen=True, tag="token_count"):
    request_id: str
    count: int


class SetThreads(Message, frozen=True, tag="set_threads"):
    """Use `threads` threads from the next decode step on, also mid-generation:
    the supervisor shares the cores among the workers that are busy."""

    threads: int


ToWorker = HelloAccepted | Heartbeat | Generate | Cancel | Shutdown | RequestFailed | SetThreads | CountTokens
FromWorker = (
    Hello
    | WorkerReady
    | WorkerLoadFailed
    | Heartbeat
    | TokenDelta
    | TokenLogprobs
    | GenerationStats
    | GenerationFinished
    | RequestFailed
    | TokenCount
)
