"""Model calls for one run: submit a prompt, wait for the reply or the run's
cancel, and ask again when the worker died before anything was shown.

`ModelCalls.generate` makes one call and always returns an outcome: the reply
and how it ended. If the model's worker dies before any of the reply reached
the client (a hidden call, such as a summary, never reaches it), the call is
asked again once the model's restarted worker is ready — the client sees a
`generation_retried` warning, not an error — up to `max_retries` times; past
that, the death is the outcome. A model with no worker to come back (failed,
unloaded, restarting for too long) is an error outcome too. Only a worker
that refuses the call outright (its queue is full) raises.

It knows the model only as something that serves generations (`ServedModel`),
so tests drive it with a stand-in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from bastion.protocol import RequestFailed, SamplingParams, StopReason
from bastion.protocol.agent_events import RunWarning, WarningCode
from bastion.protocol.worker_wire import CallGrammar
from bastion.supervisor.errors import WorkerUnavailableError
from bastion.supervisor.runs import ActiveRun, Generation, GenerationOutcome
from bastion.supervisor.tools.call_hold import CallHold
from bastion.supervisor.tools.reasoning import (
    Piece,
    PieceKind,
    ReasoningFormat,
    ReasoningSplitter,
    prompt_opens_reasoning,
)


class GenerationServer(Protocol):
    """A worker as model calls see it (processes.workers.WorkerHandle)."""

    def submit(self, generation: Generation) -> None: ...

    def cancel(self, generation: Generation) -> None: ...


class ServedModel(Protocol):
    """A loaded model as model calls see it (models.loaded.LoadedModel)."""

    async def serving(self) -> GenerationServer: ...


class ModelCalls:
    def __init__(
        self,
        *,
        run: ActiveRun,
        model: ServedModel,
        new_id: Callable[[], str],
        max_retries: int = 1,
        keep_snapshots: bool = True,
    ) -> None:
        self._run = run
        self._model = model
        self._new_id = new_id
        self._max_retries = max_retries
        # Only a conversation someone continues has a next turn to restore a KV snapshot for.
        self._keep_snapshots = keep_snapshots

    async def generate(
        self, prompt: str, sampling: SamplingParams, session_id: str, *, stream: bool = True,
        grammar: CallGrammar | None = None, reasoning: ReasoningFormat = ReasoningFormat.NONE,
        hold_calls: frozenset[str] | None = None,
    ) -> GenerationOutcome:
        """One model call; with a `reasoning` format, the reasoning it streams comes as `reasoning`
        events apart from the answer's tokens (a prompt that opened reasoning starts inside it).
        With `hold_calls` (the offered tools' names), answer text stops streaming where a call may
        begin (call_hold.py): `outcome.streamed` is what the client got."""
        retries = 0
        starts_inside = prompt_opens_reasoning(prompt, reasoning)
        while True:
            split = None
            if reasoning is not ReasoningFormat.NONE or hold_calls is not None:
                split = _Split(reasoning, starts_inside, None if hold_calls is None else CallHold(hold_calls))
            generation = Generation(internal_id=self._new_id(), session_id=session_id, prompt=prompt,
                                    sampling=sampling, run=self._run, stream=stream,
                                    snapshot=stream and self._keep_snapshots, grammar=grammar,
                                    split=split)  # fmt: skip
            try:
                outcome = await self._attempt(generation)
            except WorkerUnavailableError as exc:  # failed, unloaded, or not back from a restart in time
                return GenerationOutcome(text="", stop_reason=StopReason.ERROR, tokens=0, error=RequestFailed(
                    request_id=generation.internal_id, code=exc.code, message=exc.message, retryable=exc.retryable))
            unseen = generation.tokens_streamed == 0 or not stream
            if not (outcome.worker_died and unseen) or retries >= self._max_retries or self._run.cancel_requested:
                return outcome
            retries += 1
            first_line = outcome.error.message.splitlines()[0] if outcome.error and outcome.error.message else ""
            self._run.send(RunWarning(
                request_id=self._run.request_id, code=WarningCode.GENERATION_RETRIED,
                message=f"{first_line or 'its worker died'}; asking again once the model is back "
                        f"(retry {retries} of {self._max_retries})",
            ))  # fmt: skip

    async def _attempt(self, generation: Generation) -> GenerationOutcome:
        """Submit `generation` once a worker serves the model (waiting through
        a restart), and wait for it or for the run's cancel."""
        cancelled = asyncio.ensure_future(self._run.cancelled.wait())
        serving = asyncio.ensure_future(self._model.serving())
        try:
            racers: set[asyncio.Future[Any]] = {serving, cancelled}
            await asyncio.wait(racers, return_when=asyncio.FIRST_COMPLETED)
            if not serving.done():
                return GenerationOutcome(text="", stop_reason=StopReason.CANCELLED, tokens=0)
            server = serving.result()
            server.submit(generation)
            racers = {generation.outcome, cancelled}
            await asyncio.wait(racers, return_when=asyncio.FIRST_COMPLETED)
            if not generation.done:
                server.cancel(generation)
            return await generation.outcome
        finally:
            serving.cancel()
            cancelled.cancel()


class _Split:
    """The reasoning splitter (tools/reasoning.py) as a generation streams through it, and the
    answer through a call hold (tools/call_hold.py) when the client executes the calls itself."""

    def __init__(self, fmt: ReasoningFormat, starts_inside: bool, hold: CallHold | None) -> None:
        self._splitter = ReasoningSplitter(fmt, starts_inside=starts_inside)
        self._hold = hold

    def feed(self, text: str) -> list[tuple[str, bool]]:
        return self._held(self._splitter.feed(text))

    def flush(self) -> list[tuple[str, bool]]:
        return self._held(self._splitter.flush())

    def _held(self, pieces: list[Piece]) -> list[tuple[str, bool]]:
        out = []
        for piece in pieces:
            reasoning = piece.kind is PieceKind.REASONING
            text = piece.text if reasoning or self._hold is None else self._hold.feed(piece.text)
            if text:
                out.append((text, reasoning))
        return out
