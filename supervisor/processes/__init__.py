"""Child processes as the supervisor sees them: spawn, handshake, watch, stop.

    workers.py    model worker processes: WorkerPool and one WorkerHandle each
    sandboxes.py  the tool sandbox process: SandboxPool
    liveness.py   whether a live worker counts as hung; how a dead one is described (pure)
    cores.py      sharing the cores among the workers that are generating

Mechanism only: which model to load, restart or evict is decided in models/,
which call may run in trust/.
"""
