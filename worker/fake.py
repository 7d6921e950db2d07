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


class FakeEngine:
    def __init__(self, config: FakeEngineConfig = FakeEngineConfig()) -> None:
        if config.load_delay:
            time.sleep(config.load_delay)
        self._config = config
        self._kv: list[int] = []
        self._has_logits = False
        self._replies = 0
        self._reply: list[int] | None = None
        self._position = 0
        self._fail = config.fail_marker.encode() if config.fail_marker else b""
        self.evaluated_chunks: list[int] = []  # sizes, for tests of the chunking policy
        self.checked_cancel_inside: list[bool] = []  # per evaluate: whether it could be cancelled midway
        self.shifted: list[tuple[int, int]] = []  # context shifts, for tests
        self.grammars: list[CallGrammar | None] = []  # what each generation was asked to follow, for tests
        self.threads = 1
        self.closed = False

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
        )

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

    def kv_tokens(self) -> int:
        return len(self._kv)

    def keep_prefix(self, tokens: Sequence[int]) -> int:
        keep = reusable_prefix(self._kv, tokens)
        if keep < len(self._kv) and not self._config.partial_removal:
            keep = 0
        del self._kv[keep:]
        self._has_logits = False
        return keep

    def evaluate(self, tokens: Sequence[int], cancelled: Callable[[], bool] | None = None) -> None:
        if not tokens:
            raise EngineError("evaluate() of no tokens")
        self.checked_cancel_inside.append(cancelled is not None)
        if cancelled is not None and cancelled():  # as llama.cpp's abort check, mid-computation
            raise EvaluationCancelled
        if len(tokens) > self._config.n_batch:
            raise EngineError(f"chunk of {len(tokens)} exceeds n_batch {self._config.n_batch}")
        if len(self._kv) + len(tokens) > self._config.n_ctx:
            raise EngineError("context full")
        self._kv.extend(tokens)
        self.evaluated_chunks.append(len(tokens))
        # Only the new tokens and what a marker could straddle need looking at.
        tail = self._kv[-(len(tokens) + len(self._fail)) :]
        if self._fail and self._fail in bytes(t for t in tail if t < 256):
            raise EngineError("scripted failure")
        self._has_logits = True

    def begin_sampling(self, params: SamplingParams, grammar: CallGrammar | None = None) -> GrammarOutcome:
        script = self._config.script or ("",)
        if not self._config.cycle and self._replies >= len(script):
            raise EngineError(f"the scripted model has no reply left: all {len(script)} were used")
        self._reply = [*script[self._replies % len(script)].encode("utf-8"), EOS]
        self._replies += 1
        self._position = 0
        self.grammars.append(grammar)
        if grammar is None:
            return GrammarOutcome(GrammarUse.NONE)
        # A script is replayed as written: nothing here could constrain it.
        return GrammarOutcome(GrammarUse.UNAVAILABLE, "a scripted model replays its replies as written")

    def sample(self) -> int:
        if self._reply is None:
            raise EngineError("sample() outside begin_sampling()/end_sampling()")
        if not self._has_logits:
            raise EngineError("sample() without a fresh evaluate()")
        if self._config.token_delay:
            time.sleep(self._config.token_delay)
        token = self._reply[self._position % len(self._reply)]
        self._position += 1
        self._has_logits = False
        return token

    def token_logprobs(self, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
        # A script replays its replies with certainty: probability 1, no alternative.
        return 0.0, [(token, 0.0)][:top]

    def end_sampling(self) -> None:
        self._reply = None

    def is_end_of_generation(self, token: int) -> bool:
        return token == EOS

    def token_bytes(self, token: int) -> bytes:
        return bytes([token]) if token < 256 else b""

    def reset(self) -> None:
        self._kv.clear()
        self._has_logits = False

    def kv_token_ids(self) -> list[int]:
        return list(self._kv)

    def can_truncate_to(self, keep: int) -> bool:
        return keep > 0 and (keep >= len(self._kv) or self._config.partial_removal)

    def can_shift(self) -> bool:
        return self._config.partial_removal

    def shift_out(self, start: int, end: int) -> None:
        if not (0 <= start < end <= len(self._kv)) or not self.can_shift():
            raise EngineError(f"cannot remove positions [{start}, {end}) of {len(self._kv)}")
        del self._kv[start:end]
        self._has_logits = False
        self.shifted.append((start, end))

    def save_sequence(self) -> bytes:
        # The fake's whole state is its token list.
        return b"FAKEKV" + b"".join(t.to_bytes(2, "little") for t in self._kv)

    def restore_sequence(self, data: bytes, tokens: Sequence[int]) -> bool:
        self.reset()
        if not data.startswith(b"FAKEKV") or (len(data) - 6) % 2:
            return False
        held = [int.from_bytes(data[i : i + 2], "little") for i in range(6, len(data), 2)]
        if held != list(tokens):
            return False
        self._kv = held
        return True

    def state_layout(self) -> str:
        return f"fake; n_ctx {self._config.n_ctx}; partial_removal {self._config.partial_removal}"

    def set_threads(self, threads: int) -> None:
        self.threads = threads

    def close(self) -> None:
        self.closed = True
