"""`LlamaCppEngine`: the `Engine` seam over llama.cpp, through llama-cpp-python.

Owns one model and one context holding `n_seq` sequences (each with `n_ctx`
positions of its own: llama.cpp's non-unified KV cache, so a sequence's
logits are bit-identical whether it is decoded alone or batched with others),
the batch every decode goes through, and each sequence's token list and
sampler (`LlamaSequence`). `Llama` is used to load the model (built as
llama_loading.py says) and to tokenize; its evaluation, sampling, caches
and chat APIs are not: they know one sequence only.

Importing this module imports llama_cpp; the process shell does so only when
the llama engine is asked for.
"""

from __future__ import annotations

import contextlib
import ctypes
import random
from collections.abc import Callable, Sequence

import llama_cpp
import msgspec
import numpy as np
from llama_cpp import _internals as internals

from bastion.protocol import MAX_PARALLEL, KvCacheType, SamplingParams
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
from bastion.worker.grammar import GrammarCache, GrammarError
from bastion.worker.llama_loading import amx_weights_off, check_gguf, sequences_per_context

_PIECE_BUFFER = 64


_NO_ABORT_CHECK = llama_cpp.ggml_abort_callback()  # a NULL function pointer: no check
_GGML_TYPES = {KvCacheType.F16: llama_cpp.GGML_TYPE_F16, KvCacheType.Q8_0: llama_cpp.GGML_TYPE_Q8_0}
_DECODE_ABORTED = 2  # llama_decode's return code when the abort callback stopped it


class LlamaEngineConfig(msgspec.Struct, frozen=True, kw_only=True):
    model_path: str
    n_ctx: int = 4096  # per sequence
    threads: int = 2
    # Tokens per llama_decode call; the core prefills in chunks of this size.
    n_batch: int = 256
    # Flash attention: attention computed in tiles, never materialising the
    # scores of every cached position; faster prefill on CPU, less memory.
    flash_attn: bool = True
    kv_cache_type: KvCacheType = KvCacheType.F16
    # Sequences decoded together in one context (continuous batching).
    n_seq: int = 1


class LlamaCppEngine:
    def __init__(self, config: LlamaEngineConfig) -> None:
        if not 1 <= config.n_seq <= MAX_PARALLEL:
            raise EngineError(f"n_seq must be between 1 and {MAX_PARALLEL}, not {config.n_seq}")
        self._config = config
        self._stack = contextlib.ExitStack()
        check_gguf(config.model_path)
        try:
            with amx_weights_off(), sequences_per_context(config.n_seq):
                self._llama = llama_cpp.Llama(
                    model_path=config.model_path,
                    n_ctx=config.n_ctx * config.n_seq,
                    n_batch=config.n_batch,
                    n_ubatch=config.n_batch,
                    n_threads=config.threads,
                    n_threads_batch=config.threads,
                    flash_attn=config.flash_attn,
                    type_k=_GGML_TYPES[config.kv_cache_type],
                    type_v=_GGML_TYPES[config.kv_cache_type],
                    verbose=False,
                )
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"llama.cpp could not load {config.model_path}: {exc}") from exc
        self._stack.callback(self._llama.close)
        self.ctx = self._llama.ctx
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self._grammars = GrammarCache(self._llama._model.vocab)
        self._stack.callback(self._grammars.close)
        self._vocab = self._llama._model.vocab
        self._piece = ctypes.create_string_buffer(_PIECE_BUFFER)
        self._bos_text = self._token_text(self._llama.token_bos())
        self._add_bos = bool(self._llama._model.add_bos_token())
        self.n_swa = int(llama_cpp.llama_model_n_swa(self._llama.model))
        self.n_vocab = self._llama.n_vocab()
        self._threads = config.threads
        self._batch = llama_cpp.llama_batch_init(self._llama.n_batch, 0, 1)
        self._stack.callback(llama_cpp.llama_batch_free, self._batch)
        self._cancel_check: Callable[[], bool] | None = None
        self._aborted = False
        # Kept referenced for as long as llama.cpp may call it.
        self._abort_check = llama_cpp.ggml_abort_callback(self._should_abort)
        self._info = self._read_info()
        self._sequences = [LlamaSequence(self, seq_id) for seq_id in range(config.n_seq)]
        for sequence in self._sequences:
            self._stack.callback(sequence.end_sampling)

    def _token_text(self, token: int) -> str:
        return self._llama._model.token_get_text(token) if token >= 0 else ""

    def _read_info(self) -> EngineInfo:
        model = self._llama._model
        metadata = self._llama.metadata
        architecture = metadata.get("general.architecture", "")
        n_ctx_train = model.n_ctx_train() or int(metadata.get(f"{architecture}.context_length", "0"))
        return EngineInfo(
            architecture=architecture,
            n_ctx=int(llama_cpp.llama_n_ctx_seq(self.ctx)),
            n_ctx_train=n_ctx_train,
            n_vocab=model.n_vocab(),
            n_params=model.n_params(),
            n_batch=self._llama.n_batch,
            threads=self._config.threads,
            chat_template=metadata.get("tokenizer.chat_template", ""),
            bos_token=self._bos_text,
            eos_token=self._token_text(self._llama.token_eos()),
            gguf_name=metadata.get("general.name", ""),
            partial_reuse=self.n_swa <= 0,
            n_seq=self._config.n_seq,
        )

    @property
    def grammars_compiled(self) -> int:
        return self._grammars.compiled

    @property
    def grammars(self) -> GrammarCache:
        return self._grammars

    @property
    def kv_cache_type(self) -> KvCacheType:
        return self._config.kv_cache_type

    def describe(self) -> EngineInfo:
        return self._info

    def sequences(self) -> Sequence[LlamaSequence]:
        return self._sequences

    def tokenize(self, text: str) -> list[int]:
        # A rendered chat template usually starts with the BOS text already;
        # adding another one would shift every position of the prompt.
        add_bos = self._add_bos and not (self._bos_text and text.startswith(self._bos_text))
        return self._llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def state_layout(self) -> str:
        # Every sequence's state has the same layout (a snapshot of one may be
        # restored into any other): the sequence count is not part of it.
        return (
            f"llama.cpp {llama_cpp.__version__}; {self._info.architecture}; n_ctx {self._info.n_ctx};"
            f" n_swa {self.n_swa}; kv {self._config.kv_cache_type.value};"
            f" flash attention {'on' if self._config.flash_attn else 'off'}; seq 0"
        )

    def set_threads(self, threads: int) -> None:
        if threads > 0 and threads != self._threads:
            llama_cpp.llama_set_n_threads(self.ctx, threads, threads)
            self._threads = threads

    def evaluate_batch(self, parts: Sequence[BatchPart], cancelled: Callable[[], bool] | None = None) -> None:
        # In sequence order: llama.cpp splits a batch of a non-unified cache into equal
        # per-sequence steps, and out of order it computes a step per token (4 streams
        # decoded at 64 tokens/s instead of 135).
        parts = sorted(parts, key=lambda part: part[0].seq_id)
        sequences: list[LlamaSequence] = []
        total = 0
        for sequence, tokens in parts:
            if not isinstance(sequence, LlamaSequence) or sequence.engine is not self:
                raise EngineError("evaluate_batch() of a sequence of another engine")
            if not tokens:
                raise EngineError("evaluate_batch() of no tokens")
            if sequence.n_tokens + len(tokens) > self._info.n_ctx:
                raise EngineError(
                    f"context full: {sequence.n_tokens} + {len(tokens)} > {self._info.n_ctx} (sequence {sequence.seq_id})"
                )
            if sequence in sequences:
                raise EngineError(f"sequence {sequence.seq_id} twice in one batch")
            sequences.append(sequence)
            total += len(tokens)
        if total > self._info.n_batch:
            raise EngineError(f"batch of {total} tokens exceeds n_batch {self._info.n_batch}")
        last = self._fill_batch(parts)
        self._cancel_check, self._aborted = cancelled, False
        if cancelled is not None:
            # Only while asked: llama.cpp calls the check before every graph node, and
            # entering Python that often would cost a single-token decode step dearly.
            llama_cpp.llama_set_abort_callback(self.ctx, self._abort_check, None)
        try:
            code = llama_cpp.llama_decode(self.ctx, self._batch)
        finally:
            if cancelled is not None:
                llama_cpp.llama_set_abort_callback(self.ctx, _NO_ABORT_CHECK, None)
            self._cancel_check = None
        if code != 0:
            # Whatever of the batch reached the cache goes: each sequence holds
            # exactly the tokens it held before this call.
            for sequence in sequences:
                sequence.forget_from(sequence.n_tokens)
            if code == _DECODE_ABORTED and self._aborted:
                raise EvaluationCancelled
            raise EngineError(f"llama_decode failed with code {code}")
        for (sequence, tokens), logits_at in zip(parts, last):
            assert isinstance(sequence, LlamaSequence)
            sequence.evaluated(tokens, logits_at)

    def _fill_batch(self, parts: Sequence[BatchPart]) -> list[int]:
        """Write `parts` into the batch; the batch index of each part's last token (its logits)."""
        batch = self._batch
        token, pos, n_seq_id, seq_ids, logits = batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits
        n = 0
        last = []
        for sequence, tokens in parts:
            assert isinstance(sequence, LlamaSequence)
            start, seq_id = sequence.n_tokens, sequence.seq_id
            for offset, value in enumerate(tokens):
                token[n] = value
                pos[n] = start + offset
                n_seq_id[n] = 1
                seq_ids[n][0] = seq_id
                logits[n] = 0
                n += 1
            logits[n - 1] = 1
            last.append(n - 1)
        batch.n_tokens = n
        return last

    def _should_abort(self, _data: ctypes.c_void_p) -> bool:
        check = self._cancel_check
        if check is not None and check():
            self._aborted = True
        return self._aborted

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def token_bytes(self, token: int) -> bytes:
        # Control tokens render as nothing (special=False): their text is not
        # part of the reply.
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, False)
        if n < 0:
            self._piece = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, False)
        return self._piece.raw[:n]

    def penalty_window(self) -> int:
        return self._llama.last_n_tokens_size

    def close(self) -> None:
        self._stack.close()


class LlamaSequence:
    """One sequence of a `LlamaCppEngine`'s context: the tokens its KV cells hold, its sampler,
    and where its latest logits are in the batch (the `EngineSequence` seam)."""

    def __init__(self, engine: LlamaCppEngine, seq_id: int) -> None:
        self.engine = engine
        self._seq_id = seq_id
        self._tokens: list[int] = []
        self._logits_at = -1  # batch index of the fresh logits; -1: none
        self._sampler: internals.LlamaSampler | None = None
        self._shift_pending = False

    @property
    def seq_id(self) -> int:
        return self._seq_id

    @property
    def n_tokens(self) -> int:
        return len(self._tokens)

    def kv_tokens(self) -> int:
        return len(self._tokens)

    def kv_token_ids(self) -> list[int]:
        return list(self._tokens)

    def forget_from(self, keep: int) -> None:
        """Drop this sequence's cells from position `keep` on (what a failed decode may have left)."""
        llama_cpp.llama_memory_seq_rm(self.engine.memory, self._seq_id, keep, -1)

    def evaluated(self, tokens: Sequence[int], logits_at: int) -> None:
        self._tokens.extend(tokens)
        self._logits_at = logits_at
        self._shift_pending = False

    def evaluate(self, tokens: Sequence[int], cancelled: Callable[[], bool] | None = None) -> None:
        self.engine.evaluate_batch([(self, tokens)], cancelled)

    def keep_prefix(self, tokens: Sequence[int]) -> int:
        keep = reusable_prefix(self._tokens, tokens)
        if keep == 0 or not self.can_truncate_to(keep) or not llama_cpp.llama_memory_seq_rm(
            self.engine.memory, self._seq_id, keep, -1
        ):
            self.reset()
            return 0
        del self._tokens[keep:]
        self._logits_at = -1
        return keep

    def can_truncate_to(self, keep: int) -> bool:
        """A sliding-window cache forgets old positions; truncating it is only
        sound while it still holds the window the next token attends to (the
        same test llama.cpp's server makes)."""
        if keep <= 0:
            return False
        n_swa = self.engine.n_swa
        if n_swa <= 0 or keep >= len(self._tokens):
            return True
        pos_min = llama_cpp.llama_memory_seq_pos_min(self.engine.memory, self._seq_id)
        return pos_min <= max(0, keep - n_swa)

    def can_shift(self) -> bool:
        # A sliding window's cells outside the window are gone, so moving the
        # rest down would leave holes the model never saw; only full caches shift.
        return self.engine.n_swa <= 0 and bool(llama_cpp.llama_memory_can_shift(self.engine.memory))

    def shift_out(self, start: int, end: int) -> None:
        n = len(self._tokens)
        if not (0 <= start < end <= n) or not self.can_shift():
            raise EngineError(f"cannot remove positions [{start}, {end}) of {n}")
        memory = self.engine.memory
        if not llama_cpp.llama_memory_seq_rm(memory, self._seq_id, start, end):
            raise EngineError(f"llama.cpp refused to remove positions [{start}, {end})")
        # The positions after the hole move down; llama.cpp re-rotates their
        # keys (RoPE) at the next decode.
        llama_cpp.llama_memory_seq_add(memory, self._seq_id, end, -1, start - end)
        self._shift_pending = True
        del self._tokens[start:end]
        self._logits_at = -1

    def save_sequence(self) -> bytes:
        if self._shift_pending:
            # The keys are re-rotated at the next decode; saved now, the new
            # positions would go with keys still encoded for the old ones.
            raise EngineError("a context shift is not applied yet; evaluate first")
        ctx = self.engine.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, self._seq_id)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(ctx, buffer, size, self._seq_id)
        if written <= 0:
            raise EngineError("llama.cpp could not serialise the KV state")
        return ctypes.string_at(buffer, written)

    def restore_sequence(self, data: bytes, tokens: Sequence[int]) -> bool:
        self.reset()
        if not tokens or len(tokens) >= self.engine.describe().n_ctx:
            return False
        source = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))
        read = llama_cpp.llama_state_seq_set_data(self.engine.ctx, source, len(data), self._seq_id)
        # A refused or inconsistent state is dropped whole: half a state would
        # give wrong text, which is worse than a prefill.
        memory = self.engine.memory
        if read != len(data) or llama_cpp.llama_memory_seq_pos_max(memory, self._seq_id) != len(tokens) - 1:
            self.reset()
            return False
        self._tokens = list(tokens)
        return True

    def reset(self) -> None:
        llama_cpp.llama_memory_seq_rm(self.engine.memory, self._seq_id, -1, -1)
        self._tokens = []
        self._logits_at = -1
        self._shift_pending = False

    def begin_sampling(self, params: SamplingParams, grammar: CallGrammar | None = None) -> GrammarOutcome:
        seed = params.seed if params.seed is not None else random.getrandbits(31)
        outcome = GrammarOutcome(GrammarUse.NONE)
        constraint = None
        if grammar is not None:
            try:
                constraint = self.engine.grammars.sampler_for(grammar)
            except GrammarError as exc:
                outcome = GrammarOutcome(GrammarUse.FAILED, str(exc))
            else:
                outcome = GrammarOutcome(GrammarUse.LAZY if grammar.lazy else GrammarUse.FULL)
        self.end_sampling()
        self._sampler = self._sampler_chain(params, seed, constraint)
        return outcome

    def _sampler_chain(self, params: SamplingParams, seed: int,
                       constraint: llama_cpp.llama_sampler_p | None) -> internals.LlamaSampler:
        """Penalties, the grammar when given (it must act before a token is chosen), then greedy
        or top-k/top-p/min-p/temperature and a seeded draw: the order of Llama's own chain."""
        chain = internals.LlamaSampler()
        chain.add_penalties(n_vocab=self.engine.n_vocab, penalty_last_n=self.engine.penalty_window(),
                            penalty_repeat=params.repeat_penalty, penalty_freq=0.0, penalty_present=0.0)
        if constraint is not None:
            llama_cpp.llama_sampler_chain_add(chain.sampler, constraint)  # the chain frees it
        if params.temperature <= 0.0:
            chain.add_greedy()
        else:
            chain.add_top_k(params.top_k)
            chain.add_top_p(params.top_p, 1)
            chain.add_min_p(params.min_p, 1)
            chain.add_temp(params.temperature)
            chain.add_dist(seed)
        return chain

    def sample(self) -> int:
        if self._sampler is None:
            raise EngineError("sample() outside begin_sampling()/end_sampling()")
        if self._logits_at < 0:
            raise EngineError("sample() without a fresh evaluate()")
        # llama_sampler_sample applies the chain to the logits at that batch
        # index and tells every sampler in the chain the token it chose.
        return int(llama_cpp.llama_sampler_sample(self._sampler.sampler, self.engine.ctx, self._logits_at))

    def token_logprobs(self, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
        # The logits of the step just sampled are still in the context's output.
        pointer = llama_cpp.llama_get_logits_ith(self.engine.ctx, self._logits_at)
        logits = np.ctypeslib.as_array(pointer, shape=(self.engine.n_vocab,)).astype(np.float64)
        peak = logits.max()
        logprobs = logits - (peak + np.log(np.exp(logits - peak).sum()))
        best: list[tuple[int, float]] = []
        if top > 0:
            candidates = np.argpartition(-logprobs, top - 1)[:top] if top < len(logprobs) else np.arange(len(logprobs))
            best = sorted(((int(i), float(logprobs[i])) for i in candidates), key=lambda pair: -pair[1])
        return float(logprobs[token]), best

    def end_sampling(self) -> None:
        sampler, self._sampler = self._sampler, None
        if sampler is not None:
            sampler.close()
