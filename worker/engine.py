"""The `Engine` seam: what the worker needs from an inference library, at token level.

The harness hands down tokens and sampling settings and gets tokens back; it
never reaches into the library. Everything above this seam (prefix reuse
policy, chunking, stop strings, detokenization, timing, the wire) belongs to
`WorkerCore`; everything below (KV memory, logits, samplers) to the engine.

An engine holds one model and `n_seq` sequences (`sequences()`), each an
independent KV state in the same context: several requests decode together,
one token of each per `evaluate_batch` call (continuous batching). Shared:

    tokenize(text)        special tokens parsed; BOS added only when the model
                          wants one and the text does not already start with it
    evaluate_batch(parts) one llama_decode over chunks of several sequences
                          (at most `n_batch` tokens in all); each sequence gets
                          fresh logits for its chunk's last token. Cancelled,
                          every sequence holds what it held before the call
    state_layout()        what a snapshot's bytes depend on besides the model
                          file (context size, cache types); a snapshot made
                          under another layout must not be restored
    set_threads(n)        threads for the following decodes

Per sequence (`EngineSequence`), in the order a generation uses it:

    keep_prefix(tokens)   truncate the KV state to the longest common prefix with
                          `tokens`, leaving some of `tokens` to evaluate (see
                          `reusable_prefix`); returns how many are kept. An
                          engine that cannot drop part of its KV state resets
                          it and returns 0.
    evaluate(tokens)      append one chunk to the KV state (at most `n_batch`);
                          `evaluate_batch` with this sequence alone
    begin_sampling(p)     set up a sampler for one generation
    sample()              pick the next token from the last evaluated position
    end_sampling()        free the sampler; always called, even after a failure
    reset()               drop the whole KV state (after a failure mid-evaluate)
    kv_token_ids()        the tokens the KV state holds, in position order
    can_truncate_to(n)    whether `keep_prefix` could keep `n` tokens; a
                          sliding-window cache forgets old positions and can
                          only be cut back while it still holds the window
    can_shift()           whether a range can be removed from the middle and
                          the rest moved down (llama.cpp's context shift)
    shift_out(a, b)       remove positions [a, b) and shift the rest down
    save_sequence()       the KV state as bytes (a snapshot)
    restore_sequence(d, t) replace the KV state with snapshot `d` holding
                          tokens `t`; False (state reset) if it was refused

`n_ctx` is each sequence's own context: one sequence never takes another's room.
Engines raise `EngineError` (or anything else, which the core treats the same)
and are used from one thread at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import msgspec

from bastion.protocol import SamplingParams
from bastion.protocol.common import GrammarUse
from bastion.protocol.worker_wire import CallGrammar


class EngineError(Exception):
    """The engine could not do what was asked (a failed load or decode, a full context)."""


class EvaluationCancelled(Exception):
    """`evaluate` stopped partway because its `cancelled` check said so; the KV state holds
    what it held before the call (nothing of the interrupted tokens)."""


class InvalidModelFile(EngineError):
    """The model file is missing or is not a model this engine can read."""


class EngineInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What an engine holds, read once after loading."""

    architecture: str
    n_ctx: int
    n_ctx_train: int
    n_vocab: int
    n_params: int
    n_batch: int
    threads: int
    chat_template: str  # '' when the model carries none
    bos_token: str  # token text, '' when the model has no such token
    eos_token: str
    gguf_name: str = ""  # general.name, '' when the model carries none
    # False for caches that cannot be cut back anywhere (a sliding window
    # forgets old positions): snapshots are then taken where the next prompt
    # will extend them exactly, right after the prompt is evaluated.
    partial_reuse: bool = True
    n_seq: int = 1  # sequences decoded together (each with n_ctx of its own)


class GrammarOutcome(msgspec.Struct, frozen=True):
    """Whether `begin_sampling` put a grammar in the sampler, and why not when one was asked for."""

    use: GrammarUse
    note: str = ""


class EngineSequence(Protocol):
    """One sequence's KV state and sampler in an engine's context (see the module docstring)."""

    @property
    def seq_id(self) -> int: ...

    def kv_tokens(self) -> int: ...

    def keep_prefix(self, tokens: Sequence[int]) -> int: ...

    def evaluate(self, tokens: Sequence[int], cancelled: Callable[[], bool] | None = None) -> None:
        """Extend the KV state with `tokens`. With `cancelled`, the engine checks it while it computes
        (not only between calls) and raises EvaluationCancelled soon after it turns true."""
        ...

    def begin_sampling(self, params: SamplingParams, grammar: CallGrammar | None = None) -> GrammarOutcome: ...

    def sample(self) -> int: ...

    def token_logprobs(self, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
        """Right after `sample()`: the natural-log probability of `token` under the model at that
        step, and the `top` most likely tokens with theirs, most likely first."""
        ...

    def end_sampling(self) -> None: ...

    def reset(self) -> None: ...

    def kv_token_ids(self) -> list[int]: ...

    def can_truncate_to(self, keep: int) -> bool: ...

    def can_shift(self) -> bool: ...

    def shift_out(self, start: int, end: int) -> None: ...

    def save_sequence(self) -> bytes: ...

    def restore_sequence(self, data: bytes, tokens: Sequence[int]) -> bool: ...


BatchPart = tuple[EngineSequence, Sequence[int]]


class Engine(Protocol):
    def describe(self) -> EngineInfo: ...

    def tokenize(self, text: str) -> list[int]: ...

    def sequences(self) -> Sequence[EngineSequence]: ...

    def evaluate_batch(self, parts: Sequence[BatchPart], cancelled: Callable[[], bool] | None = None) -> None:
        """Extend each part's sequence with its tokens in one computation (see the module docstring)."""
        ...

    def is_end_of_generation(self, token: int) -> bool: ...

    def token_bytes(self, token: int) -> bytes: ...

    def state_layout(self) -> str: ...

    def set_threads(self, threads: int) -> None: ...

    def close(self) -> None: ...


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


MIN_EVALUATED = 2


def reusable_prefix(cached: Sequence[int], wanted: Sequence[int]) -> int:
    """How much of `cached` a new prompt `wanted` may keep: the common prefix,
    less enough to evaluate at least `MIN_EVALUATED` tokens of `wanted`.

    One would do for fresh logits, but llama.cpp's CPU kernels compute a
    one-token batch along another path, whose logits differ slightly from the
    same position in a longer batch; with two or more they are bit-identical,
    so repeating a prompt at temperature 0 gives the same reply whether or not
    it was cached."""
    return max(0, min(common_prefix_length(cached, wanted), len(wanted) - MIN_EVALUATED))
