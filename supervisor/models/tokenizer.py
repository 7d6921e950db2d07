"""Counting the tokens of a prompt the way the model's worker will tokenize it.

Owns the `TokenCounter` seam the context budget counts through, the counter
backed by a model's real vocabulary (`VocabTokenCounter`), the counter that
matches the scripted test engine (`ByteTokenCounter`), and `TokenCounters`,
which loads each model's vocabulary once and frees them all on close.

A count must equal the length of what the worker's engine `tokenize` returns
for the same text (worker/engine.py's contract): special tokens are parsed,
and BOS is added only when the model wants one and the text does not already
start with it. Counting a prompt as the worker does is what makes a budget
exact rather than an estimate.

This is the one supervisor module allowed to import `llama_cpp` (DESIGN §1),
and only to load a vocabulary (`vocab_only=True`): no weights, no inference.
It imports it lazily, so a supervisor that never counts real tokens never pays
for the library. It must not render prompts or decide what to prune.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol

from bastion.protocol.agent_events import TokenCounting
from bastion.supervisor.errors import InvalidModelFileError
from bastion.supervisor.models.sources import read_gguf_header

# llama_tokenize returns this when the token count does not fit an int32.
_TOKENIZE_OVERFLOW = -(2**31)


class TokenCounter(Protocol):
    # How the count is made, as the context_budget event says it (TokenCounting).
    @property
    def counting(self) -> TokenCounting: ...

    def count(self, text: str) -> int: ...


class VocabTokenCounter:
    """One model's vocabulary, loaded without its weights.

    Safe to call from several threads (e.g. `asyncio.to_thread`): calls are
    serialized, so `close` can never free the vocabulary under a running count.
    """

    counting = TokenCounting.VOCABULARY

    def __init__(self, model_path: str | Path) -> None:
        # Imported here, not at module level: see the module docstring.
        import llama_cpp

        self.model_path = Path(model_path)
        read_gguf_header(self.model_path)  # a clear error for a missing or non-GGUF file
        started = time.perf_counter()
        try:
            llama = llama_cpp.Llama(model_path=str(self.model_path), vocab_only=True, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise InvalidModelFileError(
                f"llama.cpp could not read the vocabulary of {self.model_path}: {exc}"
            ) from exc
        self.load_ms = (time.perf_counter() - started) * 1000
        self._stack = contextlib.ExitStack()
        self._stack.callback(llama.close)
        self._lock = threading.Lock()
        self._closed = False
        self._tokenize = llama_cpp.llama_tokenize
        self._vocab = llama_cpp.llama_model_get_vocab(llama.model)
        bos = llama_cpp.llama_vocab_bos(self._vocab)
        self._bos_text = llama_cpp.llama_vocab_get_text(self._vocab, bos).decode("utf-8") if bos >= 0 else ""
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))

    @property
    def bos_text(self) -> str:
        return self._bos_text

    @property
    def adds_bos(self) -> bool:
        return self._add_bos

    def count(self, text: str) -> int:
        # The same decision as LlamaCppEngine.tokenize: a rendered template
        # usually starts with the BOS text already.
        add_bos = self._add_bos and not (self._bos_text and text.startswith(self._bos_text))
        data = text.encode("utf-8")
        with self._lock:
            if self._closed:
                raise RuntimeError(f"token counter for {self.model_path} is closed")
            # With no room for tokens, llama_tokenize only reports how many it
            # would write (negated): one pass, no token list built.
            n = self._tokenize(self._vocab, data, len(data), None, 0, add_bos, True)
        if n == _TOKENIZE_OVERFLOW:
            raise ValueError(f"text of {len(data)} bytes has too many tokens to count")
        return -n

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._stack.close()


class ByteTokenCounter:
    """Counts as worker/fake.py's FakeEngine tokenizes: one token per UTF-8
    byte, except that `<s>` (BOS) and `</s>` (EOS) are one token each, and a
    BOS is added unless the text starts with `<s>` (when `add_bos`, the
    fake's default)."""

    _BOS = "<s>"
    _EOS = "</s>"
    counting = TokenCounting.VOCABULARY  # the scripted engine's own tokenization

    def __init__(self, *, add_bos: bool = True) -> None:
        self._add_bos = add_bos

    def count(self, text: str) -> int:
        # The two specials cannot overlap each other or themselves, so
        # counting occurrences is the same as the fake's left-to-right scan.
        n = len(text.encode("utf-8"))
        n -= (len(self._BOS) - 1) * text.count(self._BOS) + (len(self._EOS) - 1) * text.count(self._EOS)
        return n + (1 if self._add_bos and not text.startswith(self._BOS) else 0)


class EstimatedTokenCounter:
    """For a model whose vocabulary is not here and whose server cannot count: one
    token per ESTIMATE_BYTES_PER_TOKEN bytes of ASCII, rounded up, and one per byte
    of anything else, plus one. Real tokenizers average 3.5 to 4.5 bytes a token
    on English prose and about 3 on code; outside ASCII, vocabularies that fall
    back to bytes spend up to a token per byte. So this errs towards counting more
    and pruning early; text denser than 3 characters a token (hex, base64) can
    still be undercounted, which `vocab` or a server with /tokenize avoids."""

    counting = TokenCounting.ESTIMATE

    def count(self, text: str) -> int:
        encoded = text.encode("utf-8")
        ascii_bytes = sum(1 for byte in encoded if byte < 0x80)
        return -(-ascii_bytes // ESTIMATE_BYTES_PER_TOKEN) + (len(encoded) - ascii_bytes) + 1


ESTIMATE_BYTES_PER_TOKEN = 3
# The longest a count by a remote server may take before the estimate stands in for it.
REMOTE_COUNT_TIMEOUT_S = 10.0


class RemoteTokenCounter:
    """Counts with a remote model's own tokenizer: its worker asks the server (CountTokens).
    Built on the event loop; `count` is called from the threads the budget plans in, and
    waits there for the answer. A count that fails or is asked on the loop itself (where
    waiting would block the answer) is estimated instead, conservatively."""

    counting = TokenCounting.REMOTE

    def __init__(self, ask: Callable[[str], Coroutine[Any, Any, int]]) -> None:
        self._ask = ask
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._fallback = EstimatedTokenCounter()
        self._given_up = False
        self.estimated = 0  # counts the estimate stood in for

    def count(self, text: str) -> int:
        if threading.get_ident() == self._loop_thread or self._given_up:
            self.estimated += 1
            return self._fallback.count(text)
        answer = asyncio.run_coroutine_threadsafe(self._ask(text), self._loop)
        try:
            return answer.result(REMOTE_COUNT_TIMEOUT_S)
        except Exception as exc:  # a server gone mid-plan: the run goes on with a safe count
            answer.cancel()
            # A server too slow to answer would cost the timeout on every count of this plan.
            self._given_up = self._given_up or isinstance(exc, TimeoutError)
            self.estimated += 1
            return self._fallback.count(text)


class TokenCounters:
    """Vocabulary counters by model file, each loaded once on first use.

    `get` may be called from several threads at once: a model being loaded by
    one caller is waited for by the others rather than loaded twice, and other
    models stay available meanwhile."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[Path, VocabTokenCounter] = {}
        self._loading: dict[Path, threading.Lock] = {}
        self._closed = False

    def get(self, model_path: str | Path) -> VocabTokenCounter:
        key = Path(model_path).resolve()
        with self._lock:
            self._check_open()
            counter = self._counters.get(key)
            if counter is not None:
                return counter
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            with self._lock:
                self._check_open()
                counter = self._counters.get(key)
            if counter is not None:
                return counter
            counter = VocabTokenCounter(key)
            with self._lock:
                if self._closed:
                    counter.close()
                    self._check_open()
                self._counters[key] = counter
                self._loading.pop(key, None)
            return counter

    def close(self) -> None:
        with self._lock:
            self._closed = True
            counters, self._counters = list(self._counters.values()), {}
        for counter in counters:
            counter.close()

    def __enter__(self) -> TokenCounters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("token counters are closed")
