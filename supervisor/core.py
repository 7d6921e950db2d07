"""Client requests routed to their answers: the supervisor's logic, without sockets.

`Supervisor.on_client_message` takes one decoded `ControlRequest` from a client
identity, checks the handshake, and hands the request to its family in
control/ (runs, sessions, models, trust). Answers leave through the one
`ClientSink` the process shell provides. Long requests (runs, loads, unloads,
anything that touches the database or the sandbox) run as asyncio tasks, so one
slow model load never stalls other clients.

Guarantees to a client, per request id:
- a `Run` or a `Complete` gets exactly one `RunFinished`, preceded by a
  `RequestFailed` when its stop reason is `error`;
- every other request gets exactly one answer (its result or a `RequestFailed`);
- a request before the hello, or during shutdown, is refused with a typed error;
- a client process that dies (its hello named its pid) has its runs cancelled
  at once, so a killed `bastion run` does not leave its generation running.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from bastion.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    ErrorCode,
    Hello,
    HelloAccepted,
    RequestFailed,
    Role,
    Shutdown,
)
from bastion.protocol.control import (
    Complete,
    ControlEvent,
    ControlRequest,
    GetStatus,
    ListModels,
    LoadModel,
    Run,
    ShutdownStarted,
    UnloadModel,
)
from bastion.protocol.sessions import (
    ClearSession,
    DeleteSession,
    ForkSession,
    ListSessions,
    PinMessage,
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
from bastion.supervisor.control.completions import CompletionService
from bastion.supervisor.control.models import ModelRequests
from bastion.supervisor.control.runs import RunService
from bastion.supervisor.control.sessions import SessionRequests
from bastion.supervisor.control.trust import TrustRequests
from bastion.supervisor.errors import SupervisorError
from bastion.supervisor.models.loaded import LoadedModels
from bastion.supervisor.runs import ActiveRun, ClientSink

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(
        self,
        *,
        runs: RunService,
        completions: CompletionService,
        sessions: SessionRequests,
        models: ModelRequests,
        trust: TrustRequests,
        loaded: LoadedModels,
        sink: ClientSink,
        request_shutdown: Callable[[], None],
    ) -> None:
        self._runs_service = runs
        self._completions = completions
        self._sessions = sessions
        self._models = models
        self._trust = trust
        self._loaded = loaded
        self._send = sink
        self._request_shutdown = request_shutdown
        self._clients: set[bytes] = set()
        # Client processes watched for their exit: pid -> (pidfd, its connections), and back.
        self._watched: dict[int, tuple[int, set[bytes]]] = {}
        self._client_pids: dict[bytes, int] = {}
        self._runs: dict[tuple[bytes, str], ActiveRun] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._shutting_down = False

    # --- entry point ------------------------------------------------------

    def on_client_message(self, client: bytes, message: ControlRequest) -> None:
        if isinstance(message, Hello):
            self._on_hello(client, message)
            return
        request_id = message.request_id
        if client not in self._clients:
            self._reply_error(client, request_id, ErrorCode.HELLO_REQUIRED, "send hello with the protocol version first")
            return
        if self._shutting_down and not isinstance(message, (Cancel, GetStatus, Shutdown)):
            self._reply_error(client, request_id, ErrorCode.SHUTTING_DOWN, "the supervisor is shutting down",
                              retryable=True)
            return
        emit = functools.partial(self._send, client)
        match message:
            case Run() | Complete():
                self._start_run(client, message)
            case Cancel(request_id=request_id):
                self._cancel(client, request_id)
            case GetStatus():
                runs_active = sum(1 for run in self._runs.values() if not run.done)
                self._send(client, self._models.status(message, runs_active=runs_active))
            case ListModels():
                self._send(client, self._models.listing(message))
            case LoadModel():
                self._answer(client, request_id, self._models.load(message, emit))
            case UnloadModel():
                self._answer(client, request_id, self._models.unload(message))
            case Shutdown():
                self._send(client, ShutdownStarted(request_id=request_id))
                self._request_shutdown()
            case ListSessions() | ShowSession() | DeleteSession() | ForkSession() | ClearSession() | PinMessage():
                self._answer(client, request_id, self._sessions.answer(message))
            case (ListTools() | InvokeTool() | ShowPolicy() | CheckPolicy() | ListApprovals() | ResolveApproval()
                  | VerifyAudit() | Diagnose()):
                self._answer(client, request_id, self._trust.answer(message, client, self._send))

    def reply_protocol_error(self, client: bytes, code: ErrorCode, message: str) -> None:
        self._reply_error(client, "", code, message)

    # --- handshake --------------------------------------------------------

    def _on_hello(self, client: bytes, hello: Hello) -> None:
        if hello.protocol_version != PROTOCOL_VERSION or hello.role is not Role.CLIENT:
            self._reply_error(
                client, "", ErrorCode.PROTOCOL_MISMATCH,
                f"this supervisor speaks protocol {PROTOCOL_VERSION} to clients; got "
                f"{hello.role.value} protocol {hello.protocol_version}. Upgrade the older side.",
            )  # fmt: skip
            return
        self._clients.add(client)
        if hello.pid > 0:
            self._watch_client(client, hello.pid)
        self._send(client, HelloAccepted(protocol_version=PROTOCOL_VERSION, supervisor_pid=os.getpid()))

    def _watch_client(self, client: bytes, pid: int) -> None:
        """Be told the moment the client's process exits (a pidfd turns readable): a client
        killed mid-run sends no Cancel, and its socket's end is invisible to a ROUTER. One
        pidfd per process, however many connections it opens."""
        previous = self._client_pids.get(client)
        if previous == pid:
            return
        if previous is not None:
            self._watched[previous][1].discard(client)
        watched = self._watched.get(pid)
        if watched is None:
            try:
                pidfd = os.pidfd_open(pid)
            except (OSError, AttributeError) as exc:
                # Already gone, in another pid namespace, or a kernel without pidfds: its runs
                # then end as requests do, at their end or on Cancel.
                log.info("cannot watch client %r (pid %d): %s", client, pid, exc)
                return
            watched = self._watched[pid] = (pidfd, set())
            asyncio.get_running_loop().add_reader(pidfd, self._process_exited, pid)
        watched[1].add(client)
        self._client_pids[client] = pid

    def _unwatch(self, pid: int) -> set[bytes]:
        pidfd, clients = self._watched.pop(pid)
        asyncio.get_running_loop().remove_reader(pidfd)
        os.close(pidfd)
        for client in clients:
            self._client_pids.pop(client, None)
        return clients

    def _process_exited(self, pid: int) -> None:
        for client in self._unwatch(pid):
            self._clients.discard(client)
            mine = [run for (owner, _), run in self._runs.items() if owner == client and not run.done]
            if mine:
                log.warning("client %r (pid %d) exited with %d run(s) in flight: cancelling them", client, pid,
                            len(mine))  # fmt: skip
            for run in mine:
                run.request_cancel()

    def _reply_error(self, client: bytes, request_id: str, code: ErrorCode, message: str, *,
                     retryable: bool = False) -> None:
        self._send(client, RequestFailed(request_id=request_id, code=code, message=message, retryable=retryable))

    # --- runs -------------------------------------------------------------

    def _start_run(self, client: bytes, request: Run | Complete) -> None:
        key = (client, request.request_id)
        if key in self._runs:
            self._reply_error(client, request.request_id, ErrorCode.DUPLICATE_REQUEST,
                              f"request id {request.request_id!r} is already running")
            return
        run = ActiveRun(request_id=request.request_id, client=client, sink=self._send)
        self._runs[key] = run
        run.finished.add_done_callback(lambda _f: self._runs.pop(key, None))
        if isinstance(request, Complete):
            self._spawn_task(self._completions.serve(run, request))
        else:
            self._spawn_task(self._runs_service.serve(run, request))

    def _cancel(self, client: bytes, request_id: str) -> None:
        run = self._runs.get((client, request_id))
        if run is None:
            self._reply_error(client, request_id, ErrorCode.UNKNOWN_REQUEST, f"no running request {request_id!r} to cancel")
            return
        # The loop waits on this: a generation in flight is cancelled in the
        # worker, a run still loading its model ends once the load does.
        run.request_cancel()

    # --- every other request: exactly one answer --------------------------

    def _answer(self, client: bytes, request_id: str, answer: Coroutine[Any, Any, ControlEvent]) -> None:
        async def reply() -> None:
            async with self._answering(client, request_id):
                self._send(client, await answer)

        self._spawn_task(reply())

    @contextlib.asynccontextmanager
    async def _answering(self, client: bytes, request_id: str) -> AsyncIterator[None]:
        """Whatever happens inside, the request gets an answer: a failure
        becomes a typed error, a bug an `internal` one, a shutdown says so."""
        try:
            yield
        except SupervisorError as exc:
            self._reply_error(client, request_id, exc.code, exc.message, retryable=exc.retryable)
        except asyncio.CancelledError:
            self._reply_error(client, request_id, ErrorCode.SHUTTING_DOWN, "the supervisor is shutting down",
                              retryable=True)
            raise
        except Exception as exc:
            log.exception("request %s failed", request_id)
            self._reply_error(client, request_id, ErrorCode.INTERNAL, f"internal error: {exc!r}")

    # --- lifecycle --------------------------------------------------------

    def _spawn_task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self) -> None:
        self._shutting_down = True
        for pid in list(self._watched):
            self._unwatch(pid)
        # Runs end as failed-and-retryable, not cancelled: nobody pressed Ctrl-C.
        for run in list(self._runs.values()):
            run.fail(ErrorCode.SHUTTING_DOWN, "the supervisor is shutting down", retryable=True)
        await self._loaded.unload_all()
        for task in list(self._tasks):
            task.cancel()
        for run in list(self._runs.values()):
            run.fail(ErrorCode.SHUTTING_DOWN, "the supervisor is shutting down", retryable=True)
