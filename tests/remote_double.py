"""A scriptable HTTP server that stands in for a remote engine (llama.cpp's
server, an OpenAI-compatible one, Ollama) in RemoteCore's tests.

It runs `asyncio.start_server` on a loop of its own thread, bound to
127.0.0.1 on an ephemeral port, so a test in the fast tier can use it (no
process is started). Each request is handed, parsed, to the test's handler
with a `Reply` that writes the response at byte level: a head, then chunks
(chunked transfer encoding, as llama-server sends them) or raw bytes, a
stall, a cut connection. The double owns nothing of RemoteCore's; the test
owns the script.

What a test can observe: every request received (method, path, headers,
body), in order; and, per request, whether the client closed its side of the
connection while the reply was still open (`Received.closed`). A handler
that fails other than by the client going away is recorded in `errors`,
which the test's fixture checks, so a broken script cannot pass silently.
Every wait inside has a deadline: nothing here can hang a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

HOLD_MAX_S = 10.0  # the longest a stalled reply waits for the client to go away


@dataclass
class Received:
    """One request as the double read it."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    closed: threading.Event = field(default_factory=threading.Event)  # the client hung up mid-reply

    def json(self) -> Any:
        return json.loads(self.body)


class Reply:
    """The response to one request, written as the handler says."""

    def __init__(self, writer: asyncio.StreamWriter, received: Received) -> None:
        self._writer = writer
        self._received = received
        self._hung_up = asyncio.Event()
        self._chunked = False
        self._cut = False

    def client_hung_up(self) -> None:
        """The client closed its side (an EOF, a reset, a write that failed) unless this side cut first."""
        if not self._cut:
            self._received.closed.set()
        self._hung_up.set()

    async def head(
        self,
        status: int = 200,
        reason: str = "OK",
        *,
        content_type: str = "text/event-stream",
        headers: dict[str, str] | None = None,
        chunked: bool = True,
    ) -> None:
        """The status line and headers; `chunked` frames what `send` writes as HTTP chunks."""
        self._chunked = chunked
        lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}", "Connection: close"]
        if chunked:
            lines.append("Transfer-Encoding: chunked")
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        await self.raw(("\r\n".join(lines) + "\r\n\r\n").encode())

    async def send(self, data: bytes | str) -> None:
        """Body bytes: one chunk when the head said chunked."""
        data = data.encode() if isinstance(data, str) else data
        await self.raw(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)

    async def event(self, payload: Any) -> None:
        """One server-sent event carrying `payload` as JSON."""
        await self.send(f"data: {json.dumps(payload)}\n\n")

    async def line(self, payload: Any) -> None:
        """One NDJSON line."""
        await self.send(json.dumps(payload) + "\n")

    async def end(self) -> None:
        """The end of a chunked body: the reply is complete."""
        await self.raw(b"0\r\n\r\n")

    async def raw(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def answer(
        self,
        status: int,
        body: bytes | str | Any,
        *,
        reason: str = "",
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        """A whole response with a Content-Length: `body` as is when bytes or str, else as JSON."""
        if not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        data = body.encode() if isinstance(body, str) else body
        await self.head(status, reason or HTTPStatus(status).phrase, content_type=content_type, chunked=False,
                        headers={"Content-Length": str(len(data)), **(headers or {})})  # fmt: skip
        await self.raw(data)

    async def hold(self) -> None:
        """Send nothing more until the client hangs up (at most HOLD_MAX_S)."""
        await asyncio.wait_for(self._hung_up.wait(), HOLD_MAX_S)

    def cut(self, *, reset: bool = False) -> None:
        """Close the connection here, mid-reply; `reset` sends a TCP RST instead of a FIN."""
        self._cut = True
        if reset:
            sock = self._writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._writer.transport.abort()


Handler = Callable[[Received, Reply], Awaitable[None]]


class HttpDouble:
    """An HTTP/1.1 server on 127.0.0.1 whose every reply is `handler`'s; one connection per request."""

    def __init__(self, handler: Handler) -> None:
        self.received: list[Received] = []
        self.connections = 0
        self.errors: list[str] = []
        self._handler = handler
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="http-double", daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._connection, "127.0.0.1", 0), self._loop).result(timeout=5)  # fmt: skip
        self.port: int = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        async def shut() -> None:
            self._server.close()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        watch: asyncio.Task[None] | None = None
        reply: Reply | None = None
        try:
            received = await _read_request(reader)
            if received is None:
                return
            self.received.append(received)
            reply = Reply(writer, received)
            watch = asyncio.ensure_future(_watch_hangup(reader, reply))
            await self._handler(received, reply)
        except ConnectionError:
            if reply is not None:  # a write failed: the client went away
                reply.client_hung_up()
        except asyncio.CancelledError:
            pass  # the test is over
        except Exception as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            if watch is not None:
                watch.cancel()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._tasks.discard(task)


async def _read_request(reader: asyncio.StreamReader) -> Received | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None  # connected and went away without asking
    start, *lines = head.decode("latin-1").split("\r\n")
    method, path, _version = start.split(" ", 2)
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Received(method, path, headers, body)


async def _watch_hangup(reader: asyncio.StreamReader, reply: Reply) -> None:
    """Tells `reply` when the client closes its side (EOF or a reset) while the reply is open."""
    with contextlib.suppress(ConnectionError):
        while await reader.read(4096):
            pass
    reply.client_hung_up()
