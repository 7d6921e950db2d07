"""The gateway's connection to the supervisor: one control socket shared by every HTTP request.

`SupervisorLink` is a ZeroMQ DEALER on the supervisor's control socket, as the
CLI's is, but asynchronous and multiplexed: each request gets an id of its own
and a queue its events are routed to, so hundreds of HTTP clients share one
socket. It says hello on first use and again whenever the supervisor it greeted
is gone (a restart makes a new supervisor that knows nothing of this client).
While no supervisor answers, requests fail at once with
`supervisor_unavailable`, and requests in flight when it died end with that
error, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import AsyncIterator

import zmq
import zmq.asyncio

from bastion.protocol import (
    PROTOCOL_VERSION,
    ErrorCode,
    Hello,
    HelloAccepted,
    HomeLayout,
    ProtocolError,
    RequestFailed,
    Role,
    StopReason,
    client_codec,
)
from bastion.protocol.common import Cancel
from bastion.protocol.control import ControlEvent, ControlRequest, LoadProgress, RunFinished
from bastion.protocol.home import same_supervisor_running, supervisor_running

log = logging.getLogger(__name__)

_HELLO_TIMEOUT_S = 3.0
_WATCH_INTERVAL_S = 1.0


class LinkError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class SupervisorLink:
    def __init__(self, layout: HomeLayout, *, name: str = "bastion-gateway") -> None:
        self._layout = layout
        self._name = name
        self._context = zmq.asyncio.Context()
        self._codec = client_codec()
        self._socket: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._hello: asyncio.Future[HelloAccepted] | None = None
        self._connecting = asyncio.Lock()
        self._queues: dict[str, asyncio.Queue[ControlEvent]] = {}
        self._ids = itertools.count(1)
        self.supervisor_pid = 0

    # --- lifecycle ------------------------------------------------------------

    async def close(self) -> None:
        """Cancel what is still in flight (its HTTP clients are gone with the gateway), then close."""
        for request_id in list(self._queues):
            await self.cancel(request_id)
        for task in (self._reader, self._watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._drop_socket()
        self._context.term()

    @property
    def connected(self) -> bool:
        return self._socket is not None and self.supervisor_pid != 0

    async def ensure_connected(self) -> None:
        """Say hello unless the supervisor greeted is still the one running; LinkError when none answers."""
        if self.connected and same_supervisor_running(self._layout, self.supervisor_pid):
            return
        async with self._connecting:
            if self.connected and same_supervisor_running(self._layout, self.supervisor_pid):
                return
            self._lost("the supervisor restarted")
            if not supervisor_running(self._layout):
                raise LinkError(ErrorCode.SUPERVISOR_UNAVAILABLE,
                                f"no bastion supervisor is running for {self._layout.root}; start one with `bastion up`")
            socket = self._context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(self._layout.control_endpoint)
            self._socket = socket
            self._hello = asyncio.get_running_loop().create_future()
            self._reader = asyncio.create_task(self._read(socket), name="supervisor-link-reader")
            await socket.send(self._codec.encode(
                Hello(protocol_version=PROTOCOL_VERSION, role=Role.CLIENT, name=self._name, pid=os.getpid())
            ))
            try:
                accepted = await asyncio.wait_for(asyncio.shield(self._hello), _HELLO_TIMEOUT_S)
            except TimeoutError:
                self._drop_socket()
                raise LinkError(ErrorCode.SUPERVISOR_UNAVAILABLE,
                                f"the supervisor did not answer within {_HELLO_TIMEOUT_S:.0f} s") from None
            self.supervisor_pid = accepted.supervisor_pid
            if self._watcher is None or self._watcher.done():
                self._watcher = asyncio.create_task(self._watch(), name="supervisor-link-watcher")

    # --- requests ---------------------------------------------------------------

    def new_id(self, prefix: str = "gw") -> str:
        return f"{prefix}{os.getpid()}-{next(self._ids)}"

    @contextlib.asynccontextmanager
    async def stream(self, request: ControlRequest) -> AsyncIterator[asyncio.Queue[ControlEvent]]:
        """Send a streaming request (run, complete, load); its events arrive on the yielded queue.
        Leaving the block before the request finished cancels it in the supervisor."""
        request_id = request.request_id  # type: ignore[union-attr]
        queue: asyncio.Queue[ControlEvent] = asyncio.Queue()
        await self.ensure_connected()
        self._queues[request_id] = queue
        finished = False
        try:
            await self._send(request)
            yield queue
            finished = True
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                await self.cancel(request_id)

    async def events(self, queue: asyncio.Queue[ControlEvent], *, idle_s: float) -> AsyncIterator[ControlEvent | None]:
        """The events of a stream until its end; None after `idle_s` without one (a chance to ping)."""
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), idle_s)
            except TimeoutError:
                yield None
                continue
            yield event
            if isinstance(event, RunFinished):
                return

    async def ask(self, request: ControlRequest, timeout_s: float = 30.0) -> ControlEvent:
        """A request with exactly one answer (skipping progress events)."""
        async with self.stream(request) as queue:
            async with asyncio.timeout(timeout_s):
                while True:
                    event = await queue.get()
                    if not isinstance(event, LoadProgress):
                        return event

    async def cancel(self, request_id: str) -> None:
        if self._socket is None:
            return
        with contextlib.suppress(zmq.ZMQError):
            await self._send(Cancel(request_id=request_id))

    async def _send(self, request: ControlRequest) -> None:
        if self._socket is None:
            raise LinkError(ErrorCode.SUPERVISOR_UNAVAILABLE, "not connected to the supervisor")
        await self._socket.send(self._codec.encode(request))

    # --- reading and watching ---------------------------------------------------

    async def _read(self, socket: zmq.asyncio.Socket) -> None:
        while True:
            frame = await socket.recv()
            try:
                event = self._codec.decode(frame)
            except ProtocolError as exc:
                log.warning("the supervisor sent a frame this gateway cannot read: %s", exc.message)
                continue
            if isinstance(event, HelloAccepted):
                if self._hello is not None and not self._hello.done():
                    self._hello.set_result(event)
                continue
            request_id = getattr(event, "request_id", "")
            if not request_id and isinstance(event, RequestFailed):
                if self._hello is not None and not self._hello.done():
                    self._hello.set_exception(LinkError(event.code, event.message))
                elif event.code is ErrorCode.HELLO_REQUIRED:
                    self._lost("the supervisor forgot this gateway")
                continue
            queue = self._queues.get(request_id)
            if queue is not None:
                queue.put_nowait(event)

    async def _watch(self) -> None:
        """Requests in flight end with an error as soon as their supervisor is gone."""
        while True:
            await asyncio.sleep(_WATCH_INTERVAL_S)
            if self.connected and not same_supervisor_running(self._layout, self.supervisor_pid):
                self._lost("the supervisor exited")

    def _lost(self, why: str) -> None:
        if self._socket is None:
            return
        log.info("supervisor link lost: %s", why)
        for request_id, queue in list(self._queues.items()):
            queue.put_nowait(RequestFailed(request_id=request_id, code=ErrorCode.SUPERVISOR_UNAVAILABLE,
                                           message=f"{why} while answering; see {self._layout.supervisor_log}",
                                           retryable=True))
            queue.put_nowait(RunFinished(request_id=request_id, stop_reason=StopReason.ERROR))
        self._drop_socket()

    def _drop_socket(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        self.supervisor_pid = 0

