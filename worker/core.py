"""`WorkerCore`: serving one `Generate` over an `Engine`, with no sockets or threads.

Owns the generation policy: prefix reuse, prefill in chunks, the decode loop
and its cancellation points, stop conditions, streaming text and timing. The
process shell feeds it requests and carries what it emits; tests drive it
in-process with `FakeEngine`.

What every `Generate` gets, in order (the supervisor relies on it):

    ran to an end      TokenDelta*  GenerationStats  GenerationFinished(stop|length|cancelled)
    refused or failed  RequestFailed  GenerationFinished(error)

so exactly one `GenerationFinished` always, and exactly one `GenerationStats`
for a generation that ran. An engine failure never escapes `generate`: the KV
state is dropped (it may be half-written) and the next request is served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec

from bastion.protocol import ErrorCode, GenerationStats, RequestFailed, StopReason, TokenDelta
from bastion.protocol.worker_wire import FromWorker, Generate, GenerationFinished
from bastion.worker.engine import MIN_EVALUATED, Engine
from bastion.worker.text import TextStream

log = logging.getLogger(__name__)

Emit = Callable[[FromWorker], None]
Cancelled = Callable[[], bool]


class CoreConfig(msgspec.Struct, frozen=True, kw_only=True):
    # Tokens per prefill step; also the cancellation granularity of a prefill.
    # Capped by the engine's n_batch.
    prefill_chunk: int = 256


class _Refused(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Run:
    """Counters and clocks of one generation."""

    request: Generate
    started: float
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    prefill_done: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0

    def decode_speed(self, now: float) -> float:
        # The first token comes out of the prefill; decoding speed is what follows it.
        elapsed = now - self.first_token
        return (self.completion_tokens - 1) / elapsed if self.first_token and elapsed > 0 else 0.0


class WorkerCore:
    def __init__(self, engine: Engine, config: CoreConfig = CoreConfig()) -> None:
        self._engine = engine
        self._info = engine.describe()
        self._chunk = max(1, min(config.prefill_chunk, self._info.n_batch))
        # Plain ints written by the engine thread and read by the IO thread for
        # heartbeats; a torn read is impossible under the GIL.
        self._progress = 0
        self._kv_tokens = engine.kv_tokens()

    @property
    def progress(self) -> int:
        """Tokens evaluated since start; only grows."""
        return self._progress

    @property
    def kv_tokens(self) -> int:
        return self._kv_tokens

    def generate(self, request: Generate, emit: Emit, cancelled: Cancelled) -> StopReason:
        run = _Run(request=request, started=time.perf_counter())
        try:
            reason = self._run(run, emit, cancelled)
        except _Refused as refusal:
            return self._fail(run, emit, refusal.code, refusal.message)
        except Exception as exc:  # an engine failure must not end the worker
            log.exception("request %s: engine failure", request.request_id)
            self._recover()
            return self._fail(run, emit, ErrorCode.INTERNAL, f"engine failure: {exc}")
        emit(self._stats(run))
        emit(self._finished(run, reason))
        log.info(
            "request %s: %s, prompt %d (cached %d), completion %d",
            request.request_id,
            reason.value,
            run.prompt_tokens,
            run.cached_tokens,
            run.completion_tokens,
        )
        return reason

    def _run(self, run: _Run, emit: Emit, cancelled: Cancelled) -> StopReason:
        tokens = self._admit(run.request)
        run.prompt_tokens = len(tokens)
        run.cached_tokens = self._engine.keep_prefix(tokens)
        self._kv_tokens = self._engine.kv_tokens()
        completed = self._prefill(tokens[run.cached_tokens :], cancelled)
        run.prefill_done = time.perf_counter()
        if not completed:
            run.finished = run.prefill_done
            return StopReason.CANCELLED
        return self._decode(run, emit, cancelled)

    def _admit(self, request: Generate) -> list[int]:
        if request.sampling.max_tokens < 0:
            raise _Refused(ErrorCode.INVALID_REQUEST, "max_tokens must not be negative")
        tokens = self._engine.tokenize(request.prompt)
        if not tokens:
            raise _Refused(ErrorCode.INVALID_REQUEST, "the prompt is empty")
        if len(tokens) >= self._info.n_ctx:
            raise _Refused(
                ErrorCode.CONTEXT_OVERFLOW,
                f"the prompt is {len(tokens)} tokens; the context holds {self._info.n_ctx}"
                " including at least one generated token",
            )
        return tokens

    def _prefill(self, suffix: Sequence[int], cancelled: Cancelled) -> bool:
        for chunk in prefill_chunks(suffix, self._chunk):
            if cancelled():
                return False
            self._engine.evaluate(chunk)
            self._progress += len(chunk)
            self._kv_tokens += len(chunk)
        return True

    def _decode(self, run: _Run, emit: Emit, cancelled: Cancelled) -> StopReason:
        text = TextStream(run.request.sampling.stop)
        self._engine.begin_sampling(run.request.sampling)
        try:
            reason = self._sample_loop(run, text, emit, cancelled)
        finally:
            self._engine.end_sampling()
            run.finished = time.perf_counter()
        tail = text.flush()
        if tail:
            emit(self._delta(run, tail, run.finished))
        return reason

    def _sample_loop(self, run: _Run, text: TextStream, emit: Emit, cancelled: Cancelled) -> StopReason:
        engine, sampling = self._engine, run.request.sampling
        while True:
            if run.completion_tokens >= sampling.max_tokens:
                return StopReason.LENGTH
            if cancelled():
                return StopReason.CANCELLED
            token = engine.sample()
            now = time.perf_counter()
            if not run.first_token:
                run.first_token = now
            if not sampling.ignore_eos and engine.is_end_of_generation(token):
                return StopReason.STOP
            run.completion_tokens += 1
            piece, stopped = text.push(engine.token_bytes(token))
            emit(self._delta(run, piece, now))
            if stopped:
                return StopReason.STOP
            # The sampled token was streamed; it only needs evaluating if
            # another one will follow, and that needs room in the context.
            if engine.kv_tokens() >= self._info.n_ctx:
                return StopReason.LENGTH
            engine.evaluate((token,))
            self._progress += 1
            self._kv_tokens += 1

    def _delta(self, run: _Run, text: str, now: float) -> TokenDelta:
        return TokenDelta(
            request_id=run.request.request_id,
            text=text,
            n=run.completion_tokens,
            tokens_per_s=round(run.decode_speed(now), 2),
        )

    def _recover(self) -> None:
        try:
            self._engine.end_sampling()
            self._engine.reset()
        except Exception:
            log.exception("engine reset after a failure failed too")
        self._kv_tokens = 0

    def _fail(self, run: _Run, emit: Emit, code: ErrorCode, message: str) -> StopReason:
        request_id = run.request.request_id
        log.warning("request %s failed: %s: %s", request_id, code.value, message)
        emit(RequestFailed(request_id=request_id, code=code, message=message))
        emit(self._finished(run, StopReason.ERROR))
        return StopReason.ERROR

    def _finished(self, run: _Run, reason: StopReason) -> GenerationFinished:
        return GenerationFinished(
            request_id=run.request.request_id,
            stop_reason=reason,
            completion_tokens=run.completion_tokens,
            kv_tokens=self._kv_tokens,
        )

    def _stats(self, run: _Run) -> GenerationStats:
        prefill_s = run.prefill_done - run.started
        decode_s = run.finished - run.first_token if run.first_token else 0.0
        evaluated = run.prompt_tokens - run.cached_tokens
        return GenerationStats(
            request_id=run.request.request_id,
            prompt_tokens=run.prompt_tokens,
            cached_tokens=run.cached_tokens,
            completion_tokens=run.completion_tokens,
            ttft_ms=_ms(run.first_token - run.started) if run.first_token else 0.0,
            prefill_ms=_ms(prefill_s),
            decode_ms=_ms(decode_s),
            prefill_tokens_per_s=round(evaluated / prefill_s, 2) if prefill_s > 0 else 0.0,
            decode_tokens_per_s=round((run.completion_tokens - 1) / decode_s, 2) if decode_s > 0 else 0.0,
            kv_tokens=self._kv_tokens,
        )


def prefill_chunks(suffix: Sequence[int], size: int) -> list[Sequence[int]]:
    """`suffix` in chunks of at most `size`, the last one never a lone token
    when it can be helped (the prompt's last logits then come from a batch of
    two or more; see `engine.reusable_prefix` for why that matters)."""
    bounds = list(range(0, len(suffix), size))
    if size > 1 and len(bounds) > 1 and len(suffix) - bounds[-1] < MIN_EVALUATED:
        bounds[-1] -= 1
    return [suffix[a:b] for a, b in zip(bounds, [*bounds[1:], len(suffix)])]


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)
