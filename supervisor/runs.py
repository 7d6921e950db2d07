"""A client's run, and the model calls made for it.

`ActiveRun` is what the client sees: events sent under its `request_id` to
its client identity through the one outbound path the process shell provides
(`ClientSink`), and exactly one `RunFinished`, whatever happens (repeated
endings are ignored, so a crash racing a normal finish cannot send two ends).
It is also how work done for the run learns that the client cancelled.

`Generation` is one model call made for a run (an agent run makes several; a
context summary makes a hidden one). The worker sees only its internal id;
the generation forwards the worker's token and stats events to the run under
the client's id, collects the reply text, and resolves `outcome` exactly once:
when the worker says it finished, or when the worker dies.

The path of a token, end to end: the daemon decodes the worker's frame →
`WorkerHandle.on_message` → `Generation.deliver` → `ActiveRun.send` → the
daemon's `ClientSink`. Nothing on it holds a reference back up the chain.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Protocol

import msgspec

from bastion.protocol import (
    ErrorCode,
    GenerationStats,
    RequestFailed,
    SamplingParams,
    StopReason,
    TokenDelta,
    TokenLogprobs,
)
from bastion.protocol.agent_events import ReasoningDelta
from bastion.protocol.control import ControlEvent, RunFinished
from bastion.protocol.worker_wire import CallGrammar, FromWorker, GenerationFinished

# Sends one event to one client identity; never blocks (the daemon's outbound socket).
ClientSink = Callable[[bytes, ControlEvent], None]


class StreamSplit(Protocol):
    """Routes a reply's text as it streams: (text, is_reasoning) pieces; `flush` at the end
    gives what was held back (the start of a marker that never came)."""

    def feed(self, text: str) -> list[tuple[str, bool]]: ...

    def flush(self) -> list[tuple[str, bool]]: ...


class ActiveRun:
    def __init__(self, *, request_id: str, client: bytes, sink: ClientSink) -> None:
        self.request_id = request_id
        self.client = client
        self.model = ""
        self.started_at = time.monotonic()
        self.cancel_requested = False
        self.cancelled = asyncio.Event()
        self.finished: asyncio.Future[StopReason] = asyncio.get_running_loop().create_future()
        self._sink = sink

    @property
    def done(self) -> bool:
        return self.finished.done()

    def send(self, event: ControlEvent) -> None:
        if not self.done:
            self._sink(self.client, event)

    def request_cancel(self) -> None:
        self.cancel_requested = True
        self.cancelled.set()

    def fail(self, code: ErrorCode, message: str, *, retryable: bool = False, retry_after_ms: int | None = None) -> None:
        if self.done:
            return
        self.send(
            RequestFailed(
                request_id=self.request_id,
                code=code,
                message=message,
                retryable=retryable,
                retry_after_ms=retry_after_ms,
            )
        )
        self.finish(StopReason.ERROR)

    def finish(self, reason: StopReason) -> None:
        if self.done:
            return
        self._sink(self.client, RunFinished(request_id=self.request_id, stop_reason=reason))
        self.finished.set_result(reason)


class GenerationOutcome(msgspec.Struct, frozen=True, kw_only=True):
    text: str
    stop_reason: StopReason
    tokens: int
    stats: GenerationStats | None = None
    error: RequestFailed | None = None  # why it stopped, when stop_reason is error
    # The answer text the client was sent as `token` events (with a split, not all of `text`).
    streamed: str = ""

    @property
    def worker_died(self) -> bool:
        return self.error is not None and self.error.code in (ErrorCode.WORKER_DIED, ErrorCode.WORKER_UNRESPONSIVE)


class Generation:
    def __init__(
        self,
        *,
        internal_id: str,
        session_id: str,
        prompt: str,
        sampling: SamplingParams,
        run: ActiveRun,
        stream: bool = True,
        snapshot: bool = True,
        grammar: CallGrammar | None = None,
        split: StreamSplit | None = None,
    ) -> None:
        self.internal_id = internal_id
        self.grammar = grammar  # constrains the reply to a tool call (see harness/constraints.py)
        # Ask the worker to keep a KV snapshot for the session's next turn;
        # pointless for calls nobody continues (one-shot runs, summaries).
        self.snapshot = snapshot
        self.session_id = session_id
        self.prompt = prompt
        self.sampling = sampling
        self.stream = stream  # False: a hidden call (e.g. a summary); only stats reach the client
        self.outcome: asyncio.Future[GenerationOutcome] = asyncio.get_running_loop().create_future()
        # Where the worker's events go, restamped with the client's id.
        self._emit = run.send
        self._client_request_id = run.request_id
        # Reasoning streams as its own events; None: every piece of text is answer.
        self._split = split
        self._pieces: list[str] = []
        self._streamed: list[str] = []  # answer text sent to the client
        self._tokens = 0
        self._stats: GenerationStats | None = None
        self._error: RequestFailed | None = None
        self._keep_chars: int | None = None  # a repetition loop cut the reply here

    @property
    def done(self) -> bool:
        return self.outcome.done()

    @property
    def tokens_streamed(self) -> int:
        return self._tokens

    def deliver(self, message: FromWorker) -> None:
        """Take one message the worker sent about this generation."""
        match message:
            case TokenDelta(text=text, n=n):
                self._pieces.append(text)
                self._tokens = n
                if self.stream:
                    self._stream(message)
            case TokenLogprobs():
                # Passed on as they come: they describe tokens, which reasoning
                # splitting and call holding never reorder.
                if self.stream:
                    self._emit(msgspec.structs.replace(message, request_id=self._client_request_id))
            case GenerationStats():
                self._stats = message
                if self.stream:
                    self._emit(msgspec.structs.replace(message, request_id=self._client_request_id))
            case RequestFailed():
                self._error = message
            case GenerationFinished(stop_reason=reason, keep_chars=keep_chars):
                self._keep_chars = keep_chars
                if self.stream and self._split is not None:
                    self._emit_pieces(self._split.flush(), self._tokens, 0.0)
                self._resolve(reason)
            case _:
                pass

    def _stream(self, delta: TokenDelta) -> None:
        if self._split is None:
            self._streamed.append(delta.text)
            self._emit(msgspec.structs.replace(delta, request_id=self._client_request_id))
            return
        pieces = self._split.feed(delta.text)
        if not pieces:  # held back (maybe the start of a marker): the count still moves on
            self._emit(msgspec.structs.replace(delta, request_id=self._client_request_id, text=""))
        self._emit_pieces(pieces, delta.n, delta.tokens_per_s)

    def _emit_pieces(self, pieces: list[tuple[str, bool]], n: int, tokens_per_s: float) -> None:
        for text, reasoning in pieces:
            if reasoning:
                self._emit(ReasoningDelta(request_id=self._client_request_id, text=text, n=n))
            else:
                self._streamed.append(text)
                self._emit(TokenDelta(request_id=self._client_request_id, text=text, n=n, tokens_per_s=tokens_per_s))

    def fail(self, code: ErrorCode, message: str, *, retryable: bool = False) -> None:
        """The generation cannot complete (its worker died, the queue is gone)."""
        self._error = RequestFailed(request_id=self.internal_id, code=code, message=message, retryable=retryable)
        self._resolve(StopReason.ERROR)

    def _resolve(self, reason: StopReason) -> None:
        if self.done:
            return
        self.outcome.set_result(
            GenerationOutcome(text="".join(self._pieces)[: self._keep_chars], stop_reason=reason, tokens=self._tokens,
                              stats=self._stats, error=self._error, streamed="".join(self._streamed))
        )


def generation_ids(prefix: str = "g") -> Callable[[], str]:
    """Internal generation ids, unique within one supervisor: g1, g2, …"""
    numbers = itertools.count(1)
    return lambda: f"{prefix}{next(numbers)}"
