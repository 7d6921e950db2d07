"""The supervisor process: owns sessions, context, trust policy and the agent loop.

It binds three ROUTER sockets in the home's private runtime directory — clients
(`control.sock`), model workers (`workers.sock`) and tool sandboxes
(`tools.sock`) — spawns a worker process per loaded model and a sandbox for
tools, and runs each client's requests.

The map, top to bottom; each layer imports only the layers below it
(`tests/test_layers.py` checks it):

    shell       __main__.py, daemon.py (process shell and composition root),
                core.py (handshake and routing of client requests)
    control/    answers to client requests, one module per family: runs,
                completions, sessions, models, trust
    harness/    the agent loop and what it works on: the loop, model calls,
                the tool round, context planning, the conversation, and the
                single model call of an API client's completion
    models/     which models exist and which are loaded: registry, sources,
                GGUF metadata, memory, residency, restarts, tokenizer
    trust/      whether a tool call may run, and the record of what ran: the
                gate, approvals, the audit log, policy/
    tools/      which tools exist and how a model's calls are read: the tool
                registry and records, built-ins, call parsing, schemas
    templates/  turning a conversation into the prompt text a model expects
    processes/  child processes as the supervisor sees them: workers,
                sandboxes, liveness, core sharing
    store/      the SQLite database: migrations, sessions
    base        errors.py (the whole exception tree), config.py, runs.py (a
                client's run and its model calls)

Models and trust share a layer and never import each other; so do tools,
templates, processes and store. The supervisor imports `bastion.protocol` and
never the worker, sandbox, client or gateway packages: inference lives only in
workers, tools run only in sandboxes.
"""
