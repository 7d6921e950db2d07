"""llama-cpp-python's OpenAI-compatible server, exactly as `python -m llama_cpp.server ARGS` starts it,
except on a llama.cpp build with AMX kernels.

    python bench/serve_llama_cpp_python.py --model FILE.gguf --host 127.0.0.1 --port 8000 ...

On such a build (a native build on an Intel CPU with AMX, e.g. Sapphire
Rapids) the server dies with SIGSEGV on its first request: llama.cpp's AMX
path (weights repacked into an "extra buffer") crashes in
`ggml_backend_amx_mul_mat` on the first multi-token batch (llama.cpp issue
20824). bastion's worker loads the weights without extra buffers on such a
build (`bastion.worker.llama_engine`); this launcher does the same for the
server, so both run the same kernels. Elsewhere it changes nothing.
"""

from __future__ import annotations

import runpy

import llama_cpp

from bastion.worker.llama_engine import built_with_amx


def _load_weights_without_extra_buffers() -> None:
    # `Llama` builds its model parameters from this function inside its
    # constructor and takes no argument for the field.
    native = llama_cpp.llama_cpp
    default = native.llama_model_default_params

    def without_extra_buffers() -> llama_cpp.llama_model_params:
        params = default()
        params.use_extra_bufts = False
        return params

    native.llama_model_default_params = without_extra_buffers


if __name__ == "__main__":
    if built_with_amx():
        _load_weights_without_extra_buffers()
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
