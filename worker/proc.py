"""`WorkerProc`: the worker's process shell around `WorkerCore`.

Owns the process lifecycle (parent-death signal, SIGTERM, exit codes), the
zmq context and sockets, the handshake, loading the engine and the two
threads:

    main (engine) thread   handshake, load, then start each `Generate` as it
                           comes off the queue and step the active ones together
                           (up to `parallel`, see core.py); sends through an
                           inproc PUSH socket. A remote model's `RemoteCore`
                           (remote/core.py) streams over HTTP on a thread of
                           its own; this thread sends what it queued when it
                           wakes the inbox
    IO thread              `SupervisorLink`: owns the DEALER, forwards the
                           PUSH side's frames, heartbeats, cancel, shutdown

Sequence on the wire:

    -> Hello(worker, name=<worker id>, pid)
    <- HelloAccepted                   (other version, or RequestFailed(protocol_mismatch): exit 3)
    -> WorkerReady | WorkerLoadFailed  (exit 1 after the latter)
    <- Generate; -> TokenDelta* GenerationStats GenerationFinished   (see core.py)
    <> Heartbeat every heartbeat_interval, both ways

It must not contain generation logic (core.py) or library calls (engines).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import psutil
import zmq

from bastion.protocol import (
    PROTOCOL_VERSION,
    ErrorCode,
    Hello,
    HelloAccepted,
    ProtocolError,
    RequestFailed,
    Role,
    Shutdown,
    worker_codec,
)
from bastion.protocol.worker_wire import (
    CountTokens,
    Generate,
    ModelDescription,
    WorkerLoadFailed,
    WorkerReady,
)
from bastion.worker.config import EngineKind, WorkerConfig
from bastion.worker.core import Emit, WorkerCore
from bastion.worker.engine import Engine, InvalidModelFile
from bastion.worker.kv_snapshots import SnapshotStore, model_fingerprint
from bastion.worker.lifecycle import ExitCode, StopRequest, die_with_parent, parent_gone
from bastion.worker.link import Gauges, Inbox, Outbox, RequestSlots, SupervisorLink, refusal
from bastion.worker.remote.core import RemoteCore
from bastion.worker.remote.server_facts import RemoteUnavailable, read_api_key

log = logging.getLogger(__name__)

EngineFactory = Callable[[], Engine]
_WAKE = "wake"  # put in the inbox by a RemoteCore that has messages to send
_OUTBOX = "inproc://outbox"
_LINGER_MS = 500


class WorkerProc:
    def __init__(self, config: WorkerConfig, engine_factory: EngineFactory) -> None:
        self._config = config
        self._engine_factory = engine_factory
        self._codec = worker_codec()
        self._inbox: Inbox = queue.SimpleQueue()
        self._slots = RequestSlots(config.parallel)
        self._core: WorkerCore | RemoteCore | None = None
        self._signalled: StopRequest | None = None

    def run(self) -> ExitCode:
        die_with_parent()
        if parent_gone(self._config.parent_pid):
            log.error("parent %s died before the worker started", self._config.parent_pid)
            return ExitCode.SUPERVISOR_LOST
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        context = zmq.Context()
        try:
            return self._run(context)
        finally:
            # By now the IO thread has stopped (or we have _exit-ed), so this
            # thread may close whatever is still open.
            context.destroy(linger=_LINGER_MS)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Only reentrant operations here: the main thread may be anywhere.
        self._signalled = StopRequest(ExitCode.OK, signal.Signals(signum).name)
        self._slots.cancel_any()
        self._inbox.put(self._signalled)

    def _run(self, context: zmq.Context) -> ExitCode:
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.ROUTING_ID, self._config.worker_id.encode())
        dealer.setsockopt(zmq.MAXMSGSIZE, self._config.max_message_bytes)
        dealer.setsockopt(zmq.LINGER, _LINGER_MS)
        # Unbounded: a stalled supervisor is caught by the heartbeat timeout,
        # and a blocking send would stall the heartbeats that catch it.
        dealer.setsockopt(zmq.SNDHWM, 0)
        dealer.connect(self._config.endpoint)
        refused = self._handshake(dealer)
        if refused is not None:
            dealer.close()
            return refused
        outbox_in = context.socket(zmq.PULL)
        outbox_in.bind(_OUTBOX)
        push = context.socket(zmq.PUSH)
        push.connect(_OUTBOX)
        outbox = Outbox(push)
        link = SupervisorLink(self._config, dealer, outbox_in, self._inbox, self._slots, self._gauges)
        link.start()
        try:
            return self._serve(outbox.send)
        finally:
            outbox.finish()
            stopped = link.join(self._config.stop_grace)
            outbox.close()
            if not stopped:
                log.error("IO thread did not stop; exiting without cleanup")
                os._exit(ExitCode.INTERNAL)

    def _handshake(self, dealer: zmq.Socket) -> ExitCode | None:
        """Hello and its answer; None when accepted, else why we must exit."""
        hello = Hello(
            protocol_version=PROTOCOL_VERSION, role=Role.WORKER, name=self._config.worker_id, pid=os.getpid()
        )
        dealer.send(self._codec.encode(hello))
        deadline = time.monotonic() + self._config.hello_timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if self._signalled is not None:
                return self._signalled.code
            # Short polls so that a SIGTERM is noticed.
            if not dealer.poll(int(min(remaining, 0.2) * 1000)):
                continue
            try:
                answer = self._codec.decode(dealer.recv_multipart()[0])
            except ProtocolError as err:
                log.warning("refused a frame during the handshake: %s", err.message)
                dealer.send(self._codec.encode(RequestFailed(code=err.code, message=err.message)))
                continue
            match answer:
                case HelloAccepted(protocol_version=version) if version == PROTOCOL_VERSION:
                    log.info("handshake done with supervisor %d", answer.supervisor_pid)
                    return None
                case HelloAccepted(protocol_version=version):
                    log.error("supervisor speaks protocol %d, this worker %d", version, PROTOCOL_VERSION)
                    return ExitCode.PROTOCOL_MISMATCH
                case RequestFailed(code=ErrorCode.PROTOCOL_MISMATCH, message=text):
                    log.error("supervisor refused our protocol %d: %s", PROTOCOL_VERSION, text)
                    return ExitCode.PROTOCOL_MISMATCH
                case RequestFailed(code=code, message=text):
                    log.error("supervisor refused the hello: %s: %s", code.value, text)
                    return ExitCode.SUPERVISOR_LOST
                case Shutdown():
                    return ExitCode.OK
                case _:
                    log.warning("ignoring %s before the handshake is done", type(answer).__name__)
        log.error("no answer to the hello within %.1f s", self._config.hello_timeout)
        return ExitCode.SUPERVISOR_LOST

    def _gauges(self) -> Gauges:
        core = self._core
        if core is None:
            return Gauges()
        if isinstance(core, RemoteCore):
            return Gauges(progress=core.progress, backends=core.backend_gauges())
        store = core.snapshots
        if store is None:
            return Gauges(progress=core.progress, kv_tokens=core.kv_tokens)
        return Gauges(
            progress=core.progress,
            kv_tokens=core.kv_tokens,
            snapshots_ram=store.ram_count,
            snapshot_ram_bytes=store.ram_bytes,
            snapshots_disk=store.disk_count,
            snapshot_disk_bytes=store.disk_bytes,
        )

    def _snapshot_store(self, engine: Engine) -> SnapshotStore:
        path = self._config.model_path
        try:
            model = model_fingerprint(path)
        except OSError:
            model = f"path:{path}"  # an engine that reads no file (the fake)
        return SnapshotStore(
            model=model,
            layout=engine.state_layout(),
            ram_bytes=self._config.kv_ram_bytes,
            disk_dir=Path(self._config.kv_dir) if self._config.kv_dir else None,
            disk_bytes=self._config.kv_disk_bytes,
        )

    def _serve(self, emit: Emit) -> ExitCode:
        if self._config.engine is EngineKind.REMOTE:
            return self._serve_remote(emit)
        started = time.perf_counter()
        try:
            engine = self._engine_factory()
        except Exception as exc:
            invalid = isinstance(exc, InvalidModelFile)
            code = ErrorCode.INVALID_MODEL_FILE if invalid else ErrorCode.MODEL_LOAD_FAILED
            log.error("cannot load %s: %s", self._config.model_path, exc)
            emit(WorkerLoadFailed(code=code, message=str(exc)))
            self._refuse_queued(emit, code, "the model could not be loaded")
            return ExitCode.LOAD_FAILED
        with contextlib.closing(engine):
            snapshots = self._snapshot_store(engine)
            try:
                slots = self._slots
                self._core = WorkerCore(engine, snapshots=snapshots, threads_wanted=lambda: slots.threads)
                emit(WorkerReady(model=self._describe(engine, (time.perf_counter() - started) * 1000.0)))
                return self._serve_requests(self._core, emit)
            finally:
                # A clean exit (unload, keep_alive, shutdown) leaves every
                # session's last turn on disk for the next worker.
                snapshots.close(timeout=self._config.stop_grace)

    def _serve_remote(self, emit: Emit) -> ExitCode:
        remote = self._config.remote
        assert remote is not None
        inbox = self._inbox
        try:
            core = RemoteCore(remote, name=self._config.name, n_ctx=self._config.n_ctx, wake=lambda: inbox.put(_WAKE),
                              api_key=read_api_key(remote))  # fmt: skip
            self._slots.on_cancel = lambda: inbox.put(_WAKE)  # step() passes the cancel on to the stream
        except RemoteUnavailable as exc:
            return self._load_failed(emit, str(exc))
        try:
            try:
                description = core.describe()
            except RemoteUnavailable as exc:
                return self._load_failed(emit, str(exc))
            log.info("serving %s (n_ctx %d)", remote.describe(), description.n_ctx)
            self._core = core
            emit(WorkerReady(model=description))
            return self._serve_requests(core, emit)
        finally:
            core.close()

    def _load_failed(self, emit: Emit, message: str) -> ExitCode:
        log.error("cannot serve the model: %s", message)
        emit(WorkerLoadFailed(code=ErrorCode.MODEL_LOAD_FAILED, message=message))
        self._refuse_queued(emit, ErrorCode.MODEL_LOAD_FAILED, "the model could not be loaded")
        return ExitCode.LOAD_FAILED

    def _serve_requests(self, core: WorkerCore | RemoteCore, emit: Emit) -> ExitCode:
        """Start each request as it comes (up to one per engine sequence, which the link
        enforces) and step the active ones together; wait for work only when there is none
        (a remote core: none to send)."""
        stop: StopRequest | None = None
        while True:
            for item in self._arrived(block=not core.ready and (stop is None or core.active > 0)):
                match item:
                    case Generate() if stop is not None:
                        self._refuse(emit, item, ErrorCode.SHUTTING_DOWN, "the worker is shutting down")
                    case Generate():
                        # The link frees the request's slot as it forwards GenerationFinished.
                        core.start(item, emit, self._slots.cancel_check(item.request_id))
                    case CountTokens():
                        core.count_tokens(item, emit)
                    case StopRequest():
                        stop = stop or item
            if stop is not None and core.active == 0:
                log.info("exiting (%s)", stop.reason)
                self._refuse_queued(emit, ErrorCode.SHUTTING_DOWN, "the worker is shutting down")
                return stop.code
            core.step()

    def _arrived(self, *, block: bool) -> list[Generate | CountTokens | StopRequest]:
        """What the inbox holds now; with `block`, at least one item (or a wake)."""
        items: list[Generate | CountTokens | StopRequest | str] = [self._inbox.get()] if block else []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return [item for item in items if not isinstance(item, str)]  # wakes said all they had to

    def _refuse_queued(self, emit: Emit, code: ErrorCode, message: str) -> None:
        """Answer requests that will never run, so each still gets its one
        GenerationFinished."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Generate):
                self._refuse(emit, item, code, message)

    def _refuse(self, emit: Emit, request: Generate, code: ErrorCode, message: str) -> None:
        for answer in refusal(request, code, message, self._gauges().kv_tokens):
            emit(answer)

    def _describe(self, engine: Engine, load_ms: float) -> ModelDescription:
        info = engine.describe()
        path = self._config.model_path
        log.info("loaded %s (%s, n_ctx %d) in %.0f ms", path, info.architecture, info.n_ctx, load_ms)
        return ModelDescription(
            name=self._config.name,
            path=path,
            architecture=info.architecture,
            n_ctx=info.n_ctx,
            n_ctx_train=info.n_ctx_train,
            n_vocab=info.n_vocab,
            n_params=info.n_params,
            threads=info.threads,
            has_chat_template=bool(info.chat_template),
            chat_template=info.chat_template,
            bos_token=info.bos_token,
            eos_token=info.eos_token,
            file_size=os.path.getsize(path) if os.path.isfile(path) else 0,
            load_ms=round(load_ms, 1),
            rss_bytes=psutil.Process().memory_info().rss,
            gguf_name=info.gguf_name,
        )
