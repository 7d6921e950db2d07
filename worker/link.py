"""The worker's end of the supervisor link, run on its own IO thread.

Owns the DEALER socket after the handshake (zmq sockets are not thread-safe,
so nothing else touches it) and the PULL end of the outbox through which the
engine thread sends. It:

- decodes each inbound frame with the worker codec and dispatches on its type:
  `Generate` goes to the engine thread's queue, `Cancel` sets the cancel flag
  at once (the decode loop polls it between tokens), `Shutdown` asks the
  process to stop; a frame it cannot accept is answered with
  `RequestFailed(request_id="", code=...)` and the link keeps serving;
- forwards the engine thread's encoded messages, in order;
- sends a `Heartbeat` every `heartbeat_interval`, and ends the process when
  the supervisor has been silent for `heartbeat_timeout` or the parent died;
- exits the process itself if the engine thread does not stop within
  `stop_grace` (it may be stuck in a native call).

The engine thread writes through `Outbox`. A `GenerationFinished` travels with
two more frames that tell the link to free that request's slot before it
forwards the message: once the supervisor has seen the end of a request, its
next `Generate` must not be refused as busy. An empty frame means: everything
before it is sent, stop.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable

import msgspec
import zmq

from bastion.protocol import (
    Cancel,
    ErrorCode,
    Heartbeat,
    HelloAccepted,
    ProtocolError,
    RequestFailed,
    Shutdown,
    StopReason,
    worker_codec,
)
from bastion.protocol.common import Message
from bastion.protocol.remote import BackendGauge
from bastion.protocol.worker_wire import CountTokens, Generate, GenerationFinished, SetThreads
from bastion.worker.config import WorkerConfig
from bastion.worker.lifecycle import ExitCode, StopRequest, parent_gone

log = logging.getLogger(__name__)

_END_OF_REQUEST = b"end"

Inbox = queue.SimpleQueue  # of Generate | CountTokens | StopRequest; SimpleQueue.put is safe in signal handlers
class Gauges(msgspec.Struct, frozen=True, kw_only=True):
    """What the engine thread reports through heartbeats: Heartbeat's fields
    of the same names."""

    progress: int = 0
    kv_tokens: int = 0
    snapshots_ram: int = 0
    snapshot_ram_bytes: int = 0
    snapshots_disk: int = 0
    snapshot_disk_bytes: int = 0
    backends: tuple[BackendGauge, ...] = ()


def refusal(request: Generate, code: ErrorCode, message: str, kv_tokens: int, *,
            retryable: bool = False) -> tuple[RequestFailed, GenerationFinished]:
    """What a request that will never run is answered: why, then its one GenerationFinished."""
    rid = request.request_id
    return (RequestFailed(request_id=rid, code=code, message=message, retryable=retryable),
            GenerationFinished(request_id=rid, stop_reason=StopReason.ERROR, completion_tokens=0, kv_tokens=kv_tokens))


class RequestSlots:
    """The requests a worker serves at once: at most `capacity`, one per engine sequence.

    Claimed and released on the IO thread only, so it needs no lock. The
    engine thread only reads the cancel flags; a signal handler may set the
    stop flag, which is why these are plain attributes rather than Events (a
    handler must not take a lock the interrupted thread may hold)."""

    def __init__(self, capacity: int = 1) -> None:
        self.capacity = capacity
        self._cancelled: dict[str, bool] = {}  # request id -> cancel asked
        self._stopping = False
        # Threads the supervisor last asked for (0: none asked); read by the
        # engine thread between decode steps.
        self.threads = 0
        # Told of each cancel as it is set, for a core that does not poll the flags
        # between steps (a remote model's: its streams wait on the network).
        self.on_cancel: Callable[[], None] = lambda: None

    def claim(self, request_id: str) -> bool:
        if len(self._cancelled) >= self.capacity:
            return False
        self._cancelled[request_id] = False
        return True

    def release(self, request_id: str) -> None:
        self._cancelled.pop(request_id, None)

    def holds(self, request_id: str) -> bool:
        return request_id in self._cancelled

    @property
    def running(self) -> list[str]:
        return list(self._cancelled)

    def cancel(self, request_id: str) -> bool:
        if request_id not in self._cancelled:
            return False
        self._cancelled[request_id] = True
        self.on_cancel()
        return True

    def cancel_any(self) -> None:
        """Every request, running or to come, is cancelled: the process is stopping."""
        self._stopping = True

    def cancel_check(self, request_id: str) -> Callable[[], bool]:
        """What the engine thread polls for request `request_id`."""
        flags = self._cancelled
        return lambda: self._stopping or flags.get(request_id, False)


class Outbox:
    """The engine thread's way out: encodes and hands frames to the link."""

    def __init__(self, socket: zmq.Socket) -> None:
        self._socket = socket
        self._codec = worker_codec()  # its own: encoders are not shared across threads

    def send(self, message: Message) -> None:
        frame = self._codec.encode(message)
        if isinstance(message, GenerationFinished):
            self._socket.send_multipart([frame, _END_OF_REQUEST, message.request_id.encode()])
        else:
            self._socket.send(frame)

    def finish(self) -> None:
        """Tell the link that nothing more will come; it sends what came before."""
        self._socket.send(b"")

    def close(self) -> None:
        """Only after the link has stopped: closing drops what it did not read."""
        self._socket.close(linger=0)


class SupervisorLink:
    def __init__(
        self,
        config: WorkerConfig,
        dealer: zmq.Socket,
        outbox: zmq.Socket,
        inbox: Inbox,
        slots: RequestSlots,
        gauges: Callable[[], Gauges],
    ) -> None:
        self._config = config
        self._dealer = dealer
        self._outbox = outbox
        self._inbox = inbox
        self._slots = slots
        self._gauges = gauges
        self._codec = worker_codec()
        self._seq = 0
        self._last_heard = time.monotonic()
        self._stop_deadline: float | None = None
        self._stop_code = ExitCode.OK
        self._thread = threading.Thread(target=self._main, name="supervisor-link", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def request_stop(self, code: ExitCode, reason: str) -> None:
        """Ask the engine thread to end the process (from this thread only)."""
        if self._stop_deadline is not None:
            return
        log.info("stopping: %s", reason)
        self._stop_deadline = time.monotonic() + self._config.stop_grace
        self._stop_code = code
        self._slots.cancel_any()
        self._inbox.put(StopRequest(code, reason))

    def _main(self) -> None:
        try:
            self._loop()
        except Exception:
            log.exception("supervisor link failed")
            os._exit(ExitCode.INTERNAL)
        finally:
            self._dealer.close()  # keeps its LINGER: last messages still go out
            self._outbox.close(linger=0)

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._dealer, zmq.POLLIN)
        poller.register(self._outbox, zmq.POLLIN)
        next_beat = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= next_beat:
                self._beat(now)
                next_beat = now + self._config.heartbeat_interval
            wake = min(next_beat, self._stop_deadline or next_beat)
            events = dict(poller.poll(int(max(0.0, wake - time.monotonic()) * 1000)))
            if self._outbox in events and not self._forward():
                return
            if self._dealer in events:
                self._receive()
            if self._stop_deadline is not None and time.monotonic() > self._stop_deadline:
                log.error("engine thread did not stop within %.1f s; exiting", self._config.stop_grace)
                os._exit(self._stop_code)

    def _forward(self) -> bool:
        """Send what the engine thread queued; False on the stop marker."""
        while True:
            try:
                frames = self._outbox.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return True
            if not frames[0]:
                return False
            if frames[1:2] == [_END_OF_REQUEST]:
                self._slots.release(frames[2].decode())
            self._dealer.send(frames[0])

    def _receive(self) -> None:
        while True:
            try:
                frames = self._dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._last_heard = time.monotonic()
            if len(frames) > 1:
                log.warning("ignoring %d extra frame(s)", len(frames) - 1)
            self._dispatch(frames[0])

    def _dispatch(self, frame: bytes) -> None:
        try:
            message = self._codec.decode(frame)
        except ProtocolError as err:
            log.warning("refused a frame: %s: %s", err.code.value, err.message)
            self._send(RequestFailed(code=err.code, message=err.message))
            return
        match message:
            case Generate():
                self._accept(message)
            case Cancel(request_id=request_id):
                if not self._slots.cancel(request_id):
                    log.info("cancel of %s, which is not running", request_id)
            case Heartbeat():
                pass
            case CountTokens():
                self._inbox.put(message)  # no slot: it generates nothing
            case SetThreads(threads=threads) if threads > 0:
                self._slots.threads = threads
            case SetThreads(threads=threads):
                log.warning("ignoring a request for %d threads", threads)
            case Shutdown():
                self.request_stop(ExitCode.OK, "shutdown requested by the supervisor")
            case RequestFailed(code=code, message=text):
                log.warning("supervisor reported %s: %s", code.value, text)
            case HelloAccepted():
                log.warning("ignoring a second HelloAccepted")

    def _accept(self, request: Generate) -> None:
        if self._stop_deadline is not None:
            self._refuse(request, ErrorCode.SHUTTING_DOWN, "the worker is shutting down", retryable=True)
        elif self._slots.holds(request.request_id):
            # No GenerationFinished here: the running request will send its own.
            self._send(
                RequestFailed(
                    request_id=request.request_id,
                    code=ErrorCode.DUPLICATE_REQUEST,
                    message="a request with this id is already running",
                )
            )
        elif not self._slots.claim(request.request_id):
            running = ", ".join(self._slots.running)
            self._refuse(request, ErrorCode.BUSY, f"busy with {running}", retryable=True)
        else:
            self._inbox.put(request)

    def _refuse(self, request: Generate, code: ErrorCode, message: str, *, retryable: bool) -> None:
        # The supervisor queues per worker and should never get here; answer
        # anyway so that every Generate still ends with one GenerationFinished.
        log.warning("refused %s: %s", request.request_id, message)
        for answer in refusal(request, code, message, self._gauges().kv_tokens, retryable=retryable):
            self._send(answer)

    def _beat(self, now: float) -> None:
        if self._stop_deadline is None:
            silent = now - self._last_heard
            if silent > self._config.heartbeat_timeout:
                self.request_stop(ExitCode.SUPERVISOR_LOST, f"no word from the supervisor for {silent:.1f} s")
            elif parent_gone(self._config.parent_pid):
                self.request_stop(ExitCode.SUPERVISOR_LOST, "the parent process died")
        gauges = self._gauges()
        self._seq += 1
        busy = bool(self._slots.running)
        self._send(Heartbeat(seq=self._seq, busy=busy, **msgspec.structs.asdict(gauges)))

    def _send(self, message: Message) -> None:
        self._dealer.send(self._codec.encode(message))
