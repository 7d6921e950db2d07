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
from collections.abc import Sequence

import llama_cpp
import msgspec

from bastion.protocol import SamplingParams
from bastion.worker.engine import EngineError, EngineInfo, InvalidModelFile, reusable_prefix

_PIECE_BUFFER = 64
_GGUF_MAGIC = b"GGUF"


class LlamaEngineConfig(msgspec.Struct, frozen=True, kw_only=True):
    model_path: str
    n_ctx: int = 4096
    threads: int = 2
    # Tokens per llama_decode call; the core prefills in chunks of this size.
    n_batch: int = 256


class LlamaCppEngine:
    def __init__(self, config: LlamaEngineConfig) -> None:
        self._config = config
        self._stack = contextlib.ExitStack()
        _check_gguf(config.model_path)
        try:
            self._llama = llama_cpp.Llama(
                model_path=config.model_path,
                n_ctx=config.n_ctx,
                n_batch=config.n_batch,
                n_ubatch=config.n_batch,
                n_threads=config.threads,
                n_threads_batch=config.threads,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"llama.cpp could not load {config.model_path}: {exc}") from exc
        self._stack.callback(self._llama.close)
        self._vocab = self._llama._model.vocab
        self._piece = ctypes.create_string_buffer(_PIECE_BUFFER)
        self._bos_text = self._token_text(self._llama.token_bos())
        self._add_bos = bool(self._llama._model.add_bos_token())
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
        )

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
        if keep == 0 or not self._window_covers(keep) or not llama._ctx.kv_cache_seq_rm(-1, keep, -1):
            llama.reset()
            return 0
        llama.n_tokens = keep
        llama._requires_eval = True
        return keep

    def _window_covers(self, keep: int) -> bool:
        """A sliding-window cache forgets old positions; truncating it is only
        sound while it still holds the window the next token attends to (the
        same test llama.cpp's server makes)."""
        n_swa = llama_cpp.llama_model_n_swa(self._llama.model)
        if n_swa <= 0:
            return True
        memory = llama_cpp.llama_get_memory(self._llama.ctx)
        pos_min = llama_cpp.llama_memory_seq_pos_min(memory, 0)
        return pos_min <= max(0, keep - n_swa)

    def evaluate(self, tokens: Sequence[int]) -> None:
        if self._llama.n_tokens + len(tokens) > self._info.n_ctx:
            raise EngineError(f"context full: {self._llama.n_tokens} + {len(tokens)} > {self._info.n_ctx}")
        try:
            self._llama.eval(list(tokens))
        except RuntimeError as exc:
            raise EngineError(str(exc)) from exc

    def begin_sampling(self, params: SamplingParams) -> None:
        # Llama's sampler chain reads the seed when it is built.
        seed = params.seed if params.seed is not None else random.getrandbits(31)
        self._llama.set_seed(seed)
        self._llama._sampler = self._llama._init_sampler(
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
        )

    def sample(self) -> int:
        if self._llama._sampler is None:
            raise EngineError("sample() outside begin_sampling()/end_sampling()")
        return int(self._llama.sample())

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

    def close(self) -> None:
        self.end_sampling()
        self._stack.close()


def _check_gguf(path: str) -> None:
    """Tell a wrong file from a failed load: llama.cpp reports both alike."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_GGUF_MAGIC))
    except OSError as exc:
        raise InvalidModelFile(f"cannot read {path}: {exc.strerror}") from exc
    if magic != _GGUF_MAGIC:
        raise InvalidModelFile(f"{path} is not a GGUF file")
