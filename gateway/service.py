"""What every route of the gateway shares: settings, the supervisor link, bodies, responses.

`Gateway` holds the settings, the `SupervisorLink` and the metrics, and asks
the supervisor one-answer questions (`ask`, `models`). `json_body` reads a
request body within its limits. `respond` answers with one exchange, streamed
(SSE or NDJSON, from the first event on) or collected into one object, and
cancels the generation when the client goes away in either case.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from bastion.gateway.errors import ApiError, from_failure
from bastion.gateway.exchange import Exchange
from bastion.gateway.link import LinkError, SupervisorLink
from bastion.gateway.metrics import Metrics
from bastion.protocol import HomeLayout, RequestFailed
from bastion.protocol.control import CatalogEntry, ListModels, ModelList, ModelStatus

_CATALOG_TTL_S = 2.0


@dataclass(frozen=True)
class GatewaySettings:
    home: HomeLayout
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 8 * 1024 * 1024
    max_messages: int = 1024
    ping_s: float = 15.0
    # Bound to loopback: requests must name a loopback host (no DNS rebinding), and models may be
    # given as GGUF paths or scripted:FILE. Off loopback, registry names only.
    loopback_only: bool = True
    # bastion's agent runs, sessions and approvals over HTTP (off: a plain model server).
    agent_runs: bool = False


@dataclass
class Gateway:
    """What every route shares: the settings, the supervisor link, the metrics."""

    settings: GatewaySettings
    link: SupervisorLink
    metrics: Metrics = field(default_factory=Metrics)
    _catalog: tuple[float, list[CatalogEntry], list[ModelStatus]] | None = None

    async def ask(self, request: Any, timeout_s: float = 30.0) -> Any:
        try:
            answer = await self.link.ask(request, timeout_s)
        except LinkError as exc:
            raise ApiError(503, exc.message, code=exc.code.value, retry_after_s=2, retryable=True) from exc
        except TimeoutError as exc:
            raise ApiError(504, f"the supervisor did not answer within {timeout_s:.0f} s", retryable=True,
                           retry_after_s=5) from exc
        if isinstance(answer, RequestFailed):
            raise from_failure(answer)
        return answer

    async def models(self) -> tuple[list[CatalogEntry], list[ModelStatus]]:
        """The registry's models and the loaded ones (cached for a moment: clients poll)."""
        now = time.monotonic()
        if self._catalog is not None and now - self._catalog[0] < _CATALOG_TTL_S:
            return self._catalog[1], self._catalog[2]
        listing = await self.ask(ListModels(request_id=self.link.new_id("models"), catalog=True))
        assert isinstance(listing, ModelList)
        self._catalog = (now, listing.catalog, listing.models)
        return listing.catalog, listing.models

    async def loaded(self) -> list[ModelStatus]:
        """The loaded models, as they are now."""
        listing = await self.ask(ListModels(request_id=self.link.new_id("loaded")))
        assert isinstance(listing, ModelList)
        return listing.models

    async def agent_model(self, model: str | None) -> tuple[str | None, tuple[str, ...] | None]:
        """`MODEL+TOOL,TOOL` is a server-side agent run with those tools, unless a model has that name."""
        if model is None or "+" not in model:
            return model, None
        catalog, _ = await self.models()
        if any(entry.name == model for entry in catalog):
            return model, None
        name, _, tools = model.rpartition("+")
        return name, tuple(tool for tool in tools.split(",") if tool)

    def exchange(self, request: Any) -> Exchange:
        return Exchange(self.link, request, self.metrics, ping_s=self.settings.ping_s)


async def json_body(request: Request, settings: GatewaySettings) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
        raise ApiError(413, f"the body is larger than {settings.max_body_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > settings.max_body_bytes:
            raise ApiError(413, f"the body is larger than {settings.max_body_bytes} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks) or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ApiError(400, "the body nests too deeply") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    messages = body.get("messages")
    if isinstance(messages, list) and len(messages) > settings.max_messages:
        raise ApiError(400, f"{len(messages)} messages; at most {settings.max_messages} in one request",
                       param="messages")
    return body


async def until_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """`work`'s result; if the client goes away first, `work` is cancelled (and with it the generation)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return Response(status_code=499)
    return task.result()


async def respond(
    request: Request,
    exchange: Exchange,
    *,
    stream: bool,
    lines: Callable[[], AsyncIterator[str]],
    collect: Callable[[], Awaitable[dict[str, Any]]],
    media_type: str,
) -> Response:
    """The answer to one exchange. Streamed: once the generation was accepted (an early failure is
    an HTTP error), the lines as they come. Otherwise: one JSON object at the end. A client that
    leaves at any point cancels the request."""
    if not stream:

        async def answer() -> Response:
            async with exchange:
                await exchange.opening()
                return JSONResponse(await collect())

        return await until_disconnected(request, answer())
    held = contextlib.AsyncExitStack()
    await held.enter_async_context(exchange)
    try:
        opened = await until_disconnected(request, exchange.opening())
    except BaseException:
        await held.aclose()
        raise
    if isinstance(opened, Response):  # the client left while the model loaded or the request queued
        await held.aclose()
        return opened

    async def body() -> AsyncIterator[str]:
        async with held:  # closing it (normally, on an error, or when the client leaves) ends the request
            async for line in lines():
                yield line

    return StreamingResponse(body(), media_type=media_type,
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
