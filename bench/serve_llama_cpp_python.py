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

from bastion.worker.llama_loading import amx_weights_off

if __name__ == "__main__":
    # The server builds its `Llama` inside run_module: the swapped default is in place for it
    # (and changes nothing on a build without AMX kernels).
    with amx_weights_off():
        runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
