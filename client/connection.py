"""The client's connection to the supervisor's control socket.

A DEALER connected to `control.sock`; `open()` performs the hello handshake.
Receiving never waits blindly: every wait has a timeout, and when events stop
for a while the connection checks whether the supervisor is still alive (its
lock in the runtime directory) so a dead supervisor is an error, not a hang.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import zmq

from bastion.protocol import (
    PROTOCOL_VERSION,
    ErrorCode,
    Hello,
    HelloAccepted,
    HomeLayout,
    ProtocolError,
    RequestFailed,
    Role,
    client_codec,
)
from bastion.protocol.control import ControlEvent, ControlRequest
from bastion.protocol.home import same_supervisor_running

_LIVENESS_CHECK_S = 2.0


class ClientError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ControlConnection:
    def __init__(self, layout: HomeLayout) -> None:
        self._layout = layout
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 500)
        self._codec = client_codec()
        self._socket.connect(layout.control_endpoint)
        self.supervisor_pid = 0

    def close(self) -> None:
        self._socket.close()
        self._context.term()

    def __enter__(self) -> ControlConnection:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def open(self, timeout_s: float = 5.0) -> HelloAccepted:
        self.send(Hello(protocol_version=PROTOCOL_VERSION, role=Role.CLIENT, name="bastion-cli", pid=os.getpid()))
        event = self.receive(timeout_s)
        match event:
            case HelloAccepted():
                self.supervisor_pid = event.supervisor_pid
                return event
            case RequestFailed(code=code, message=message):
                raise ClientError(code, message)
            case None:
                raise ClientError(
                    ErrorCode.SUPERVISOR_UNAVAILABLE,
                    f"the supervisor at {self._layout.control_endpoint} did not answer within {timeout_s:.0f} s",
                )
            case _:
                raise ClientError(ErrorCode.PROTOCOL_MISMATCH, f"unexpected answer to hello: {type(event).__name__}")

    def send(self, request: ControlRequest) -> None:
        self._socket.send(self._codec.encode(request))

    def receive(self, timeout_s: float | None) -> ControlEvent | None:
        timeout_ms = None if timeout_s is None else int(timeout_s * 1000)
        if not self._socket.poll(timeout_ms):
            return None
        frame = self._socket.recv()
        try:
            return self._codec.decode(frame)
        except ProtocolError as exc:
            raise ClientError(exc.code, f"the supervisor sent a message this client cannot read: {exc.message}") from exc

    def events(self, request_id: str) -> Iterator[ControlEvent]:
        """Events answering `request_id`, until the caller stops iterating.

        Raises ClientError if the supervisor goes away while we wait."""
        while True:
            event = self.receive(_LIVENESS_CHECK_S)
            if event is None:
                if not same_supervisor_running(self._layout, self.supervisor_pid):
                    raise ClientError(
                        ErrorCode.SUPERVISOR_UNAVAILABLE,
                        f"the supervisor exited while answering; see {self._layout.supervisor_log}",
                    )
                continue
            event_request = getattr(event, "request_id", "")
            if isinstance(event, HelloAccepted) or event_request not in (request_id, ""):
                continue  # a late answer to a retried hello, or another request's event
            yield event

    def request(self, request: ControlRequest, timeout_s: float = 60.0) -> ControlEvent:
        """Send a request that has exactly one answer and return that answer."""
        self.send(request)
        request_id = getattr(request, "request_id", "")
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            event = self.receive(min(remaining, _LIVENESS_CHECK_S))
            if event is None:
                if not same_supervisor_running(self._layout, self.supervisor_pid):
                    raise ClientError(ErrorCode.SUPERVISOR_UNAVAILABLE, "the supervisor exited before answering")
                continue
            if isinstance(event, HelloAccepted):
                continue
            if getattr(event, "request_id", "") in (request_id, ""):
                return event
        raise ClientError(ErrorCode.SUPERVISOR_UNAVAILABLE, f"no answer from the supervisor within {timeout_s:.0f} s")
