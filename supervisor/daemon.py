"""The supervisor's process shell: lock, sockets, signals and receive loops.

Startup: take an exclusive lock in the runtime directory (a second supervisor
for the same home exits instead of stealing the sockets; clients use the same
lock to tell whether one is running), build the object graph (`compose`: the
one place collaborators are wired), bind the control, workers and tools
ROUTERs on `ipc://` paths in that mode-0700 directory, write the pid file.

Shutdown (SIGTERM, SIGINT or a `Shutdown` request): stop accepting work, stop
every worker (Shutdown, then SIGTERM, then SIGKILL), remove the sockets and the
pid file, release the lock. Workers also die on their own if this process is
killed outright (parent-death signal and missed heartbeats).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import types
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

import zmq
import zmq.asyncio

from bastion.protocol import (
    ErrorCode,
    HomeLayout,
    ProtocolError,
    supervisor_control_codec,
    supervisor_worker_codec,
)
from bastion.protocol.codec import supervisor_sandbox_codec
from bastion.protocol.control import ControlEvent
from bastion.protocol.sandbox_wire import ToSandbox
from bastion.protocol.worker_wire import ToWorker
from bastion.supervisor.config import SupervisorConfig
from bastion.supervisor.control.completions import CompletionService
from bastion.supervisor.control.models import ModelRequests
from bastion.supervisor.control.runs import RunService
from bastion.supervisor.control.sessions import SessionRequests
from bastion.supervisor.control.trust import TrustRequests
from bastion.supervisor.core import Supervisor
from bastion.supervisor.models.loaded import LoadedModels
from bastion.supervisor.models.registry import RegistryWatcher, remote_models
from bastion.supervisor.models.tokenizer import TokenCounters, VocabTokenCounter
from bastion.supervisor.processes.remote_probes import probe_remotes
from bastion.supervisor.processes.sandboxes import SandboxPool
from bastion.supervisor.processes.workers import WorkerPool
from bastion.supervisor.runs import ClientSink, generation_ids
from bastion.supervisor.store.sessions import SessionStore
from bastion.supervisor.tools.registry import ToolRegistry
from bastion.supervisor.trust.approvals import ApprovalStore
from bastion.supervisor.trust.audit import AuditLog
from bastion.supervisor.trust.gate import ApprovalWaits, PolicyWatcher, Trust

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 16 * 1024 * 1024
EXIT_ALREADY_RUNNING = 3


class AlreadyRunningError(Exception):
    pass


def acquire_lock(layout: HomeLayout) -> IO[str]:
    handle = open(layout.lock_file, "a+")  # noqa: SIM115 - held for the process lifetime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise AlreadyRunningError(f"a supervisor is already running for {layout.root}") from None
    return handle


def compose(
    *,
    layout: HomeLayout,
    registry: RegistryWatcher,
    models: LoadedModels,
    store: SessionStore,
    approvals: ApprovalStore,
    audit: AuditLog,
    sandboxes: SandboxPool,
    counters: TokenCounters,
    sink: ClientSink,
    request_shutdown: Callable[[], None],
) -> Supervisor:
    """The supervisor's object graph, each collaborator built once: the one
    place they are wired together (tests wire stand-in processes here too)."""
    trust = Trust(policies=PolicyWatcher(layout), approvals=approvals, waits=ApprovalWaits(approvals), audit=audit,
                  sandboxes=sandboxes)
    tools = ToolRegistry.standard()
    runs = RunService(registry=registry, models=models, store=store, tools=tools, counters=counters, trust=trust,
                      new_id=generation_ids())
    completions = CompletionService(registry=registry, models=models, counters=counters, new_id=generation_ids("c"))
    sessions = SessionRequests(store=store, waits=trust.waits, busy_sessions=runs.busy_sessions,
                               next_prompt=runs.next_prompt)
    return Supervisor(
        runs=runs, completions=completions, sessions=sessions, models=ModelRequests(layout=layout, registry=registry, models=models),
        trust=TrustRequests(trust=trust, tools=tools, audit_path=layout.audit_log,
                            remote_probes=lambda: probe_remotes(remote_models(registry.current()))),
        loaded=models, sink=sink,
        request_shutdown=request_shutdown,
    )  # fmt: skip


class SupervisorDaemon:
    def __init__(
        self,
        *,
        layout: HomeLayout,
        config: SupervisorConfig,
        registry: RegistryWatcher,
        store: SessionStore,
        approvals: ApprovalStore,
        audit: AuditLog,
    ) -> None:
        self._layout = layout
        self._config = config
        self._registry = registry
        self._stop = asyncio.Event()
        self._context = zmq.asyncio.Context()
        self._control = self._router()
        self._workers = self._router()
        self._tools = self._router()
        self._control_codec = supervisor_control_codec()
        self._worker_codec = supervisor_worker_codec()
        self._sandbox_codec = supervisor_sandbox_codec()
        self._sandboxes = SandboxPool(layout=layout, send=self._send_sandbox)
        self._pool = WorkerPool(config=config, layout=layout, send=self._send_worker)
        self._counters = TokenCounters()
        self._prefetches: set[asyncio.Future[VocabTokenCounter]] = set()  # vocabulary loads under way (held, not lost)
        self._models = LoadedModels(config=config, layout=layout, pool=self._pool,
                                    memory_settings=registry.memory_settings, on_resolved=self._prefetch_counter)
        self._core = compose(
            layout=layout, registry=registry, models=self._models, store=store, approvals=approvals, audit=audit,
            sandboxes=self._sandboxes, counters=self._counters, sink=self._send_client,
            request_shutdown=self._stop.set,
        )  # fmt: skip

    def _router(self) -> zmq.asyncio.Socket:
        socket = self._context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        # A slow reader (a client piping into a busy terminal) must not lose
        # events at the default 1000-message high-water mark.
        socket.setsockopt(zmq.SNDHWM, 1_000_000)
        return socket

    # --- sending (never blocks: a client gone away just loses its events) --

    def _prefetch_counter(self, path: Path) -> None:
        """Load a model's vocabulary (for counting prompt tokens) while its worker loads the model:
        the first run then finds it ready instead of waiting ~0.25 s more. A failure is only
        logged here: the run that needs the counter meets it again and reports it."""

        def done(task: asyncio.Future[VocabTokenCounter]) -> None:
            if not task.cancelled() and task.exception() is not None:
                log.info("vocabulary of %s not preloaded: %s", path, task.exception())

        task: asyncio.Future[VocabTokenCounter] = asyncio.ensure_future(asyncio.to_thread(self._counters.get, path))
        task.add_done_callback(done)
        self._prefetches.add(task)
        task.add_done_callback(self._prefetches.discard)

    def _send_client(self, client: bytes, event: ControlEvent) -> None:
        self._send(self._control, client, self._control_codec.encode(event))

    def _send_worker(self, worker: bytes, message: ToWorker) -> None:
        self._send(self._workers, worker, self._worker_codec.encode(message))

    def _send_sandbox(self, sandbox: bytes, message: ToSandbox) -> None:
        self._send(self._tools, sandbox, self._sandbox_codec.encode(message))

    @staticmethod
    def _send(socket: zmq.asyncio.Socket, identity: bytes, payload: bytes) -> None:
        try:
            # The asyncio socket's send returns a future; with NOBLOCK it completes at once.
            socket.send_multipart([identity, payload], flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("dropped a message to %r: peer's queue is full", identity)

    # --- receive loops ----------------------------------------------------

    async def _serve_control(self) -> None:
        while True:
            frames = await self._control.recv_multipart(copy=True)
            if len(frames) != 2:
                log.warning("dropped a control message of %d frames", len(frames))
                if frames:
                    self._core.reply_protocol_error(frames[0], ErrorCode.MALFORMED_MESSAGE, "expected exactly one frame")
                continue
            client, payload = frames
            try:
                message = self._control_codec.decode(payload)
            except ProtocolError as exc:
                log.warning("bad control frame from %r: %s", client, exc.message)
                self._core.reply_protocol_error(client, exc.code, exc.message)
                continue
            try:
                self._core.on_client_message(client, message)
            except Exception:
                log.exception("control request %r failed", type(message).__name__)

    async def _serve_workers(self) -> None:
        while True:
            frames = await self._workers.recv_multipart(copy=True)
            if len(frames) != 2:
                log.warning("dropped a worker message of %d frames", len(frames))
                continue
            identity, payload = frames
            handle = self._pool.by_identity(identity)
            if handle is None:
                log.warning("dropped a message from unknown worker %r", identity)
                continue
            try:
                message = self._worker_codec.decode(payload)
            except ProtocolError as exc:
                log.warning("bad frame from worker %s: %s", handle.worker_id, exc.message)
                continue
            try:
                handle.on_message(message)
            except Exception:
                log.exception("handling %s from worker %s failed", type(message).__name__, handle.worker_id)

    async def _serve_sandboxes(self) -> None:
        while True:
            frames = await self._tools.recv_multipart(copy=True)
            if len(frames) != 2:
                log.warning("dropped a sandbox message of %d frames", len(frames))
                continue
            identity, payload = frames
            try:
                message = self._sandbox_codec.decode(payload)
            except ProtocolError as exc:
                log.warning("bad frame from sandbox %r: %s", identity, exc.message)
                continue
            try:
                self._sandboxes.on_message(identity, message)
            except Exception:
                log.exception("handling %s from sandbox %r failed", type(message).__name__, identity)

    async def _heartbeats(self) -> None:
        seq = 0
        while True:
            await asyncio.sleep(self._config.heartbeat_interval_s)
            seq += 1
            self._pool.heartbeat(seq)
            self._sandboxes.heartbeat(seq)

    # --- lifecycle --------------------------------------------------------

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        self._workers.bind(self._layout.workers_endpoint)
        self._tools.bind(self._layout.tools_endpoint)
        self._control.bind(self._layout.control_endpoint)
        self._layout.pid_file.write_text(f"{os.getpid()}\n")
        log.info("supervisor %d serving %s", os.getpid(), self._layout.control_endpoint)
        loops = [asyncio.create_task(coro) for coro in
                 (self._serve_control(), self._serve_workers(), self._serve_sandboxes(), self._heartbeats())]
        for task in loops:
            task.add_done_callback(self._loop_ended)
        try:
            await self._stop.wait()
            log.info("shutting down")
            # Keep receiving while workers stop, so their last messages are handled.
            await self._core.shutdown()
            await self._sandboxes.stop()
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            self._close()

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """A receive loop must never end while serving: if one dies, stop
        cleanly (workers stopped, sockets removed) rather than linger deaf."""
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            # Each loop is a coroutine object (see serve), which has a __name__.
            loop = cast("types.CoroutineType[Any, Any, None]", task.get_coro())
            log.critical("%s stopped: %r; shutting down", loop.__name__, error, exc_info=error)
            self._stop.set()

    def _close(self) -> None:
        self._counters.close()
        self._control.close(linger=100)
        self._workers.close(linger=0)
        self._tools.close(linger=0)
        self._context.term()
        sockets = (self._layout.control_socket, self._layout.workers_socket, self._layout.tools_socket)
        for path in (*sockets, self._layout.pid_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        log.info("supervisor stopped")
