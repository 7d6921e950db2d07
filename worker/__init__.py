"""The model worker: one process that holds one GGUF model and serves generations.

Owns the loaded model (behind the `Engine` seam), its KV cache and the reuse of
the longest common prefix between consecutive prompts, the decode loop with its
cancellation points, and the worker end of the supervisor link (handshake,
heartbeats, parent-death detection).

Module map:

    engine.py        the `Engine` seam (token level) and `EngineInfo`
    llama_engine.py  `LlamaCppEngine`, the seam over llama-cpp-python
    fake.py          `FakeEngine`, scripted and deterministic, for unit tests only
    text.py          incremental detokenization and stop-string matching
    core.py          `WorkerCore`: one generation, pure logic, no sockets
    config.py        `WorkerConfig`, the typed command line
    lifecycle.py     exit codes, stop requests, dying with the parent
    link.py          the IO thread that owns the DEALER socket
    proc.py          `WorkerProc`: the process shell (lifecycle, threads, signals)
    __main__.py      `python -m bastion.worker`

It imports `bastion.protocol` and third-party libraries only; never the
supervisor, the client or the tool sandbox.
"""
