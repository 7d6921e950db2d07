"""llama.cpp's own HTTP server (llama-server), as the PyPI package `xllamacpp` embeds it, in a process of its own.

    python bench/serve_llama_server.py --model FILE.gguf --port 8080 [--n-ctx 4096] [--threads 2]

`xllamacpp.Server(CommonParams)` starts llama-server's HTTP front end and its
slot loop on threads inside the calling process; this script gives it a
process of its own, as `llama-server` would have, so that its threads never
share an interpreter with the benchmark's client. It binds 127.0.0.1 only and
runs until SIGTERM or SIGINT.

Everything not given on the command line keeps llama-server's defaults, with
one correction: `CommonParams()` starts from the library's `n_parallel = 1`,
while the `llama-server` program defaults to `--parallel -1` (auto: 4 slots
sharing one unified KV cache of n_ctx cells). The program's default is what a
user of llama.cpp's server gets, so it is set here; `--parallel N` overrides it.
"""

from __future__ import annotations

import argparse
import signal
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2, help="n_threads and n_threads_batch")
    parser.add_argument("--parallel", type=int, default=-1, help="server slots (-1: auto, llama-server's default)")
    args = parser.parse_args()
    try:
        import xllamacpp
    except ImportError:
        print("xllamacpp is not installed: run `.venv/bin/pip install xllamacpp` "
              "(or `.venv/bin/pip install -e '.[bench]'`)", file=sys.stderr)  # fmt: skip
        return 2

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.n_ctx = args.n_ctx
    params.n_parallel = args.parallel
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.hostnames = ["127.0.0.1"]
    params.port = args.port
    # Block the signals before the server's threads exist, so they inherit the
    # mask and only this thread's sigwait takes them.
    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    server = xllamacpp.Server(params)
    print(f"llama-server {xllamacpp.__version__} listening on {server.listening_address}", file=sys.stderr,
          flush=True)  # fmt: skip
    signal.sigwait(stop)
    del server  # its destructor stops the slot loop and the HTTP threads
    return 0


if __name__ == "__main__":
    sys.exit(main())
