"""Messages between a client (the CLI or any other) and the supervisor.

The client's DEALER connects to the supervisor's control ROUTER and speaks first:

    client -> Hello(role=client)
    supervisor -> HelloAccepted | RequestFailed(protocol_mismatch)
    client -> Run
    supervisor -> LoadProgress* RunStarted TokenDelta* GenerationStats RunFinished
                  (RequestFailed before RunFinished when something fails)
    client -> Cancel(request_id)   at any time; the run ends with stop_reason=cancelled

Every request carries a client-chosen `request_id`; every event answering it
carries the same id. Event tags are the `type` values of `bastion run --json`.
"""

from __future__ import annotations

import enum

import msgspec
from bastion.protocol.common import (
    Cancel,
    GenerationStats,
    Hello,
    HelloAccepted,
    Message,
    RequestFailed,
    SamplingParams,
    Shutdown,
    StopReason,
    TokenDelta,
    WorkerState,
)


class Run(Message, tag="run"):
    """Answer `prompt` with `model` (a registry name or a GGUF path; None: the
    default model). `system` is an optional system message."""

    request_id: str
    prompt: str
    model: str | None = None
    system: str | None = None
    sampling: SamplingParams = SamplingParams()


class GetStatus(Message, tag="get_status"):
    request_id: str


class ListModels(Message, tag="list_models"):
    request_id: str


class LoadModel(Message, tag="load_model"):
    request_id: str
    model: str


class UnloadModel(Message, tag="unload_model"):
    request_id: str
    model: str


class LoadStage(enum.Enum):
    RESOLVING = "resolving"  # finding the GGUF
    ASSEMBLING = "assembling"  # joining a chunked package into the cache
    SPAWNING = "spawning"  # starting the worker process
    LOADING = "loading"  # worker is reading the GGUF
    READY = "ready"


class LoadProgress(Message, tag="load_progress"):
    request_id: str
    model: str
    stage: LoadStage
    done: int = 0
    total: int = 0


class ModelStatus(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    path: str
    state: WorkerState
    pid: int
    architecture: str = ""
    n_ctx: int = 0
    kv_tokens: int = 0
    rss_bytes: int = 0
    file_size: int = 0
    load_ms: float = 0.0
    threads: int = 0
    chat_template: str = ""  # where the prompt format came from
    queued: int = 0


class RunStarted(Message, tag="run_start"):
    request_id: str
    model: str
    worker_pid: int
    template: str


class RunFinished(Message, tag="run_end"):
    request_id: str
    stop_reason: StopReason


class ModelList(Message, tag="models"):
    request_id: str
    models: list[ModelStatus]


class ModelLoaded(Message, tag="model_loaded"):
    request_id: str
    model: ModelStatus
    already_loaded: bool = False


class ModelUnloaded(Message, tag="model_unloaded"):
    request_id: str
    name: str


class StatusReport(Message, tag="status"):
    request_id: str
    pid: int
    version: str
    protocol_version: int
    home: str
    control_endpoint: str
    uptime_s: float
    models_loaded: int
    runs_active: int


class ShutdownStarted(Message, tag="shutdown_started"):
    request_id: str


ControlRequest = Hello | Run | Cancel | GetStatus | ListModels | LoadModel | UnloadModel | Shutdown
ControlEvent = (
    HelloAccepted
    | LoadProgress
    | RunStarted
    | TokenDelta
    | GenerationStats
    | RunFinished
    | RequestFailed
    | ModelList
    | ModelLoaded
    | ModelUnloaded
    | StatusReport
    | ShutdownStarted
)
