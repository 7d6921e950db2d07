"""The supervisor process: owns models, runs and (later) sessions, policy and the agent loop.

It binds two ROUTER sockets in the home's private runtime directory, one for
clients (`control.sock`) and one for model workers (`workers.sock`), spawns a
worker process per loaded model and routes requests and events between them.

    daemon.py     process shell: lock, sockets, signals, the receive loops
    core.py       client requests -> runs, loads, status (no sockets of its own)
    workers.py    worker processes: spawn, handshake, exit watch, per-worker queue
    runs.py       one client request being answered
    registry.py / model_sources.py / prompt.py   what a model name means and how to talk to it

It imports `bastion.protocol` and never the worker, sandbox or client packages;
inference lives only in workers.
"""
