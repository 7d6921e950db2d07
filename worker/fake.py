"""`FakeEngine`: a scripted, deterministic `Engine` for unit tests only.

Tokens are the bytes of the UTF-8 text (0..255) plus two control tokens, BOS
(`<s>`, 256) and EOS (`</s>`, 257), so a multi-byte character always spans
several tokens. Each generation replies with the next string of the script
(cycling), then EOS; sampling past EOS starts the reply over.

It also checks the seam's contract, so a core bug fails loudly: sampling needs
a fresh evaluate, `keep_prefix` must leave something to evaluate, the context
cannot overflow. A prompt containing `fail_marker` makes `evaluate` raise once
that text is in the KV state (how tests, in-process or through the real
process, provoke an engine failure mid-request).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import msgspec

from bastion.protocol import SamplingParams
from bastion.protocol.common import GrammarUse
from bastion.protocol.worker_wire import CallGrammar
from bastion.worker.engine import (
    BatchPart,
    EngineError,
    EngineInfo,
    EvaluationCancelled,
    GrammarOutcome,
    reusable_prefix,
)

BOS = 256
EOS = 257
_SPECIAL = {"<s>": BOS, "</s>": EOS}


class FakeEngineConfig(msgspec.Struct, frozen=True, kw_only=True):
    script: tuple[str, ...] = ("Hello from the fake engine.",)
    n_ctx: int = 4096
    n_batch: int = 256
    add_bos: bool = True
    # Seconds each sample() takes, to give cancellation something to interrupt.
    token_delay: float = 0.0
    # Seconds the constructor takes, standing in for a slow model load.
    load_delay: float = 0.0
    fail_marker: str = "<<fail>>"
    # False imitates a cache that refuses partial removal (a sliding window).
    partial_removal: bool = True
    chat_template: str = ""
    architecture: str = "fake"
    # False: each reply is used once, in order, and running out is an error
    # (a scripted model for evals and bug reports must not silently repeat).
    cycle: bool = True
    n_seq: int = 1  # sequences decoded together


class FakeEngine:
    def __init__(self, config: FakeEngineConfig = FakeEngineConfig()) -> None:
        if config.load_delay:
            time.sleep(config.load_delay)
        self._config = config
        self._replies = 0
        self._fail = config.fail_marker.encode() if config.fail_marker else b""
        self.evaluated_chunks: list[int] = []  # sizes, for tests of the chunking policy
        self.batches: list[list[tuple[int, int]]] = []  # per evaluate_batch: (sequence, tokens) of each part
        self.checked_cancel_inside: list[bool] = []  # per evaluate: whether it could be cancelled midway
        self.shifted: list[tuple[int, int]] = []  # context shifts, for tests
        self.grammars: list[CallGrammar | None] = []  # what each generation was asked to follow, for tests
        self.threads = 1
        self.closed = False
        self._sequences = [FakeSequence(self, seq_id) for seq_id in range(config.n_seq)]

    @property
    def config(self) -> FakeEngineConfig:
        return self._config

    def describe(self) -> EngineInfo:
        return EngineInfo(
            architecture=self._config.architecture,
            n_ctx=self._config.n_ctx,
            n_ctx_train=self._config.n_ctx,
            n_vocab=258,
            n_params=0,
            n_batch=self._config.n_batch,
            threads=1,
            chat_template=self._config.chat_template,
            bos_token="<s>",
            eos_token="</s>",
            partial_reuse=self._config.partial_removal,
            n_seq=self._config.n_seq,
        )

    def sequences(self) -> Sequence[FakeSequence]:
        return self._sequences

    def tokenize(self, text: str) -> list[int]:
        tokens = [BOS] if self._config.add_bos and not text.startswith("<s>") else []
        rest = text
        while rest:
            special = next((s for s in _SPECIAL if rest.startswith(s)), None)
            if special is not None:
                tokens.append(_SPECIAL[special])
                rest = rest[len(special) :]
                continue
            cut = min((i for i in (rest.find(s) for s in _SPECIAL) if i > 0), default=len(rest))
            tokens.extend(rest[:cut].encode("utf-8"))
            rest = rest[cut:]
        return tokens

    def evaluate_batch(self, parts: Sequence[BatchPart], cancelled: Callable[[], bool] | None = None) -> None:
        self.checked_cancel_inside.append(cancelled is not None)
        if not parts or any(not tokens for _, tokens in parts):
            raise EngineError("evaluate_batch() of no tokens")
        if cancelled is not None and cancelled():  # as llama.cpp's abort check, mid-computation
            raise EvaluationCancelled
        total = sum(len(tokens) for _, tokens in parts)
        if total > self._config.n_batch:
            raise EngineError(f"batch of {total} tokens exceeds n_batch {self._config.n_batch}")
        sequences = [sequence for sequence, _ in parts]
        if len({id(s) for s in sequences}) != len(sequences):
            raise EngineError("a sequence twice in one batch")
        for sequence, tokens in parts:
            assert isinstance(sequence, FakeSequence)
            if len(sequence.kv) + len(tokens) > self._config.n_ctx:
                raise EngineError("context full")
        self.batches.append([(s.seq_id, len(t)) for s, t in parts])
        failed = False
        for sequence, tokens in parts:
            assert isinstance(sequence, FakeSequence)
            sequence.kv.extend(tokens)
            self.evaluated_chunks.append(len(tokens))
            # Only the new tokens and what a marker could straddle need looking at.
            tail = sequence.kv[-(len(tokens) + len(self._fail)) :]
            failed = failed or bool(self._fail and self._fail in bytes(t for t in tail if t < 256))
            sequence.has_logits = True
        if failed:
            raise EngineError("scripted failure")

    def next_reply(self) -> list[int]:
        script = self._config.script or ("",)
        if not self._config.cycle and self._replies >= len(script):
            raise EngineError(f"the scripted model has no reply left: all {len(script)} were used")
        reply = [*script[self._replies % len(script)].encode("utf-8"), EOS]
        self._replies += 1
        return reply

    def is_end_of_generation(self, token: int) -> bool:
        return token == EOS

    def token_bytes(self, token: int) -> bytes:
        return bytes([token]) if token < 256 else b""

    def state_layout(self) -> str:
        return f"fake; n_ctx {self._config.n_ctx}; partial_removal {self._config.partial_removal}"

    def set_threads(self, threads: int) -> None:
        self.threads = threads

    def close(self) -> None:
        self.closed = True


class FakeSequence:
    """One sequence of a `FakeEngine`: its token list is its whole KV state."""

    def __init__(self, engine: FakeEngine, seq_id: int) -> None:
        self._engine = engine
        self._seq_id = seq_id
        self.kv: list[int] = []
        self.has_logits = False
        self._reply: list[int] | None = None
        self._position = 0

    @property
    def seq_id(self) -> int:
        return self._seq_id

    def kv_tokens(self) -> int:
        return len(self.kv)

    def keep_prefix(self, tokens: Sequence[int]) -> int:
        keep = reusable_prefix(self.kv, tokens)
        if keep < len(self.kv) and not self._engine.config.partial_removal:
            keep = 0
        del self.kv[keep:]
        self.has_logits = False
        return keep

    def evaluate(self, tokens: Sequence[int], cancelled: Callable[[], bool] | None = None) -> None:
        self._engine.evaluate_batch([(self, tokens)], cancelled)

    def begin_sampling(self, params: SamplingParams, grammar: CallGrammar | None = None) -> GrammarOutcome:
        self._reply = self._engine.next_reply()
        self._position = 0
        self._engine.grammars.append(grammar)
        if grammar is None:
            return GrammarOutcome(GrammarUse.NONE)
        # A script is replayed as written: nothing here could constrain it.
        return GrammarOutcome(GrammarUse.UNAVAILABLE, "a scripted model replays its replies as written")

    def sample(self) -> int:
        if self._reply is None:
            raise EngineError("sample() outside begin_sampling()/end_sampling()")
        if not self.has_logits:
            raise EngineError("sample() without a fresh evaluate()")
        if self._engine.config.token_delay:
            time.sleep(self._engine.config.token_delay)
        token = self._reply[self._position % len(self._reply)]
        self._position += 1
        self.has_logits = False
        return token

    def token_logprobs(self, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
        # A script replays its replies with certainty: probability 1, no alternative.
        return 0.0, [(token, 0.0)][:top]

    def end_sampling(self) -> None:
        self._reply = None

    def reset(self) -> None:
        self.kv.clear()
        self.has_logits = False

    def kv_token_ids(self) -> list[int]:
        return list(self.kv)

    def can_truncate_to(self, keep: int) -> bool:
        return keep > 0 and (keep >= len(self.kv) or self._engine.config.partial_removal)

    def can_shift(self) -> bool:
        return self._engine.config.partial_removal

    def shift_out(self, start: int, end: int) -> None:
        if not (0 <= start < end <= len(self.kv)) or not self.can_shift():
            raise EngineError(f"cannot remove positions [{start}, {end}) of {len(self.kv)}")
        del self.kv[start:end]
        self.has_logits = False
        self._engine.shifted.append((start, end))

    def save_sequence(self) -> bytes:
        # The fake's whole state is its token list.
        return b"FAKEKV" + b"".join(t.to_bytes(2, "little") for t in self.kv)

    def restore_sequence(self, data: bytes, tokens: Sequence[int]) -> bool:
        self.reset()
        if not data.startswith(b"FAKEKV") or (len(data) - 6) % 2:
            return False
        held = [int.from_bytes(data[i : i + 2], "little") for i in range(6, len(data), 2)]
        if held != list(tokens):
            return False
        self.kv = held
        return True
