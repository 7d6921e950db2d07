"""`WorkerConfig`: everything a worker process is started with, typed.

Built once by `__main__` from the command line and handed to `WorkerProc`;
nothing else reads the command line or the environment.
"""

from __future__ import annotations

import enum

import msgspec

from bastion.protocol import KvCacheType
from bastion.protocol.remote import RemoteEndpoint


class EngineKind(enum.Enum):
    LLAMA = "llama"
    FAKE = "fake"  # scripted engine, for tests of the process shell
    SCRIPTED = "scripted"  # canned replies from the file at model_path (JSON or YAML list), in order
    REMOTE = "remote"  # a remote engine over HTTP (WorkerConfig.remote)


class WorkerConfig(msgspec.Struct, frozen=True, kw_only=True):
    endpoint: str  # the supervisor's workers ROUTER
    worker_id: str  # also the DEALER's routing id and the Hello's name
    name: str  # the model's name as the supervisor knows it
    model_path: str
    n_ctx: int = 4096
    threads: int
    flash_attn: bool = True
    kv_cache_type: KvCacheType = KvCacheType.F16
    # Requests decoded together, each in a sequence of its own with n_ctx positions.
    parallel: int = 1
    parent_pid: int | None = None
    engine: EngineKind = EngineKind.LLAMA
    remote: RemoteEndpoint | None = None  # with engine REMOTE
    fake_script: tuple[str, ...] = ()
    fake_token_delay: float = 0.0
    fake_load_delay: float = 0.0
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 10.0
    hello_timeout: float = 10.0
    # After asking the engine thread to stop, how long to wait before exiting
    # anyway (it may be inside a native call that cannot be interrupted).
    stop_grace: float = 5.0
    max_message_bytes: int = 16 * 1024 * 1024
    # Per-session KV snapshots: bytes held in RAM (LRU beyond it), where they
    # spill ('' keeps them in RAM only) and the bytes allowed there.
    kv_ram_bytes: int = 256 * 1024 * 1024
    kv_dir: str = ""
    kv_disk_bytes: int = 2 * 1024 * 1024 * 1024
