"""Tunables of the supervisor process, in one typed object built by its shell."""

from __future__ import annotations

import os

import msgspec
import psutil


class SupervisorConfig(msgspec.Struct, frozen=True, kw_only=True):
    # Heartbeats to workers; a worker exits when they stop for its own timeout.
    heartbeat_interval_s: float = 1.0
    # A worker silent this long is treated as hung and killed.
    worker_silence_limit_s: float = 30.0
    # A busy worker whose progress counter stays still this long is hung too
    # (a deadlock answers heartbeats but evaluates nothing).
    worker_stall_limit_s: float = 60.0
    # Crash recovery: restart after restart_backoff_s, doubling per crash up
    # to restart_backoff_max_s; restart_limit crashes within restart_window_s
    # mark the model failed until `bastion load`.
    # The first crash in the window restarts at once (after this long): a
    # lone crash should cost seconds; repeated ones back off.
    restart_first_backoff_s: float = 0.0
    restart_backoff_s: float = 0.5
    restart_backoff_max_s: float = 8.0
    restart_limit: int = 3
    restart_window_s: float = 60.0
    # How long a spawned worker may take to say hello and load its model.
    worker_load_timeout_s: float = 300.0
    # Requests waiting for one busy worker; one more is answered `busy`.
    max_queued_per_worker: int = 16
    # Grace between Shutdown and SIGTERM, and between SIGTERM and SIGKILL.
    stop_grace_s: float = 5.0
    # Lines of a worker's stderr kept for crash reports.
    stderr_tail_lines: int = 20
    default_threads: int = max(1, os.cpu_count() or 1)
    default_n_ctx: int = 4096
    # Per-session KV snapshots, per worker: RAM cap (LRU beyond it) and disk
    # cap under <home>/kv/ (0 disables that tier).
    kv_ram_bytes: int = 256 * 1024 * 1024
    kv_disk_bytes: int = 2 * 1024 * 1024 * 1024
    # Split the cores among the workers that are generating (SetThreads), so
    # concurrent models do not oversubscribe them; optionally pin each busy
    # worker to its own cores (see supervisor/processes/cores.py and bench/vs_peer.py).
    share_cores: bool = True
    pin_cores: bool = False
    # Memory budget for loaded models' estimates (memory.py): --memory-budget;
    # None leaves it to [memory] budget in config.toml, else 80% of
    # memory_available_bytes.
    memory_budget_bytes: int | None = None
    # What the machine had available when the supervisor started (read once, see memory.resolve_budget).
    memory_available_bytes: int = msgspec.field(default_factory=lambda: psutil.virtual_memory().available)
