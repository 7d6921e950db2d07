"""Following one streaming request to the supervisor from an HTTP route.

`Exchange` sends a `run` or `complete` over the link and hands the route its
events: `opening()` waits for `run_start` (through any model loading) and for the
generation to be accepted, so a request that fails early (an unknown model, a
bad schema, a full queue) becomes an HTTP error status rather than an error
inside a 200 stream; `events()` gives the rest,
with `None` whenever nothing arrived for `ping_s` (a streaming route sends a
keep-alive then, so proxies do not drop a long prefill). It records the
metrics every route shares (time to first token, time between tokens, token
counts, KV cache use) and the figures a response reports (`usage`).

Leaving the `async with` before the request finished cancels it in the
supervisor: an HTTP client that disconnects stops its generation in the worker.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator
from types import TracebackType

from bastion.gateway.errors import ApiError, from_failure
from bastion.gateway.link import LinkError, SupervisorLink
from bastion.gateway.metrics import Metrics
from bastion.protocol import ErrorCode, GenerationStats, RequestFailed, StopReason, TokenDelta
from bastion.protocol.agent_events import ContextBudget, ReasoningDelta, RunWarning, TurnStarted
from bastion.protocol.completion import Complete
from bastion.protocol.control import ControlEvent, LoadProgress, Run, RunFinished, RunStarted


class Usage:
    """Token figures summed over a request's generations (an agent run makes several)."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.prefill_ms = 0.0
        self.decode_ms = 0.0
        self.generations = 0

    def add(self, stats: GenerationStats) -> None:
        self.prompt_tokens += stats.prompt_tokens
        self.cached_tokens += stats.cached_tokens
        self.completion_tokens += stats.completion_tokens
        self.prefill_ms += stats.prefill_ms
        self.decode_ms += stats.decode_ms
        self.generations += 1

    def openai(self) -> dict[str, object]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}  # fmt: skip


class Exchange:
    def __init__(self, link: SupervisorLink, request: Run | Complete, metrics: Metrics, *, ping_s: float = 15.0):
        self._link = link
        self._request = request
        self._metrics = metrics
        self._ping_s = ping_s
        self._stack = contextlib.AsyncExitStack()
        self._queue: asyncio.Queue[ControlEvent] | None = None
        self.started_at = time.monotonic()
        self.load_ms = 0.0
        self.model = request.model or ""
        self.usage = Usage()
        self.stop_reason: StopReason | None = None
        self.failure: RequestFailed | None = None
        self._last_token_at: float | None = None
        self._early: collections.deque[ControlEvent] = collections.deque()  # read while opening

    async def __aenter__(self) -> Exchange:
        try:
            self._queue = await self._stack.enter_async_context(self._link.stream(self._request))
        except LinkError as exc:
            raise ApiError(503, exc.message, code=exc.code.value, retry_after_s=2, retryable=True) from exc
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        await self._stack.__aexit__(kind, error, trace)

    async def opening(self) -> RunStarted:
        """The request's `run_start`, once the generation was accepted too: ApiError if it failed
        before (an unknown model, a full queue). A generation that has said nothing more within
        `ping_s` (a long prefill) is taken as accepted, so a streaming route can start its pings."""
        assert self._queue is not None
        started: RunStarted | None = None
        while True:
            try:
                event = await asyncio.wait_for(self._queue.get(), self._ping_s if started else None)
            except TimeoutError:
                assert started is not None
                return started
            match event:
                case RunStarted():
                    self.model = event.model
                    self.load_ms = (time.monotonic() - self.started_at) * 1000
                    started = event
                case LoadProgress():
                    continue
                case RequestFailed():
                    self.failure = event
                    raise from_failure(event)
                case RunFinished(stop_reason=reason) if started is None:
                    self.stop_reason = reason
                    raise ApiError(499 if reason is StopReason.CANCELLED else 500,
                                   f"the request ended ({reason.value}) before it started")
                case ContextBudget() | TurnStarted() | RunWarning():  # sent before the generation is queued
                    self._early.append(event)
                case _:
                    self._early.append(event)
                    if started is not None:
                        return started

    async def events(self) -> AsyncIterator[ControlEvent | None]:
        """Every event after `run_start`, up to and including `run_end`; None when nothing a client
        would see came for `ping_s` (no event, or only the empty deltas of text held back)."""
        assert self._queue is not None
        while self._early:
            event = self._early.popleft()
            self._observe(event)
            yield event
            if isinstance(event, RunFinished):
                return
        shown_at = time.monotonic()
        async for waited in self._link.events(self._queue, idle_s=self._ping_s):
            now = time.monotonic()
            if waited is None or (isinstance(waited, TokenDelta) and not waited.text):
                if waited is not None:
                    self._observe(waited)
                if now - shown_at >= self._ping_s:
                    shown_at = now
                    yield None
                continue
            shown_at = now
            self._observe(waited)
            yield waited

    def _observe(self, event: ControlEvent) -> None:
        match event:
            case TokenDelta(text=text) | ReasoningDelta(text=text) if text:
                now = time.monotonic()
                if self._last_token_at is None:
                    self._metrics.first_token(self.model, now - self.started_at)
                else:
                    self._metrics.between_tokens(self.model, now - self._last_token_at)
                self._last_token_at = now
            case GenerationStats():
                self.usage.add(event)
                self._metrics.generation(self.model, event)
            case RequestFailed():
                self.failure = event
            case RunFinished(stop_reason=reason):
                self.stop_reason = reason
            case _:
                pass

    @property
    def failed(self) -> bool:
        """Whether the request ended without its answer: an error, or a cancel nobody on this side
        asked for (the supervisor shutting down)."""
        return self.stop_reason in (StopReason.ERROR, StopReason.CANCELLED)

    def error(self) -> ApiError:
        """What went wrong, for a request that `failed`."""
        if self.failure is not None:
            return from_failure(self.failure)
        if self.stop_reason is StopReason.CANCELLED:
            return ApiError(503, "the request was cancelled before it finished (is the supervisor shutting down?)",
                            code="cancelled", retry_after_s=2, retryable=True)
        return ApiError(500, "the request ended with an error", code=ErrorCode.INTERNAL.value)
