"""Tunables of the supervisor process, in one typed object built by its shell."""

from __future__ import annotations

import os

import msgspec


class SupervisorConfig(msgspec.Struct, frozen=True, kw_only=True):
    # Heartbeats to workers; a worker exits when they stop for its own timeout.
    heartbeat_interval_s: float = 1.0
    # A worker silent this long is treated as hung and killed.
    worker_silence_limit_s: float = 30.0
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
