"""One streamed HTTP/1.1 request on a connection of its own, with h11 over asyncio streams.

Why not httpx here (it serves the short requests: describe, health): a remote engine streams one
event per token, and every event httpx hands over is a wakeup of this process with a few layers
of Python under it (measured here: 0.9 ms of CPU per event with httpx's async client, 0.4 with
its sync one), taken from cores the engine may itself be decoding on. Here the caller learns
when what has arrived is used up (`None` from `body()`) and can `rest` before reading on: the
server's next tokens gather in the socket meanwhile and come in one read.

Errors, each with a reason in one line:
    Unreachable   no connection: refused, no route, the name does not resolve, TLS failed,
                  or nothing within the connect timeout
    Idle          connected, but the server sent nothing for the idle timeout
    Cut           the connection closed before the response was complete
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import h11

READ_BYTES = 64 * 1024


class StreamError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unreachable(StreamError):
    pass


class Idle(StreamError):
    pass


class Cut(StreamError):
    pass


class StreamResponse:
    def __init__(self, reader: asyncio.StreamReader, transport: asyncio.BaseTransport, connection: h11.Connection,
                 response: h11.Response, idle_timeout_s: float) -> None:  # fmt: skip
        self._reader = reader
        self._transport = transport
        self._connection = connection
        self._idle = idle_timeout_s
        self.status_code = response.status_code
        self.reason_phrase = response.reason.decode("latin-1", errors="replace")
        self.headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in response.headers}

    async def body(self) -> AsyncIterator[bytes | None]:
        """The body's bytes as they come; None each time what has arrived is used up (the next
        bytes need another read of the socket)."""
        while True:
            try:
                event = self._connection.next_event()
            except h11.RemoteProtocolError as exc:  # a body cut short, or not HTTP
                raise Cut(f"the server broke HTTP: {exc}") from None
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            elif event is h11.NEED_DATA:
                yield None
                await _receive(self._reader, self._connection, self._idle)
            elif isinstance(event, h11.ConnectionClosed):
                raise Cut("the server closed the connection")

    async def rest(self, seconds: float) -> None:
        """Read nothing from the socket for `seconds`: what the server sends meanwhile waits in the
        kernel and comes in one read. (asyncio's transport would otherwise read each packet as it
        arrives, a wakeup each, whether or not anyone asked for the bytes.)"""
        transport = self._transport
        pausable = isinstance(transport, asyncio.ReadTransport) and transport.is_reading()
        if pausable:
            assert isinstance(transport, asyncio.ReadTransport)
            transport.pause_reading()
        try:
            await asyncio.sleep(seconds)
        finally:
            if pausable and isinstance(transport, asyncio.ReadTransport) and not transport.is_closing():
                transport.resume_reading()

    async def read_some(self, limit: int) -> bytes:
        """Up to about `limit` bytes of the body (an error page), less if it ends first."""
        data = b""
        async for chunk in self.body():
            if chunk:
                data += chunk
            if len(data) >= limit:
                break
        return data


@contextlib.asynccontextmanager
async def post_stream(url: str, path: str, body: bytes, headers: dict[str, str], *, connect_timeout_s: float,
                      idle_timeout_s: float) -> AsyncIterator[StreamResponse]:  # fmt: skip
    """POST `body` to `url` + `path` and give the response once its head has come; the connection
    is closed on the way out, whatever happened (a cancel included: the server sees the client go)."""
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    target = (parts.path.rstrip("/") + path) or "/"
    try:
        async with asyncio.timeout(connect_timeout_s):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=ssl.create_default_context() if secure else None)  # fmt: skip
    except TimeoutError:
        raise Unreachable(f"no connection within {connect_timeout_s:g} s") from None
    except ssl.SSLError as exc:
        raise Unreachable(f"TLS failed: {exc.reason or exc}") from None
    except socket.gaierror as exc:
        raise Unreachable(f"cannot resolve {host}: {exc.strerror}") from None
    except OSError as exc:
        raise Unreachable(exc.strerror or str(exc)) from None
    try:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = h11.Connection(h11.CLIENT)
        bracketed = f"[{host}]" if ":" in host else host  # an IPv6 literal
        host_header = bracketed if parts.port is None else f"{bracketed}:{port}"
        request = h11.Request(method="POST", target=target, headers=[
            ("Host", host_header), ("Content-Type", "application/json"), ("Accept", "text/event-stream"),
            ("Content-Length", str(len(body))), ("Connection", "close"), *headers.items()])  # fmt: skip
        writer.write(connection.send(request) + connection.send(h11.Data(data=body)) +
                     connection.send(h11.EndOfMessage()))  # fmt: skip
        try:
            await writer.drain()
        except OSError as exc:
            raise Cut(f"sending the request failed: {exc.strerror or exc}") from None
        while True:
            event = connection.next_event()
            if isinstance(event, h11.Response):
                break
            if event is h11.NEED_DATA:
                await _receive(reader, connection, idle_timeout_s)
            elif isinstance(event, h11.ConnectionClosed):
                raise Cut("the server closed the connection before answering")
            # an informational (1xx) response: read on
        yield StreamResponse(reader, writer.transport, connection, event, idle_timeout_s)
    except h11.RemoteProtocolError as exc:
        raise Cut(f"the server broke HTTP: {exc}") from None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)


async def _receive(reader: asyncio.StreamReader, connection: h11.Connection, idle_timeout_s: float) -> None:
    try:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that lands as the read ends.
        async with asyncio.timeout(idle_timeout_s):
            data = await reader.read(READ_BYTES)
    except TimeoutError:
        raise Idle(f"nothing for {idle_timeout_s:g} s") from None
    except OSError as exc:
        raise Cut(exc.strerror or str(exc)) from None
    try:
        connection.receive_data(data)  # b"" is the end of the stream: h11 then says whether that was early
    except h11.RemoteProtocolError as exc:
        raise Cut(f"the server broke HTTP: {exc}") from None
