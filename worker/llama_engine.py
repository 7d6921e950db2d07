"""`LlamaCppEngine`: the `Engine` seam over llama-cpp-python's `Llama`.

Owns one `Llama` (model, context, batch) and the sampler of the generation in
progress, and frees them through one `ExitStack`. It keeps `Llama`'s own
bookkeeping (`n_tokens`, `input_ids`, `_sampler`) consistent exactly as
`Llama.generate` does, so `Llama.eval` and `Llama.sample` can be used as they
are; it does not use `Llama`'s completion or chat APIs, templates or caches.

Importing this module imports llama_cpp; the process shell does so only when
the llama engine is asked for.
"""

from __future__ import annotations

import contextlib
import ctypes
import random
from collections.abc import Callable, Iterator, Sequence

import llama_cpp
import msgspec
import numpy as np
from llama_cpp import _internals as internals

from bastion.protocol import KvCacheType, SamplingParams
from bastion.protocol.common import GrammarUse
from bastion.protocol.worker_wire import CallGrammar
from bastion.worker.engine import (
    EngineError,
    EngineInfo,
    EvaluationCancelled,
    GrammarOutcome,
    InvalidModelFile,
    reusable_prefix,
)
from bastion.worker.grammar import GrammarCache, GrammarError

_PIECE_BUFFER = 64
_GGUF_MAGIC = b"GGUF"


_NO_ABORT_CHECK = llama_cpp.ggml_abort_callback()  # a NULL function pointer: no check
_GGML_TYPES = {KvCacheType.F16: llama_cpp.GGML_TYPE_F16, KvCacheType.Q8_0: llama_cpp.GGML_TYPE_Q8_0}


class LlamaEngineConfig(msgspec.Struct, frozen=True, kw_only=True):
    model_path: str
    n_ctx: int = 4096
    threads: int = 2
    # Tokens per llama_decode call; the core prefills in chunks of this size.
    n_batch: int = 256
    # Flash attention: attention computed in tiles, never materialising the
    # scores of every cached position; faster prefill on CPU, less memory.
    flash_attn: bool = True
    kv_cache_type: KvCacheType = KvCacheType.F16


class LlamaCppEngine:
    def __init__(self, config: LlamaEngineConfig) -> None:
        self._config = config
        self._stack = contextlib.ExitStack()
        _check_gguf(config.model_path)
        try:
            with amx_weights_off():
                self._llama = llama_cpp.Llama(
                    model_path=config.model_path,
                    n_ctx=config.n_ctx,
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
        self._grammars = GrammarCache(self._llama._model.vocab)
        self._stack.callback(self._grammars.close)
        self._vocab = self._llama._model.vocab
        self._piece = ctypes.create_string_buffer(_PIECE_BUFFER)
        self._bos_text = self._token_text(self._llama.token_bos())
        self._add_bos = bool(self._llama._model.add_bos_token())
        self._n_swa = int(llama_cpp.llama_model_n_swa(self._llama.model))
        self._threads = config.threads
        self._shift_pending = False
        self._cancel_check: Callable[[], bool] | None = None
        self._aborted = False
        # Kept referenced for as long as llama.cpp may call it.
        self._abort_check = llama_cpp.ggml_abort_callback(self._should_abort)
        self._info = self._read_info()

    def _token_text(self, token: int) -> str:
        return self._llama._model.token_get_text(token) if token >= 0 else ""

    def _read_info(self) -> EngineInfo:
        model = self._llama._model
        metadata = self._llama.metadata
        architecture = metadata.get("general.architecture", "")
        n_ctx_train = model.n_ctx_train() or int(metadata.get(f"{architecture}.context_length", "0"))
        return EngineInfo(
            architecture=architecture,
            n_ctx=self._llama.n_ctx(),
            n_ctx_train=n_ctx_train,
            n_vocab=model.n_vocab(),
            n_params=model.n_params(),
            n_batch=self._llama.n_batch,
            threads=self._config.threads,
            chat_template=metadata.get("tokenizer.chat_template", ""),
            bos_token=self._bos_text,
            eos_token=self._token_text(self._llama.token_eos()),
            gguf_name=metadata.get("general.name", ""),
            partial_reuse=self._n_swa <= 0,
        )

    @property
    def grammars_compiled(self) -> int:
        return self._grammars.compiled

    def describe(self) -> EngineInfo:
        return self._info

    def tokenize(self, text: str) -> list[int]:
        # A rendered chat template usually starts with the BOS text already;
        # adding another one would shift every position of the prompt.
        add_bos = self._add_bos and not (self._bos_text and text.startswith(self._bos_text))
        return self._llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def kv_tokens(self) -> int:
        return self._llama.n_tokens

    def keep_prefix(self, tokens: Sequence[int]) -> int:
        llama = self._llama
        keep = reusable_prefix(llama.input_ids[: llama.n_tokens].tolist(), tokens)
        if keep == 0 or not self.can_truncate_to(keep) or not llama._ctx.kv_cache_seq_rm(-1, keep, -1):
            llama.reset()
            return 0
        llama.n_tokens = keep
        llama._requires_eval = True
        return keep

    def kv_token_ids(self) -> list[int]:
        return self._llama.input_ids[: self._llama.n_tokens].tolist()

    def can_truncate_to(self, keep: int) -> bool:
        """A sliding-window cache forgets old positions; truncating it is only
        sound while it still holds the window the next token attends to (the
        same test llama.cpp's server makes)."""
        if keep <= 0:
            return False
        if self._n_swa <= 0 or keep >= self._llama.n_tokens:
            return True
        pos_min = llama_cpp.llama_memory_seq_pos_min(self._memory(), 0)
        return pos_min <= max(0, keep - self._n_swa)

    def _memory(self):  # noqa: ANN202 - an opaque llama_memory_t
        return llama_cpp.llama_get_memory(self._llama.ctx)

    def can_shift(self) -> bool:
        # A sliding window's cells outside the window are gone, so moving the
        # rest down would leave holes the model never saw; only full caches shift.
        return self._n_swa <= 0 and bool(llama_cpp.llama_memory_can_shift(self._memory()))

    def shift_out(self, start: int, end: int) -> None:
        llama = self._llama
        n = llama.n_tokens
        if not (0 <= start < end <= n) or not self.can_shift():
            raise EngineError(f"cannot remove positions [{start}, {end}) of {n}")
        memory = self._memory()
        if not llama_cpp.llama_memory_seq_rm(memory, 0, start, end):
            raise EngineError(f"llama.cpp refused to remove positions [{start}, {end})")
        # The positions after the hole move down; llama.cpp re-rotates their
        # keys (RoPE) at the next decode.
        llama_cpp.llama_memory_seq_add(memory, 0, end, -1, start - end)
        self._shift_pending = True
        kept = n - (end - start)
        llama.input_ids[start:kept] = llama.input_ids[end:n]
        llama.n_tokens = kept
        llama._requires_eval = True

    def save_sequence(self) -> bytes:
        if self._shift_pending:
            # The keys are re-rotated at the next decode; saved now, the new
            # positions would go with keys still encoded for the old ones.
            raise EngineError("a context shift is not applied yet; evaluate first")
        ctx = self._llama.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(ctx, buffer, size, 0)
        if written <= 0:
            raise EngineError("llama.cpp could not serialise the KV state")
        return ctypes.string_at(buffer, written)

    def restore_sequence(self, data: bytes, tokens: Sequence[int]) -> bool:
        llama = self._llama
        llama.reset()
        llama_cpp.llama_memory_clear(self._memory(), True)
        self._shift_pending = False
        if not tokens or len(tokens) >= self._info.n_ctx:
            return False
        source = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))
        read = llama_cpp.llama_state_seq_set_data(llama.ctx, source, len(data), 0)
        # A refused or inconsistent state is dropped whole: half a state would
        # give wrong text, which is worse than a prefill.
        if read != len(data) or llama_cpp.llama_memory_seq_pos_max(self._memory(), 0) != len(tokens) - 1:
            llama_cpp.llama_memory_clear(self._memory(), True)
            return False
        llama.input_ids[: len(tokens)] = tokens
        llama.n_tokens = len(tokens)
        llama._requires_eval = True
        return True

    def state_layout(self) -> str:
        return (
            f"llama.cpp {llama_cpp.__version__}; {self._info.architecture}; n_ctx {self._info.n_ctx};"
            f" n_swa {self._n_swa}; kv {self._config.kv_cache_type.value}; flash attention {'on' if self._config.flash_attn else 'off'}; seq 0"
        )

    def set_threads(self, threads: int) -> None:
        if threads > 0 and threads != self._threads:
            llama_cpp.llama_set_n_threads(self._llama.ctx, threads, threads)
            self._threads = threads

    def evaluate(self, tokens: Sequence[int], cancelled: Callable[[], bool] | None = None) -> None:
        if self._llama.n_tokens + len(tokens) > self._info.n_ctx:
            raise EngineError(f"context full: {self._llama.n_tokens} + {len(tokens)} > {self._info.n_ctx}")
        self._cancel_check, self._aborted = cancelled, False
        if cancelled is not None:
            # Only while asked: llama.cpp calls the check before every graph node, and
            # entering Python that often would cost a single-token decode step dearly.
            llama_cpp.llama_set_abort_callback(self._llama.ctx, self._abort_check, None)
        try:
            self._llama.eval(list(tokens))
        except RuntimeError as exc:
            if self._aborted:
                # Whatever of the interrupted batch reached the cache goes: the state is
                # exactly the tokens evaluated before this call.
                llama_cpp.llama_memory_seq_rm(self._memory(), -1, self._llama.n_tokens, -1)
                raise EvaluationCancelled from None
            raise EngineError(str(exc)) from exc
        finally:
            if cancelled is not None:
                llama_cpp.llama_set_abort_callback(self._llama.ctx, _NO_ABORT_CHECK, None)
            self._cancel_check = None
        self._shift_pending = False

    def _should_abort(self, _data: ctypes.c_void_p) -> bool:
        check = self._cancel_check
        if check is not None and check():
            self._aborted = True
        return self._aborted

    def begin_sampling(self, params: SamplingParams, grammar: CallGrammar | None = None) -> GrammarOutcome:
        # Llama's sampler chain reads the seed when it is built.
        seed = params.seed if params.seed is not None else random.getrandbits(31)
        self._llama.set_seed(seed)
        outcome = GrammarOutcome(GrammarUse.NONE)
        constraint = None
        if grammar is not None:
            try:
                constraint = self._grammars.sampler_for(grammar)
            except GrammarError as exc:
                outcome = GrammarOutcome(GrammarUse.FAILED, str(exc))
            else:
                outcome = GrammarOutcome(GrammarUse.LAZY if grammar.lazy else GrammarUse.FULL)
        self._llama._sampler = self._sampler_chain(params, seed, constraint)  # type: ignore[assignment]  # typed None in Llama
        return outcome

    def _sampler_chain(self, params: SamplingParams, seed: int,
                       constraint: llama_cpp.llama_sampler_p | None) -> internals.LlamaSampler:
        """Llama's own chain (penalties, then greedy or top-k/top-p/min-p/temperature), with a
        grammar, when given, right after the penalties: it must act before a token is chosen."""
        if constraint is None:
            return self._llama._init_sampler(top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
                                             temp=params.temperature, repeat_penalty=params.repeat_penalty)
        chain = internals.LlamaSampler()
        chain.add_penalties(n_vocab=self._llama.n_vocab(), penalty_last_n=self._llama.last_n_tokens_size,
                            penalty_repeat=params.repeat_penalty, penalty_freq=0.0, penalty_present=0.0)
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
        if self._llama._sampler is None:
            raise EngineError("sample() outside begin_sampling()/end_sampling()")
        return int(self._llama.sample())

    def token_logprobs(self, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
        # The logits of the step just sampled are still the context's last
        # output: the sampler reads them into its own candidate array.
        pointer = llama_cpp.llama_get_logits_ith(self._llama.ctx, -1)
        logits = np.ctypeslib.as_array(pointer, shape=(self._info.n_vocab,)).astype(np.float64)
        peak = logits.max()
        logprobs = logits - (peak + np.log(np.exp(logits - peak).sum()))
        best: list[tuple[int, float]] = []
        if top > 0:
            candidates = np.argpartition(-logprobs, top - 1)[:top] if top < len(logprobs) else np.arange(len(logprobs))
            best = sorted(((int(i), float(logprobs[i])) for i in candidates), key=lambda pair: -pair[1])
        return float(logprobs[token]), best

    def end_sampling(self) -> None:
        sampler, self._llama._sampler = self._llama._sampler, None
        if sampler is not None:
            sampler.close()

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

    def reset(self) -> None:
        self._llama.reset()
        self._shift_pending = False

    def close(self) -> None:
        self.end_sampling()
        self._stack.close()


def built_with_amx() -> bool:
    """Whether this llama.cpp build carries the AMX matrix kernels (a native
    build on a CPU with AMX, e.g. Intel Sapphire Rapids)."""
    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


@contextlib.contextmanager
def amx_weights_off() -> Iterator[None]:
    """Load weights into plain CPU buffers when the build has AMX kernels.

    llama.cpp's AMX path (weights repacked into an "extra buffer") crashes with
    SIGSEGV in `ggml_backend_amx_mul_mat` on the first multi-token batch on some
    Sapphire Rapids machines (llama.cpp issue 20824, open without a fix).
    `use_extra_bufts = False` keeps the weights where the ordinary kernels read
    them. `Llama` builds its model parameters from
    `llama_model_default_params()` inside its constructor and offers no
    argument for this field, so the default is swapped for the one call.
    """
    if not built_with_amx():
        yield
        return
    native = llama_cpp.llama_cpp
    default = native.llama_model_default_params

    def without_extra_buffers() -> llama_cpp.llama_model_params:
        params = default()
        params.use_extra_bufts = False
        return params

    native.llama_model_default_params = without_extra_buffers
    try:
        yield
    finally:
        native.llama_model_default_params = default


def _check_gguf(path: str) -> None:
    """Tell a wrong file from a failed load: llama.cpp reports both alike."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_GGUF_MAGIC))
    except OSError as exc:
        raise InvalidModelFile(f"cannot read {path}: {exc.strerror}") from exc
    if magic != _GGUF_MAGIC:
        raise InvalidModelFile(f"{path} is not a GGUF file")
