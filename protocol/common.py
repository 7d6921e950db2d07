"""Messages and enums used on more than one socket direction.

Every message is a frozen msgspec Struct tagged in the `type` field; the tag is
also the `type` a `--json` consumer sees. A struct may belong to several
direction unions (a `Hello` starts both worker and client connections), but a
tag names exactly one struct across the whole protocol.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from bastion.protocol.errors import ErrorCode
from bastion.protocol.remote import BackendGauge


class Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every wire message."""


class Role(enum.Enum):
    CLIENT = "client"
    WORKER = "worker"
    SANDBOX = "sandbox"


class StopReason(enum.Enum):
    STOP = "stop"  # end-of-generation token or a stop string; for a run: a reply without tool calls
    LENGTH = "length"  # max_tokens reached, or the context is full
    CANCELLED = "cancelled"
    ERROR = "error"
    MAX_ITERATIONS = "max_iterations"  # the agent loop hit its ceiling of model calls
    REPAIR_LIMIT = "repair_limit"  # the model kept producing unusable tool calls
    REPETITION = "repetition"  # the reply kept repeating the same span; what came before the loop is kept


class WorkerState(enum.Enum):
    STARTING = "starting"  # process spawned, no hello yet
    LOADING = "loading"  # hello received, model loading
    IDLE = "idle"
    BUSY = "busy"
    STOPPING = "stopping"
    DEAD = "dead"
    RESTARTING = "restarting"  # its worker died; a new one is being started after a backoff
    FAILED = "failed"  # crashed too often in a short window; restarts stopped until `bastion load`


class CacheSource(enum.Enum):
    """Where the reused part of a prompt's KV state came from."""

    LIVE = "live"  # the worker's live sequence already held it
    RAM = "ram"  # restored from a per-session snapshot held in memory
    DISK = "disk"  # restored from a snapshot spilled under BASTION_HOME
    NONE = "none"  # nothing reused: the whole prompt was evaluated


class Hello(Message, frozen=True, tag="hello"):
    """First message of every connection, from the side that connects."""

    protocol_version: int
    role: Role
    name: str = ""
    pid: int = 0


class HelloAccepted(Message, frozen=True, tag="hello_accepted"):
    protocol_version: int
    supervisor_pid: int


class Heartbeat(Message, frozen=True, tag="heartbeat"):
    """Sent both ways on the worker link. `progress` only ever grows while the
    worker does useful work (tokens evaluated), so a stuck counter during a
    generation means a hang even when heartbeats still arrive."""

    seq: int
    progress: int = 0
    kv_tokens: int = 0
    busy: bool = False
    # Per-session KV snapshots the worker holds (see worker/kv_snapshots.py).
    snapshots_ram: int = 0
    snapshot_ram_bytes: int = 0
    snapshots_disk: int = 0
    snapshot_disk_bytes: int = 0
    # A remote model's servers (protocol/remote.py); empty for a local model.
    backends: tuple[BackendGauge, ...] = ()


class RequestFailed(Message, frozen=True, tag="error"):
    """An error as data. `request_id` is empty when the failure is not tied to
    a request (a malformed frame, a refused hello)."""

    code: ErrorCode
    message: str
    request_id: str = ""
    retryable: bool = False
    retry_after_ms: int | None = None


class Cancel(Message, frozen=True, tag="cancel"):
    request_id: str


class Shutdown(Message, frozen=True, tag="shutdown"):
    request_id: str = ""


class KvCacheType(enum.Enum):
    """How a model worker stores its KV cache: llama.cpp's f16, or q8_0 (8-bit
    blocks, about half the memory; needs flash attention)."""

    F16 = "f16"
    Q8_0 = "q8_0"


# The most requests one model worker decodes together (`parallel`), each in a
# KV sequence of its own; past this the per-sequence memory outweighs what
# batching gains on a CPU.
MAX_PARALLEL = 16


# The most alternatives a token's log-probability report lists (OpenAI's limit too).
MAX_TOP_LOGPROBS = 20
TopLogprobs = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_LOGPROBS)]


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    # Keep generating through end-of-generation tokens (benchmarks that need a
    # fixed number of tokens).
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    # Stop a reply that keeps repeating the same span (stop reason `repetition`);
    # never while ignore_eos asks for a fixed number of tokens.
    loop_guard: bool = True
    # Report each sampled token's log-probability (a `token_logprobs` event per
    # token) with this many most likely alternatives (0-20); None: not at all.
    logprobs: TopLogprobs | None = None


class GrammarUse(enum.Enum):
    """Whether a generation's sampling was constrained by a grammar, and how."""

    NONE = "none"  # none was asked for
    FULL = "full"  # the whole reply was constrained from its first token
    LAZY = "lazy"  # free until a trigger text appeared; `grammar_triggered` says whether one did
    UNAVAILABLE = "unavailable"  # this engine cannot constrain sampling (a scripted model)
    FAILED = "failed"  # the schema could not be turned into a grammar; the reply was free text


class TokenDelta(Message, frozen=True, tag="token"):
    """New text of a generation. `n` is the running count of generated tokens;
    `text` may be empty while a multi-byte character is incomplete."""

    request_id: str
    text: str
    n: int
    tokens_per_s: float


class TokenChoice(msgspec.Struct, frozen=True, kw_only=True):
    """One token and its log-probability under the model (natural log, before
    temperature and the other samplers reshape the distribution)."""

    token: str  # its text; a piece of a multi-byte character decodes with U+FFFD
    token_bytes: bytes
    logprob: float


class TokenLogprobs(Message, frozen=True, tag="token_logprobs"):
    """The sampled token's log-probability and the most likely alternatives at
    that step, sent just before the `token` event that carries its text, for
    generations whose sampling asked for `logprobs`. The end-of-generation
    token is not reported."""

    request_id: str
    chosen: TokenChoice
    top: tuple[TokenChoice, ...] = ()


class GenerationStats(Message, frozen=True, tag="generation_stats"):
    """Exactly one per generation that produced any result, before its end."""

    request_id: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_ms: float
    prefill_ms: float
    decode_ms: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    kv_tokens: int
    cache_source: CacheSource = CacheSource.NONE
    # Tokens of dropped turns removed from the KV state in place (context shift)
    # instead of re-evaluating what followed them.
    shifted_tokens: int = 0
    # Why reuse was less than it could have been (a discarded snapshot, a
    # sliding-window cache that cannot be truncated); '' when nothing to say.
    cache_note: str = ""
    # blake2b-128 hex of the prompt's token ids as the KV state now holds them;
    # equal to the digest of a fresh tokenization when the state is exact.
    kv_digest: str = ""
    # Constrained decoding: whether a grammar shaped this reply, and why not when asked for.
    grammar: GrammarUse = GrammarUse.NONE
    grammar_triggered: bool = False
    grammar_note: str = ""
