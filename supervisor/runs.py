"""One client request being answered by a worker: `ActiveRun`.

A run translates between the client's `request_id` and the internal id the
worker sees (two clients may pick the same request id), forwards worker events
to its client, and ends exactly once with a `RunFinished`. Whoever holds a run
(a worker's queue, the loader) ends it through `fail` or `finish`; repeated
endings are ignored, so a crash racing a normal finish cannot send two ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec

from bastion.protocol import ErrorCode, GenerationStats, RequestFailed, SamplingParams, StopReason, TokenDelta
from bastion.protocol.control import ControlEvent, RunFinished
from bastion.protocol.worker_wire import FromWorker, GenerationFinished


class ActiveRun:
    def __init__(
        self,
        *,
        internal_id: str,
        request_id: str,
        client: bytes,
        session_id: str,
        sampling: SamplingParams,
        emit: Callable[[ControlEvent], None],
    ) -> None:
        self.internal_id = internal_id
        self.request_id = request_id
        self.client = client
        self.session_id = session_id
        self.sampling = sampling
        self.prompt = ""
        self.model = ""
        self.started_at = time.monotonic()
        self.tokens_streamed = 0
        self.cancel_requested = False
        self.finished: asyncio.Future[StopReason] = asyncio.get_running_loop().create_future()
        self._emit = emit

    @property
    def done(self) -> bool:
        return self.finished.done()

    def send(self, event: ControlEvent) -> None:
        if not self.done:
            self._emit(event)

    def deliver(self, message: FromWorker) -> None:
        """Forward one message the worker sent about this run."""
        match message:
            case TokenDelta():
                self.tokens_streamed = message.n
                self.send(msgspec.structs.replace(message, request_id=self.request_id))
            case GenerationStats():
                self.send(msgspec.structs.replace(message, request_id=self.request_id))
            case RequestFailed():
                self.send(msgspec.structs.replace(message, request_id=self.request_id))
            case GenerationFinished(stop_reason=reason):
                self.finish(reason)
            case _:
                pass

    def fail(self, code: ErrorCode, message: str, *, retryable: bool = False, retry_after_ms: int | None = None) -> None:
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
        self._emit(RunFinished(request_id=self.request_id, stop_reason=reason))
        self.finished.set_result(reason)
