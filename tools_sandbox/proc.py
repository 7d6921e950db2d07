"""The sandbox's process shell: its socket, heartbeats and call threads.

The main thread owns the DEALER socket (ZeroMQ sockets are not thread-safe)
and an inproc PULL that call threads push their messages into. Each `RunTool`
gets a thread that runs the call through `dispatch.execute` and streams its
chunks; `Cancel` sets that call's flag, which the launcher polls to kill the
call's whole process tree. The sandbox exits when its supervisor is gone
(parent-death signal, or no message for `heartbeat_timeout`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import msgspec
import zmq

from bastion.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    ErrorCode,
    Heartbeat,
    Hello,
    HelloAccepted,
    ProtocolError,
    RequestFailed,
    Role,
    Shutdown,
)
from bastion.protocol.codec import sandbox_codec
from bastion.protocol.sandbox_wire import (
    ConfinementReport,
    RunTool,
    SandboxReady,
    ToolChunk,
    ToolFinished,
    ToolStream,
)
from bastion.tools_sandbox.dispatch import execute

log = logging.getLogger(__name__)

_OUTBOX = "inproc://sandbox-outbox"
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class SandboxConfig:
    endpoint: str
    sandbox_id: str
    parent_pid: int | None = None
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 10.0


@dataclass
class _Call:
    request: RunTool
    cancelled: threading.Event = field(default_factory=threading.Event)


class SandboxProc:
    def __init__(self, config: SandboxConfig, report: ConfinementReport) -> None:
        self._config = config
        self._report = report
        self._context = zmq.Context()
        self._codec = sandbox_codec()
        self._encoder = msgspec.msgpack.Encoder()
        self._calls: dict[str, _Call] = {}
        self._lock = threading.Lock()

    def run(self) -> int:
        _die_with_parent()
        if self._config.parent_pid is not None and os.getppid() != self._config.parent_pid:
            return 4
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.ROUTING_ID, self._config.sandbox_id.encode())
        socket.setsockopt(zmq.LINGER, 200)
        socket.connect(self._config.endpoint)
        outbox = self._context.socket(zmq.PULL)
        outbox.bind(_OUTBOX)
        try:
            return self._serve(socket, outbox)
        finally:
            for call in list(self._calls.values()):
                call.cancelled.set()
            socket.close()
            outbox.close()
            self._context.term()

    def _serve(self, socket: zmq.Socket, outbox: zmq.Socket) -> int:
        hello = Hello(protocol_version=PROTOCOL_VERSION, role=Role.SANDBOX, name=self._config.sandbox_id,
                      pid=os.getpid())
        socket.send(self._codec.encode(hello))
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(outbox, zmq.POLLIN)
        accepted = False
        last_heard = time.monotonic()
        next_beat = time.monotonic()
        seq = 0
        while True:
            now = time.monotonic()
            if now - last_heard > self._config.heartbeat_timeout:
                log.error("no word from the supervisor for %.0f s; exiting", now - last_heard)
                return 4
            if accepted and now >= next_beat:
                seq += 1
                socket.send(self._codec.encode(Heartbeat(seq=seq, busy=bool(self._calls))))
                next_beat = now + self._config.heartbeat_interval
            events = dict(poller.poll(timeout=200))
            if outbox in events:
                while outbox.poll(0):
                    socket.send(outbox.recv())
            if socket not in events:
                continue
            frame = socket.recv()
            last_heard = time.monotonic()
            try:
                message = self._codec.decode(frame)
            except ProtocolError as exc:
                log.warning("bad frame from the supervisor: %s", exc.message)
                socket.send(self._codec.encode(RequestFailed(code=exc.code, message=exc.message)))
                continue
            match message:
                case HelloAccepted():
                    accepted = True
                    socket.send(self._codec.encode(SandboxReady(report=self._report)))
                case RequestFailed(code=ErrorCode.PROTOCOL_MISMATCH):
                    log.error("the supervisor refused us: %s", message.message)
                    return 3
                case RequestFailed():
                    log.warning("the supervisor reported: %s", message.message)
                case Heartbeat():
                    pass
                case RunTool():
                    self._start(message)
                case Cancel(request_id=request_id):
                    call = self._calls.get(request_id)
                    if call is not None:
                        call.cancelled.set()
                case Shutdown():
                    return 0

    def _start(self, request: RunTool) -> None:
        call = _Call(request)
        with self._lock:
            if request.request_id in self._calls:
                return
            self._calls[request.request_id] = call
        threading.Thread(target=self._run_call, args=(call,), name=f"call-{request.request_id}", daemon=True).start()

    def _run_call(self, call: _Call) -> None:
        push = self._context.socket(zmq.PUSH)
        push.connect(_OUTBOX)
        request_id = call.request.request_id

        def chunk(stream: ToolStream, text: str) -> None:
            push.send(self._codec.encode(ToolChunk(request_id=request_id, stream=stream, text=text)))

        try:
            envelope = execute(call.request, report=self._report, on_chunk=chunk, cancelled=call.cancelled.is_set)
            push.send(self._codec.encode(ToolFinished(request_id=request_id, envelope=envelope)))
        except Exception as exc:  # a bug must still answer the call
            log.exception("call %s failed", request_id)
            push.send(self._codec.encode(RequestFailed(request_id=request_id, code=ErrorCode.INTERNAL,
                                                       message=f"sandbox error: {exc!r}")))
        finally:
            with self._lock:
                self._calls.pop(request_id, None)
            push.close(linger=1000)


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
