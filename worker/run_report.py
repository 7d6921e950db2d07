"""What one generation reports: its counters and clocks (`Run`) and the messages built from them.

`WorkerCore` (core.py) fills a `Run` as the generation goes and emits what
these build: a `TokenDelta` for streamed text, `TokenLogprobs` per token when
asked, one `GenerationStats` and one `GenerationFinished` at the end.
`token_digest` is how `kv_digest` names the tokens a prompt left in the KV
state (tests compare it with a fresh tokenization).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bastion.protocol import CacheSource, GenerationStats, StopReason, TokenDelta
from bastion.protocol.common import GrammarUse, TokenChoice, TokenLogprobs
from bastion.protocol.worker_wire import Generate, GenerationFinished
from bastion.worker.engine import GrammarOutcome


@dataclass
class Run:
    """Counters and clocks of one generation."""

    request: Generate
    started: float
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    prefill_done: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0
    cache_source: CacheSource = CacheSource.NONE
    shifted_tokens: int = 0
    cache_notes: tuple[str, ...] = ()
    kv_digest: str = ""
    grammar: GrammarOutcome = field(default_factory=lambda: GrammarOutcome(GrammarUse.NONE))
    chars: int = 0  # characters of text streamed so far
    char_ends: list[int] = field(default_factory=list)  # after each generated token
    streamed: list[str] = field(default_factory=list)
    keep_chars: int | None = None  # set when the reply is cut at a repetition loop
    evaluated: int = 0  # tokens evaluated for it
    held: str = ""  # text streamed but not yet sent (see core.DELTA_INTERVAL_S)
    last_emit: float = 0.0

    def decode_speed(self, now: float) -> float:
        # The first token comes out of the prefill; decoding speed is what follows it.
        elapsed = now - self.first_token
        return (self.completion_tokens - 1) / elapsed if self.first_token and elapsed > 0 else 0.0



def token_delta(run: Run, text: str, now: float) -> TokenDelta:
    return TokenDelta(
        request_id=run.request.request_id,
        text=text,
        n=run.completion_tokens,
        tokens_per_s=round(run.decode_speed(now), 2),
    )


def token_logprobs(run: Run, token: int, logprob: float, best: list[tuple[int, float]],
                   token_bytes: Callable[[int], bytes]) -> TokenLogprobs:
    def choice(token: int, logprob: float) -> TokenChoice:
        raw = token_bytes(token)
        return TokenChoice(token=raw.decode("utf-8", errors="replace"), token_bytes=raw, logprob=round(logprob, 6))

    return TokenLogprobs(request_id=run.request.request_id, chosen=choice(token, logprob),
                         top=tuple(choice(t, p) for t, p in best))


def run_finished(run: Run, reason: StopReason, kv_tokens: int) -> GenerationFinished:
    return GenerationFinished(
        request_id=run.request.request_id,
        stop_reason=reason,
        completion_tokens=run.completion_tokens,
        kv_tokens=kv_tokens,
        keep_chars=run.keep_chars,
    )


def run_stats(run: Run, kv_tokens: int) -> GenerationStats:
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
        kv_tokens=kv_tokens,
        cache_source=run.cache_source,
        shifted_tokens=run.shifted_tokens,
        cache_note="; ".join(run.cache_notes),
        kv_digest=run.kv_digest,
        grammar=run.grammar.use,
        grammar_triggered=_triggered(run),
        grammar_note=run.grammar.note,
    )


def _triggered(run: Run) -> bool:
    grammar = run.request.grammar
    if run.grammar.use is GrammarUse.FULL:
        return True
    return run.grammar.use is GrammarUse.LAZY and grammar is not None and grammar.start in "".join(run.streamed)


def token_digest(tokens: Sequence[int]) -> str:
    """blake2b-128 of token ids: what `GenerationStats.kv_digest` reports."""
    return hashlib.blake2b(struct.pack(f"<{len(tokens)}i", *tokens), digest_size=16).hexdigest()


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)
