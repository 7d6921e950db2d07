"""`WorkerCore`: serving `Generate`s over an `Engine`, with no sockets or threads.

Owns the generation policy: prefill in chunks, the decode loop
and its cancellation points, stop conditions, streaming text and timing, and
the scheduling of several generations at once. The process shell feeds it
requests and carries what it emits; tests drive it in-process with `FakeEngine`.

Continuous batching: each of the engine's sequences is a lane; a request
takes the free lane whose KV state shares the longest prefix with its prompt
(at least LANE_AFFINITY_MIN tokens), else an empty one, else the least
recently used. Each generation is a generator (`_serve`)
that yields the token chunks it needs evaluated on its lane; `step()` gathers
what every active generation waits for (one token per decoding generation
first, then prefill chunks up to `n_batch` tokens in all), evaluates it in one
`evaluate_batch` and resumes the generations whose chunk is done. With one
lane this is exactly the sequential loop. `generate()` is `start()` plus
`step()` until that request ends.

KV reuse (the live sequence, a context shift, the session's snapshot or
another session's with the same prefix) is `KvReuse`'s (kv_reuse.py): the core
asks it, before each prefill, how much of the prompt the KV state already holds.

What every `Generate` gets, in order (the supervisor relies on it):

    ran to an end      TokenDelta*  GenerationStats  GenerationFinished(stop|length|cancelled)
    refused or failed  RequestFailed  GenerationFinished(error)

so exactly one `GenerationFinished` always, and exactly one `GenerationStats`
for a generation that ran. An engine failure never escapes `step`: the
failing generation's KV state is dropped (it may be half-written), the
others in its batch go on, and the next request is served.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import msgspec

from bastion.protocol import ErrorCode, RequestFailed, StopReason
from bastion.protocol.common import MAX_TOP_LOGPROBS
from bastion.protocol.worker_wire import CountTokens, FromWorker, Generate, TokenCount
from bastion.worker.engine import (
    MIN_EVALUATED,
    BatchPart,
    Engine,
    EngineSequence,
    EvaluationCancelled,
    common_prefix_length,
)
from bastion.worker.kv_reuse import KvReuse
from bastion.worker.kv_snapshots import SnapshotStore
from bastion.worker.repetition import RepetitionGuard, keep_whole_words
from bastion.worker.run_report import Run, run_finished, run_stats, token_delta, token_digest, token_logprobs
from bastion.worker.text import TextStream

log = logging.getLogger(__name__)

Emit = Callable[[FromWorker], None]
Cancelled = Callable[[], bool]
# A generation as the scheduler drives it: it yields the chunks it needs
# evaluated on its lane's sequence (EvaluationCancelled may be thrown in at
# a yield) and returns why it ended.
Steps = Generator[Sequence[int], None, StopReason]


# Fewer shared tokens than this (a BOS, a chat template's first line) do not
# make a sequence the place for a prompt: an empty one keeps more state warm.
LANE_AFFINITY_MIN = 16


# By default a generation's text goes out at most once per this interval (the
# first token at once, what is held at its end; CoreConfig.delta_interval_s): each message costs a hop through the
# supervisor and the gateway, and on a machine whose cores all decode, every
# wakeup of those processes is taken from the decode threads. 20 updates a
# second still read as a stream; a model slower than 20 tokens/s is not held
# at all. Requests for logprobs get one delta per token, matching their
# TokenLogprobs. (Measured on 2 cores, one 256-token stream through the
# gateway: 54.5 tok/s unheld, 58.3 held.)
DELTA_INTERVAL_S = 0.05


class CoreConfig(msgspec.Struct, frozen=True, kw_only=True):
    # Tokens per prefill step; also the cancellation granularity of a prefill.
    # Capped by the engine's n_batch.
    prefill_chunk: int = 256
    # Least time between two TokenDeltas of one generation; 0 sends every token.
    delta_interval_s: float = DELTA_INTERVAL_S


class _Refused(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Lane:
    """One engine sequence and the reuse of its KV state."""

    sequence: EngineSequence
    reuse: KvReuse
    last_used: int = 0
    active: _Active | None = None


@dataclass
class _Active:
    """A generation in progress on a lane, and the chunk it waits to have evaluated."""

    run: Run
    lane: _Lane
    steps: Steps
    cancelled: Cancelled
    chunk: Sequence[int] = ()
    done: int = 0  # tokens of `chunk` evaluated so far (a chunk may span batches)
    prefill: bool = False  # the chunk is part of a prompt (checked for a cancel mid-computation)
    reason: StopReason | None = None  # once it ended

    def part(self, n: int) -> BatchPart:
        """The next `n` tokens of its chunk, for its lane's sequence."""
        return self.lane.sequence, self.chunk[self.done : self.done + n]


class WorkerCore:
    def __init__(
        self,
        engine: Engine,
        config: CoreConfig = CoreConfig(),
        snapshots: SnapshotStore | None = None,
        threads_wanted: Callable[[], int] = lambda: 0,
    ) -> None:
        self._engine = engine
        self._threads_wanted = threads_wanted
        self._threads = 0
        self._info = engine.describe()
        self._chunk = max(1, min(config.prefill_chunk, self._info.n_batch))
        self._delta_interval = config.delta_interval_s
        self._snapshots = snapshots if snapshots is not None and snapshots.enabled else None
        self._lanes = [_Lane(sequence, KvReuse(sequence, self._info, self._snapshots))
                       for sequence in engine.sequences()]
        self._active: list[_Active] = []  # in the order they started
        self._uses = itertools.count(1)
        # Plain ints written by the engine thread and read by the IO thread for
        # heartbeats; a torn read is impossible under the GIL.
        self._progress = 0
        self._kv_tokens = self._held_tokens()

    @property
    def snapshots(self) -> SnapshotStore | None:
        return self._snapshots

    @property
    def progress(self) -> int:
        """Tokens evaluated since start; only grows."""
        return self._progress

    @property
    def kv_tokens(self) -> int:
        """Tokens held in the KV state of all sequences."""
        return self._kv_tokens

    @property
    def active(self) -> int:
        """Generations started and not yet ended."""
        return len(self._active)

    @property
    def ready(self) -> bool:
        """Whether `step()` has work now (the process shell blocks on its inbox otherwise)."""
        return bool(self._active)

    def count_tokens(self, request: CountTokens, emit: Emit) -> None:
        """The engine's own count of a text as a prompt (the supervisor counts a local model's
        tokens itself; this answers the same question a remote model's worker does)."""
        emit(TokenCount(request_id=request.request_id, count=len(self._engine.tokenize(request.text))))

    def generate(self, request: Generate, emit: Emit, cancelled: Cancelled) -> StopReason:
        """Serve `request` to its end (with any other started generation batched alongside)."""
        active = self.start(request, emit, cancelled)
        while active is not None and active.reason is None:
            self.step()
        return active.reason if active is not None and active.reason is not None else StopReason.ERROR

    def start(self, request: Generate, emit: Emit, cancelled: Cancelled) -> _Active | None:
        """Admit `request` on a free lane and run it up to its first evaluation; None when it
        ended at once (refused)."""
        run = Run(request=request, started=time.perf_counter())
        try:
            tokens = self._admit(request)
        except _Refused as refusal:
            self._fail(run, emit, refusal.code, refusal.message)
            return None
        except Exception as exc:
            log.exception("request %s: tokenizing failed", request.request_id)
            self._fail(run, emit, ErrorCode.INTERNAL, f"engine failure: {exc}")
            return None
        lane = self._free_lane(tokens)
        if lane is None:  # the link admits no more requests than there are lanes
            self._fail(run, emit, ErrorCode.BUSY, f"all {len(self._lanes)} sequences are busy")
            return None
        lane.last_used = next(self._uses)
        active = _Active(run=run, lane=lane, steps=self._serve(run, lane, tokens, emit, cancelled),
                         cancelled=cancelled)
        lane.active = active
        self._active.append(active)
        self._resume(active, None)
        return active

    def _free_lane(self, tokens: Sequence[int]) -> _Lane | None:
        """The free lane holding the longest prefix of `tokens` (one worth reusing); else an empty
        one; else the least recently used, whose state is the least likely to be wanted again."""
        free = [lane for lane in self._lanes if lane.active is None]
        if not free:
            return None

        def preference(lane: _Lane) -> tuple[int, bool, int]:
            shared = common_prefix_length(lane.sequence.kv_token_ids(), tokens)
            return (shared if shared >= LANE_AFFINITY_MIN else 0, lane.sequence.kv_tokens() == 0, -lane.last_used)

        return max(free, key=preference)

    def step(self) -> None:
        """One evaluation for the active generations (see the module docstring)."""
        if not self._active:
            return
        self._adjust_threads()
        for active in [a for a in self._active if a.cancelled()]:
            # Between two evaluations: it need not wait for the batch.
            self._resume(active, EvaluationCancelled())
        batch = self._gather()
        if not batch:
            return
        parts: list[BatchPart] = [a.part(n) for a, n in batch]
        actives = [a for a, _ in batch]
        # A prompt chunk can take a second: the engine then checks for a cancel inside it.
        check = (lambda: any(a.cancelled() for a in actives)) if any(a.prefill for a in actives) else None
        try:
            self._engine.evaluate_batch(parts, check)
        except EvaluationCancelled:
            for active in actives:
                if active.cancelled():
                    self._resume(active, EvaluationCancelled())
            return  # the others evaluate the same tokens at the next step
        except Exception as exc:
            self._kv_tokens = self._held_tokens()
            self._isolate_failure(batch, exc)
            return
        self._kv_tokens = self._held_tokens()
        self._evaluated(batch)

    def _isolate_failure(self, batch: list[tuple[_Active, int]], exc: Exception) -> None:
        """A failed batch left every sequence as it was. Alone, it fails its generation; shared,
        each part is tried alone, so that one bad request does not end the others."""
        if len(batch) == 1:
            self._resume(batch[0][0], exc)
            return
        for active, n in batch:
            try:
                self._engine.evaluate_batch([active.part(n)])
            except Exception as alone:
                self._resume(active, alone)
            else:
                self._evaluated([(active, n)])
            finally:
                self._kv_tokens = self._held_tokens()

    def _evaluated(self, batch: list[tuple[_Active, int]]) -> None:
        for active, n in batch:
            active.done += n
            active.run.evaluated += n
            self._progress += n
            if active.done == len(active.chunk):
                self._resume(active, None)

    def _gather(self) -> list[tuple[_Active, int]]:
        """(generation, tokens of its chunk) for the next batch: one token for each decoding
        generation first, then prompt chunks in the order their generations started."""
        budget = self._info.n_batch
        batch: list[tuple[_Active, int]] = []
        for active in sorted(self._active, key=lambda a: a.prefill):
            left = len(active.chunk) - active.done
            take = min(left, budget)
            if take < left and left - take < MIN_EVALUATED:
                # Never leave a lone last token: the prompt's last logits come from two or more.
                take = left - MIN_EVALUATED
            if take <= 0:
                continue
            batch.append((active, take))
            budget -= take
            if budget <= 0:
                break
        return batch

    def _resume(self, active: _Active, value: BaseException | None) -> None:
        """Run `active` to its next chunk (throwing `value` in at its yield), or to its end."""
        try:
            chunk = active.steps.send(None) if value is None else active.steps.throw(value)
        except StopIteration as ended:
            active.reason = ended.value
            active.lane.active = None
            self._active.remove(active)
            self._kv_tokens = self._held_tokens()
            return
        active.chunk, active.done = chunk, 0

    def _held_tokens(self) -> int:
        return sum(lane.sequence.kv_tokens() for lane in self._lanes)

    def _serve(self, run: Run, lane: _Lane, tokens: list[int], emit: Emit, cancelled: Cancelled) -> Steps:
        request = run.request
        try:
            reason = yield from self._run(run, lane, tokens, emit, cancelled)
        except _Refused as refusal:
            return self._fail(run, emit, refusal.code, refusal.message)
        except Exception as exc:  # an engine failure must not end the worker
            log.exception("request %s: engine failure", request.request_id)
            self._recover(lane)
            return self._fail(run, emit, ErrorCode.INTERNAL, f"engine failure: {exc}")
        emit(run_stats(run, self._kv_tokens))
        # Before the end is reported: a crash right after the turn must still
        # find it on disk (see SnapshotStore.put). A run cancelled before it
        # evaluated anything leaves the state half-prepared (a shift not yet
        # applied, a reset): it must not replace the session's good snapshot.
        if self._info.partial_reuse and reason is not StopReason.ERROR and run.evaluated:
            lane.reuse.keep_snapshot(request, durable=True)
        emit(run_finished(run, reason, self._kv_tokens))
        log.info(
            "request %s: %s, prompt %d (cached %d), completion %d",
            request.request_id,
            reason.value,
            run.prompt_tokens,
            run.cached_tokens,
            run.completion_tokens,
        )
        return reason

    def _run(self, run: Run, lane: _Lane, tokens: list[int], emit: Emit, cancelled: Cancelled) -> Steps:
        run.prompt_tokens = len(tokens)
        reuse = lane.reuse.prepare(run.request.session_id, tokens)
        run.cached_tokens, run.cache_source = reuse.cached_tokens, reuse.source
        run.shifted_tokens, run.cache_notes = reuse.shifted_tokens, reuse.notes
        self._kv_tokens = self._held_tokens()
        active = lane.active
        assert active is not None
        active.prefill = True
        completed = yield from self._prefill(tokens[run.cached_tokens :], cancelled)
        active.prefill = False
        run.prefill_done = time.perf_counter()
        if not completed:
            run.finished = run.prefill_done
            return StopReason.CANCELLED
        run.kv_digest = token_digest(lane.sequence.kv_token_ids()[: run.prompt_tokens])
        if not self._info.partial_reuse:
            lane.reuse.keep_snapshot(run.request)
        return (yield from self._decode(run, lane.sequence, emit, cancelled))

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

    def _adjust_threads(self) -> None:
        """Follow the supervisor's share of the cores (SetThreads), also when
        it changes in the middle of a generation."""
        wanted = self._threads_wanted()
        if wanted > 0 and wanted != self._threads:
            self._engine.set_threads(wanted)
            self._threads = wanted
            log.info("decoding with %d thread(s) from now on", wanted)

    def _prefill(self, suffix: Sequence[int], cancelled: Cancelled) -> Generator[Sequence[int], None, bool]:
        for chunk in prefill_chunks(suffix, self._chunk):
            if cancelled():
                return False
            try:
                yield chunk
            except EvaluationCancelled:
                return False
        return True

    def _decode(self, run: Run, sequence: EngineSequence, emit: Emit, cancelled: Cancelled) -> Steps:
        text = TextStream(run.request.sampling.stop)
        run.grammar = sequence.begin_sampling(run.request.sampling, run.request.grammar)
        try:
            reason = yield from self._sample_loop(run, sequence, text, emit, cancelled)
        finally:
            sequence.end_sampling()
            run.finished = time.perf_counter()
        tail = text.flush()
        if tail and reason is not StopReason.REPETITION:
            run.held += tail
        self._flush(run, emit)
        return reason

    def _sample_loop(self, run: Run, sequence: EngineSequence, text: TextStream, emit: Emit,
                     cancelled: Cancelled) -> Steps:
        engine, sampling = self._engine, run.request.sampling
        guard = RepetitionGuard() if sampling.loop_guard and not sampling.ignore_eos else None
        while True:
            if run.completion_tokens >= sampling.max_tokens:
                return StopReason.LENGTH
            if cancelled():
                return StopReason.CANCELLED
            token = sequence.sample()
            now = time.perf_counter()
            if not run.first_token:
                run.first_token = now
            if not sampling.ignore_eos and engine.is_end_of_generation(token):
                return StopReason.STOP
            run.completion_tokens += 1
            if sampling.logprobs is not None:
                logprob, best = sequence.token_logprobs(token, min(sampling.logprobs, MAX_TOP_LOGPROBS))
                emit(token_logprobs(run, token, logprob, best, engine.token_bytes))
            piece, stopped = text.push(engine.token_bytes(token))
            self._stream(run, piece, now, emit)
            run.char_ends.append(run.chars)
            if stopped:
                return StopReason.STOP
            if guard is not None and guard.push(token):
                assert guard.loop_start is not None
                keep = run.char_ends[guard.loop_start - 1] if guard.loop_start else 0
                run.keep_chars = keep_whole_words("".join(run.streamed), keep)
                return StopReason.REPETITION
            # The sampled token was streamed; it only needs evaluating if
            # another one will follow, and that needs room in the context.
            if sequence.kv_tokens() >= self._info.n_ctx:
                return StopReason.LENGTH
            try:
                yield (token,)
            except EvaluationCancelled:
                return StopReason.CANCELLED

    def _stream(self, run: Run, piece: str, now: float, emit: Emit) -> None:
        run.chars += len(piece)
        if piece:
            run.streamed.append(piece)  # where a loop is cut, whether a grammar's trigger came
        if run.request.sampling.logprobs is None and run.last_emit and now - run.last_emit < self._delta_interval:
            run.held += piece
            return
        emit(token_delta(run, run.held + piece, now))
        run.held, run.last_emit = "", now

    def _flush(self, run: Run, emit: Emit) -> None:
        if run.held:
            emit(token_delta(run, run.held, run.finished))
            run.held = ""

    def _recover(self, lane: _Lane) -> None:
        try:
            lane.sequence.end_sampling()
            lane.sequence.reset()
        except Exception:
            log.exception("engine reset after a failure failed too")
        self._kv_tokens = self._held_tokens()

    def _fail(self, run: Run, emit: Emit, code: ErrorCode, message: str) -> StopReason:
        request_id = run.request.request_id
        log.warning("request %s failed: %s: %s", request_id, code.value, message)
        emit(RequestFailed(request_id=request_id, code=code, message=message))
        emit(run_finished(run, StopReason.ERROR, self._kv_tokens))
        return StopReason.ERROR

def prefill_chunks(suffix: Sequence[int], size: int) -> list[Sequence[int]]:
    """`suffix` in chunks of at most `size`, the last one never a lone token
    when it can be helped (the prompt's last logits then come from a batch of
    two or more; see `engine.reusable_prefix` for why that matters)."""
    bounds = list(range(0, len(suffix), size))
    if size > 1 and len(bounds) > 1 and len(suffix) - bounds[-1] < MIN_EVALUATED:
        bounds[-1] -= 1
    return [suffix[a:b] for a, b in zip(bounds, [*bounds[1:], len(suffix)])]
