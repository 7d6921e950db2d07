"""How the llama engine builds what it loads: the model's weights and the context's sequences.

llama-cpp-python's `Llama` takes its model and context parameters from
llama.cpp's defaults and offers no argument for two settings the worker needs;
each context manager here swaps the default for the one call. `check_gguf`
tells a wrong file from a failed load, which llama.cpp reports alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import llama_cpp

from bastion.worker.engine import InvalidModelFile

_GGUF_MAGIC = b"GGUF"


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


@contextlib.contextmanager
def sequences_per_context(n_seq: int) -> Iterator[None]:
    """Build the context with room for `n_seq` sequences, each with its own cells.

    `Llama` takes its context parameters from `llama_context_default_params()`
    and has no argument for the sequence count; the default is swapped for the
    one call (as `amx_weights_off` does for the model). `kv_unified = False`
    gives each sequence `n_ctx / n_seq` cells of its own: no sequence can take
    another's room, and attention over one sequence never sees the others'
    cells, which keeps its logits identical to a decode of it alone."""
    native = llama_cpp.llama_cpp
    default = native.llama_context_default_params

    def with_sequences() -> llama_cpp.llama_context_params:
        params = default()
        params.n_seq_max = n_seq
        params.kv_unified = False
        return params

    native.llama_context_default_params = with_sequences
    try:
        yield
    finally:
        native.llama_context_default_params = default


def check_gguf(path: str) -> None:
    """Tell a wrong file from a failed load: llama.cpp reports both alike."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_GGUF_MAGIC))
    except OSError as exc:
        raise InvalidModelFile(f"cannot read {path}: {exc.strerror}") from exc
    if magic != _GGUF_MAGIC:
        raise InvalidModelFile(f"{path} is not a GGUF file")
