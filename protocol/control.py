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

from bastion.protocol.agent_events import (
    ContextBudget,
    ContextStrategy,
    PromptRendered,
    ReasoningDelta,
    RunWarning,
    ToolCallParsed,
    ToolDecision,
    ToolEnded,
    ToolOutput,
    ToolStarted,
    TurnFinished,
    TurnStarted,
)
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
    TokenLogprobs,
    WorkerState,
)

# `X as X`: re-exported, clients know these as part of the control protocol.
from bastion.protocol.completion import Complete as Complete
from bastion.protocol.completion import Turn
from bastion.protocol.control_options import SamplingRequest as SamplingRequest
from bastion.protocol.control_options import ToolChoice as ToolChoice
from bastion.protocol.control_options import ToolChoiceMode as ToolChoiceMode
from bastion.protocol.remote import BackendGauge
from bastion.protocol.sessions import (
    ClearSession,
    DeleteSession,
    ForkSession,
    ListSessions,
    PinMessage,
    SessionChanged,
    SessionDetail,
    SessionList,
    ShowSession,
)
from bastion.protocol.trust import (
    ApprovalList,
    ApprovalRequired,
    ApprovalResolved,
    AuditVerified,
    CheckPolicy,
    Diagnose,
    Diagnosis,
    InvokeTool,
    ListApprovals,
    ListTools,
    PolicyChecked,
    PolicyShown,
    ResolveApproval,
    ShowPolicy,
    ToolInvoked,
    ToolList,
    VerifyAudit,
)


class Run(Message, frozen=True, tag="run"):
    """Answer `prompt` with `model` (a registry name, a GGUF path, `scripted:FILE`;
    None: the session's model, else the default model).

    Without `session` the run is one-shot (a fresh, unnamed conversation); with
    it, the prompt continues that session, creating it if needed. `tools` names
    the tools the model may call; empty means no tools and no tool-call
    parsing at all. `template` overrides the chat template (a built-in name).
    `show_prompt` renders the prompt the model would receive and generates
    nothing."""

    request_id: str
    prompt: str
    model: str | None = None
    system: str | None = None
    sampling: SamplingRequest = SamplingRequest()
    session: str | None = None
    tools: tuple[str, ...] = ()
    template: str | None = None
    max_iterations: int = 8
    context_strategy: ContextStrategy = ContextStrategy.WINDOW
    show_prompt: bool = False
    # Trust: tools touch only this directory (absolute; None: the supervisor refuses file and shell tools).
    workspace: str | None = None
    allow_shell: bool = False
    allow_write: bool = False
    # How long an `ask` waits for an answer before it counts as a deny.
    approval_timeout_s: float = 300.0
    # Unload the model after this long idle once the run ends (-1 never, 0 at
    # once); None keeps the model's configured keep_alive.
    keep_alive_s: float | None = None
    tool_choice: ToolChoice = ToolChoice()
    # A one-shot run's earlier turns (a stateless API client's history); a session holds its own.
    history: tuple[Turn, ...] = ()


class GetStatus(Message, frozen=True, tag="get_status"):
    request_id: str


class ListModels(Message, frozen=True, tag="list_models"):
    request_id: str
    catalog: bool = False  # also list the models the registry can load (`ModelList.catalog`)


class LoadModel(Message, frozen=True, tag="load_model"):
    """Load `model` (also clears a `failed` mark). `keep_alive_s`: unload after
    this long idle; -1 never, 0 as soon as it is idle, None the model's default."""

    request_id: str
    model: str
    keep_alive_s: float | None = None


class UnloadModel(Message, frozen=True, tag="unload_model"):
    request_id: str
    model: str


class LoadStage(enum.Enum):
    RESOLVING = "resolving"  # finding the GGUF
    ASSEMBLING = "assembling"  # joining a chunked package into the cache
    SPAWNING = "spawning"  # starting the worker process
    LOADING = "loading"  # worker is reading the GGUF
    READY = "ready"


class LoadProgress(Message, frozen=True, tag="load_progress"):
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
    # Recovery: restarts after crashes in the current window, and why the model
    # failed (state `failed`) or last restarted.
    restarts: int = 0
    failure: str = ""
    # Memory: the estimate made from the GGUF before loading (weights + KV).
    memory_estimate_bytes: int = 0
    # Idle unloading: -1 never; otherwise seconds idle before unload, and how
    # many remain (None while busy or never).
    keep_alive_s: float = -1.0
    expires_in_s: float | None = None
    # Per-session KV snapshots held by the worker.
    snapshots_ram: int = 0
    snapshot_ram_bytes: int = 0
    snapshots_disk: int = 0
    snapshot_disk_bytes: int = 0
    flash_attn: bool = False  # whether the worker computes attention with flash attention
    kv_cache_type: str = "f16"  # how its KV cache is stored (KvCacheType's values)
    parallel: int = 1  # generations its worker decodes together, each with n_ctx positions
    running: int = 0  # generations in flight now (at most `parallel`; more wait in `queued`)
    backends: list[BackendGauge] = []  # a remote model's servers (protocol/remote.py)


class RunStarted(Message, frozen=True, tag="run_start"):
    request_id: str
    model: str
    worker_pid: int
    template: str
    # The sampling the run's model calls use, and where each default came from
    # ("flags", "gguf general.sampling", "family smollm2 (model card)", "bastion").
    sampling: SamplingParams | None = None
    sampling_source: str = ""


class RunFinished(Message, frozen=True, tag="run_end"):
    request_id: str
    stop_reason: StopReason


class CatalogEntry(msgspec.Struct, frozen=True, kw_only=True):
    """A model the registry knows, loaded or not."""

    name: str
    description: str = ""
    path: str = ""  # its GGUF, when it is a file already (a package's is assembled on first load)
    n_ctx: int = 0
    file_size: int = 0
    modified_at: float = 0.0  # the file's mtime (unix seconds); 0 when there is no file yet


class ModelList(Message, frozen=True, tag="models"):
    request_id: str
    models: list[ModelStatus]  # the loaded ones
    catalog: list[CatalogEntry] = []  # with `ListModels.catalog`: every registry model


class ModelLoaded(Message, frozen=True, tag="model_loaded"):
    request_id: str
    model: ModelStatus
    already_loaded: bool = False
    # Set when a loaded worker was replaced because the model's settings
    # changed (e.g. n_ctx in config.toml): what changed.
    reload_reason: str = ""


class ModelUnloaded(Message, frozen=True, tag="model_unloaded"):
    request_id: str
    name: str


class MemoryBudgetSource(enum.Enum):
    DEFAULT = "default"  # a share of the memory available when the supervisor started
    CONFIG = "config"  # [memory] budget in config.toml
    FLAG = "flag"  # the supervisor's --memory-budget


class StatusReport(Message, frozen=True, tag="status"):
    request_id: str
    pid: int
    version: str
    protocol_version: int
    home: str
    control_endpoint: str
    uptime_s: float
    models_loaded: int
    runs_active: int
    # Memory: the budget loaded models must fit in, where it came from
    # (`memory_budget_detail` says how it was computed), and the estimated
    # bytes each loaded or loading model holds against it.
    memory_budget_bytes: int = 0
    memory_budget_source: MemoryBudgetSource = MemoryBudgetSource.DEFAULT
    memory_budget_detail: str = ""
    memory_held_bytes: int = 0
    memory_held_by: dict[str, int] = {}


class ShutdownStarted(Message, frozen=True, tag="shutdown_started"):
    request_id: str


ControlRequest = (
    Hello
    | Run
    | Complete
    | Cancel
    | GetStatus
    | ListModels
    | LoadModel
    | UnloadModel
    | Shutdown
    | ListSessions
    | ShowSession
    | DeleteSession
    | ForkSession
    | ClearSession
    | PinMessage
    | ListTools
    | InvokeTool
    | ShowPolicy
    | CheckPolicy
    | ListApprovals
    | ResolveApproval
    | VerifyAudit
    | Diagnose
)
ControlEvent = (
    HelloAccepted
    | LoadProgress
    | RunStarted
    | TokenDelta
    | TokenLogprobs
    | GenerationStats
    | RunFinished
    | RequestFailed
    | ModelList
    | ModelLoaded
    | ModelUnloaded
    | StatusReport
    | ShutdownStarted
    | TurnStarted
    | ContextBudget
    | ReasoningDelta
    | ToolCallParsed
    | ToolDecision
    | ToolStarted
    | ToolOutput
    | ToolEnded
    | RunWarning
    | TurnFinished
    | PromptRendered
    | SessionList
    | SessionDetail
    | SessionChanged
    | ApprovalRequired
    | ApprovalList
    | ApprovalResolved
    | ToolList
    | ToolInvoked
    | PolicyShown
    | PolicyChecked
    | AuditVerified
    | Diagnosis
)
