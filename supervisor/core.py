"""Client requests turned into work: the supervisor's logic, without sockets.

`Supervisor.on_client_message` takes one decoded `ControlRequest` from a client
identity and answers through the `send_client` callable the process shell
hands in. Long requests (runs, loads, unloads) run as asyncio tasks so one
slow model load never stalls other clients.

Guarantees to a client, per request id:
- a `Run` gets exactly one `RunFinished`, preceded by a `RequestFailed` when
  its stop reason is `error`;
- every other request gets exactly one answer (its result or a `RequestFailed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from importlib import metadata

import msgspec

from bastion.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    ErrorCode,
    Hello,
    HelloAccepted,
    HomeLayout,
    RequestFailed,
    Role,
    Shutdown,
)
from bastion.protocol.control import (
    ControlEvent,
    ControlRequest,
    GetStatus,
    ListModels,
    LoadModel,
    LoadProgress,
    LoadStage,
    ModelList,
    ModelLoaded,
    ModelUnloaded,
    Run,
    ShutdownStarted,
    StatusReport,
    UnloadModel,
)
from bastion.protocol.sessions import (
    ClearSession,
    DeleteSession,
    ForkSession,
    ListSessions,
    PinMessage,
    SessionAction,
    SessionChanged,
    SessionDetail,
    SessionList,
    SessionState,
    SessionSummary,
    ShowSession,
)
from bastion.protocol.trust import (
    CheckPolicy,
    Diagnose,
    InvokeTool,
    ListApprovals,
    ListTools,
    ResolveApproval,
    ShowPolicy,
    VerifyAudit,
)
from bastion.supervisor.control.runs import RunService
from bastion.supervisor.control.trust import TrustRequests
from bastion.supervisor.errors import SupervisorError, UnknownSessionError
from bastion.supervisor.models.loaded import LoadedModels, status_of
from bastion.supervisor.models.registry import RegistryWatcher
from bastion.supervisor.models.tokenizer import TokenCounters
from bastion.supervisor.runs import ActiveRun
from bastion.supervisor.store.sessions import SessionStore
from bastion.supervisor.tools.registry import ToolRegistry
from bastion.supervisor.trust.gate import Trust

log = logging.getLogger(__name__)

SendToClient = Callable[[bytes, ControlEvent], None]


def _version() -> str:
    try:
        return metadata.version("bastion")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class Supervisor:
    def __init__(
        self,
        *,
        layout: HomeLayout,
        registry: RegistryWatcher,
        models: LoadedModels,
        store: SessionStore,
        tools: ToolRegistry,
        counters: TokenCounters,
        trust: Trust,
        send_client: SendToClient,
        request_shutdown: Callable[[], None],
    ) -> None:
        self._layout = layout
        self._registry = registry
        self._models = models
        self._store = store
        self._service = RunService(
            registry=registry, models=models, store=store, tools=tools, counters=counters,
            progress=self._progress_reporter, new_id=lambda: f"g{next(self._ids)}", trust=trust,
        )  # fmt: skip
        self._trust = trust
        self._trust_requests = TrustRequests(trust=trust, tools=tools, audit_path=layout.audit_log)
        self._send = send_client
        self._request_shutdown = request_shutdown
        self._clients: set[bytes] = set()
        self._runs: dict[tuple[bytes, str], ActiveRun] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._started = time.monotonic()
        self._shutting_down = False

    # --- entry point ------------------------------------------------------

    def on_client_message(self, client: bytes, message: ControlRequest) -> None:
        if isinstance(message, Hello):
            self._on_hello(client, message)
            return
        if client not in self._clients:
            self._reply_error(client, _request_id(message), ErrorCode.HELLO_REQUIRED,
                              "send hello with the protocol version first")
            return
        if self._shutting_down and not isinstance(message, (Cancel, GetStatus, Shutdown)):
            self._reply_error(client, _request_id(message), ErrorCode.SHUTTING_DOWN,
                              "the supervisor is shutting down", retryable=True)
            return
        match message:
            case Run():
                self._start_run(client, message)
            case Cancel(request_id=request_id):
                self._cancel(client, request_id)
            case GetStatus(request_id=request_id):
                self._send(client, self._status(request_id))
            case ListModels(request_id=request_id):
                self._send(client, ModelList(request_id=request_id, models=self._models.statuses()))
            case LoadModel():
                self._spawn_task(self._load(client, message))
            case UnloadModel():
                self._spawn_task(self._unload(client, message))
            case Shutdown(request_id=request_id):
                self._send(client, ShutdownStarted(request_id=request_id))
                self._request_shutdown()
            case ListSessions() | ShowSession() | DeleteSession() | ForkSession() | ClearSession() | PinMessage():
                self._spawn_task(self._session_request(client, message))
            case (ListTools() | InvokeTool() | ShowPolicy() | CheckPolicy() | ListApprovals() | ResolveApproval()
                  | VerifyAudit() | Diagnose()):
                self._spawn_task(self._trust_request(client, message))

    def reply_protocol_error(self, client: bytes, code: ErrorCode, message: str) -> None:
        self._reply_error(client, "", code, message)

    # --- handshake and small requests -------------------------------------

    def _on_hello(self, client: bytes, hello: Hello) -> None:
        if hello.protocol_version != PROTOCOL_VERSION or hello.role is not Role.CLIENT:
            self._reply_error(
                client, "", ErrorCode.PROTOCOL_MISMATCH,
                f"this supervisor speaks protocol {PROTOCOL_VERSION} to clients; got "
                f"{hello.role.value} protocol {hello.protocol_version}. Upgrade the older side.",
            )
            return
        self._clients.add(client)
        self._send(client, HelloAccepted(protocol_version=PROTOCOL_VERSION, supervisor_pid=os.getpid()))

    def _status(self, request_id: str) -> StatusReport:
        budget = self._models.memory_budget()
        held = self._models.memory_held()
        return StatusReport(
            request_id=request_id,
            pid=os.getpid(),
            version=_version(),
            protocol_version=PROTOCOL_VERSION,
            home=str(self._layout.root),
            control_endpoint=self._layout.control_endpoint,
            uptime_s=round(time.monotonic() - self._started, 3),
            models_loaded=len(self._models.names()),
            runs_active=sum(1 for run in self._runs.values() if not run.done),
            memory_budget_bytes=budget.bytes,
            memory_budget_source=budget.source,
            memory_budget_detail=budget.detail,
            memory_held_bytes=sum(held.values()),
            memory_held_by=held,
        )

    def _reply_error(self, client: bytes, request_id: str, code: ErrorCode, message: str, *,
                     retryable: bool = False) -> None:
        self._send(client, RequestFailed(request_id=request_id, code=code, message=message, retryable=retryable))

    # --- runs -------------------------------------------------------------

    def _start_run(self, client: bytes, request: Run) -> None:
        key = (client, request.request_id)
        if key in self._runs:
            self._reply_error(client, request.request_id, ErrorCode.DUPLICATE_REQUEST,
                              f"request id {request.request_id!r} is already running")
            return
        run = ActiveRun(request_id=request.request_id, client=client, emit=lambda event: self._send(client, event))
        self._runs[key] = run
        run.finished.add_done_callback(lambda _f: self._runs.pop(key, None))
        self._spawn_task(self._service.serve(run, request))

    def _cancel(self, client: bytes, request_id: str) -> None:
        run = self._runs.get((client, request_id))
        if run is None:
            self._reply_error(client, request_id, ErrorCode.UNKNOWN_REQUEST,
                              f"no running request {request_id!r} to cancel")
            return
        # The loop waits on this: a generation in flight is cancelled in the
        # worker, a run still loading its model ends once the load does.
        run.request_cancel()

    # --- sessions ---------------------------------------------------------

    async def _session_request(self, client: bytes, request) -> None:
        async with self._answering(client, request.request_id):
            self._send(client, await self._answer_session_request(request))

    async def _trust_request(self, client: bytes, request) -> None:
        async with self._answering(client, request.request_id):
            self._send(client, await self._trust_requests.answer(request, client, self._send))

    def _with_state(self, summary: SessionSummary) -> SessionSummary:
        if summary.name in self._trust.waits.sessions_waiting:
            state = SessionState.WAITING_FOR_APPROVAL
        elif summary.name in self._service.busy_sessions():
            state = SessionState.RUNNING
        else:
            state = SessionState.IDLE
        return msgspec.structs.replace(summary, state=state)

    @contextlib.asynccontextmanager
    async def _answering(self, client: bytes, request_id: str) -> AsyncIterator[None]:
        """Whatever happens inside, the request gets an answer: a failure
        becomes a typed error, a bug an `internal` one, a shutdown says so."""
        try:
            yield
        except SupervisorError as exc:
            self._reply_error(client, request_id, exc.code, exc.message)
        except asyncio.CancelledError:
            self._reply_error(client, request_id, ErrorCode.SHUTTING_DOWN, "the supervisor is shutting down",
                              retryable=True)
            raise
        except Exception as exc:
            log.exception("request %s failed", request_id)
            self._reply_error(client, request_id, ErrorCode.INTERNAL, f"internal error: {exc!r}")

    async def _answer_session_request(self, request):
        store = self._store
        match request:
            case ListSessions(request_id=request_id):
                return SessionList(request_id=request_id, sessions=[self._with_state(s) for s in store.list_sessions()])
            case ShowSession(request_id=request_id, name=name, with_prompt=with_prompt):
                summary = store.get_session(name)
                if summary is None:
                    raise UnknownSessionError(f"no session named {name!r}")
                prompt = await self._service.next_prompt(name) if with_prompt else ""
                messages = [m.to_protocol() for m in store.messages(name)]
                return SessionDetail(request_id=request_id, session=self._with_state(summary), messages=messages,
                                     prompt=prompt)
            case DeleteSession(request_id=request_id, name=name):
                if not store.delete_session(name):
                    raise UnknownSessionError(f"no session named {name!r}")
                return SessionChanged(request_id=request_id, name=name, action=SessionAction.DELETED)
            case ForkSession(request_id=request_id, name=name, new_name=new_name):
                store.fork_session(name, new_name)
                return SessionChanged(request_id=request_id, name=new_name, action=SessionAction.FORKED)
            case ClearSession(request_id=request_id, name=name):
                store.clear_session(name)
                return SessionChanged(request_id=request_id, name=name, action=SessionAction.CLEARED)
            case PinMessage(request_id=request_id, name=name, text=text):
                if text:
                    store.add_note(name, text)
                else:
                    seq = store.last_user_seq(name)
                    if seq is None:
                        raise UnknownSessionError(f"session {name!r} has no message of yours to pin")
                    store.pin_message(name, seq)
                return SessionChanged(request_id=request_id, name=name, action=SessionAction.PINNED)

    # --- loading ----------------------------------------------------------

    def _progress_reporter(self, client: bytes, request_id: str, name: str):
        last: dict[LoadStage, int] = {}

        def report(stage: LoadStage, done: int, total: int) -> None:
            # Byte progress arrives per chunk written; a client needs whole percents.
            percent = int(100 * done / total) if total else -1
            if stage in last and last[stage] == percent:
                return
            last[stage] = percent
            self._send(client, LoadProgress(request_id=request_id, model=name, stage=stage, done=done, total=total))

        return report

    async def _load(self, client: bytes, request: LoadModel) -> None:
        async with self._answering(client, request.request_id):
            spec = self._registry.current().lookup(request.model)
            self._models.clear_failure(spec.name)  # an explicit load is how a failed model gets another chance
            progress = self._progress_reporter(client, request.request_id, spec.name)
            model, already = await self._models.ensure_loaded(spec, progress, keep_alive_s=request.keep_alive_s)
            reload_reason = "" if already else model.reload_reason
            self._send(client, ModelLoaded(request_id=request.request_id, model=status_of(model),
                                           already_loaded=already, reload_reason=reload_reason))

    async def _unload(self, client: bytes, request: UnloadModel) -> None:
        async with self._answering(client, request.request_id):
            await self._unload_model(client, request)

    async def _unload_model(self, client: bytes, request: UnloadModel) -> None:
        name = request.model
        if self._models.get(name) is None:
            try:
                name = self._registry.current().lookup(request.model).name
            except SupervisorError:
                pass
        if not await self._models.unload(name):
            loaded = ", ".join(self._models.names()) or "none"
            self._reply_error(client, request.request_id, ErrorCode.UNKNOWN_MODEL,
                              f"model {request.model!r} is not loaded (loaded: {loaded})")
            return
        self._send(client, ModelUnloaded(request_id=request.request_id, name=name))

    # --- lifecycle --------------------------------------------------------

    def _spawn_task(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self) -> None:
        self._shutting_down = True
        # Runs end as failed-and-retryable, not cancelled: nobody pressed Ctrl-C.
        for run in list(self._runs.values()):
            run.fail(ErrorCode.SHUTTING_DOWN, "the supervisor is shutting down", retryable=True)
        await self._models.unload_all()
        for task in list(self._tasks):
            task.cancel()
        for run in list(self._runs.values()):
            run.fail(ErrorCode.SHUTTING_DOWN, "the supervisor is shutting down", retryable=True)


def _request_id(message: ControlRequest) -> str:
    return getattr(message, "request_id", "")
