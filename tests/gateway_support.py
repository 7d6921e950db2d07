"""The HTTP gateway in-process: its real Starlette app over an in-process supervisor.

`InProcessLink` is the gateway's `SupervisorLink` with the socket replaced by
an `InProcessSupervisor` (tests/inprocess.py): requests go to the supervisor's
core, its events come back to the link's per-request queues, so everything
above the socket (routes, bodies, streaming, errors) is the real code.
`gateway_client` gives an `httpx.AsyncClient` that calls the app directly
(`httpx.ASGITransport`): the real `openai` and `ollama` clients accept it as
their HTTP client. End-to-end tests (test_gateway_e2e.py) run the real
processes and sockets.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx

from bastion.gateway.app import build_app
from bastion.gateway.link import SupervisorLink
from bastion.gateway.service import GatewaySettings
from bastion.protocol import PROTOCOL_VERSION, Cancel, Hello, Role
from bastion.protocol.control import ControlEvent, ControlRequest
from tests.inprocess import InProcessSupervisor

BASE_URL = "http://127.0.0.1:11435"  # a loopback Host: the gateway refuses others (DNS rebinding)


class InProcessLink(SupervisorLink):
    def __init__(self, supervisor: InProcessSupervisor, client: bytes = b"gateway") -> None:
        super().__init__(supervisor.layout)
        self._supervisor = supervisor
        self._client = client
        supervisor.listeners.append(self._deliver)
        supervisor.send(Hello(protocol_version=PROTOCOL_VERSION, role=Role.CLIENT, name="gateway-test"), client)
        self.supervisor_pid = 1

    @property
    def connected(self) -> bool:
        return True

    async def ensure_connected(self) -> None:
        return None

    async def cancel(self, request_id: str) -> None:
        self._supervisor.send(Cancel(request_id=request_id), self._client)

    async def _send(self, request: ControlRequest) -> None:
        self._supervisor.send(request, self._client)

    def _deliver(self, client: bytes, event: ControlEvent) -> None:
        if client == self._client and (queue := self._queues.get(getattr(event, "request_id", ""))) is not None:
            queue.put_nowait(event)


@contextlib.asynccontextmanager
async def gateway_transport(supervisor: InProcessSupervisor, **settings: object) -> AsyncIterator[httpx.ASGITransport]:
    """A transport that calls the gateway app directly, over an in-process supervisor."""
    link = InProcessLink(supervisor)
    app = build_app(GatewaySettings(home=supervisor.layout, **settings), link)  # type: ignore[arg-type]
    try:
        yield httpx.ASGITransport(app=app)
    finally:
        await link.close()


@contextlib.asynccontextmanager
async def gateway_client(supervisor: InProcessSupervisor, **settings: object) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the gateway app, over an in-process supervisor."""
    async with (gateway_transport(supervisor, **settings) as transport,
                httpx.AsyncClient(transport=transport, base_url=BASE_URL, timeout=30) as client):
        yield client
