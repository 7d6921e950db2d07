"""The gateway's HTTP application: routes, limits, authentication, errors.

`build_app(settings)` is a Starlette application over one `SupervisorLink`:

    GET  /health                      200 while the supervisor answers, else 503
    GET  /metrics                     Prometheus text (metrics.py)
    GET  /v1/models[/{model}]         every model the registry can load
    POST /v1/chat/completions         openai_api.py
    POST /v1/completions              openai_api.py (a raw prompt)
    GET  /v1/bastion/approvals        calls waiting for a decision
    POST /v1/bastion/approvals/{id}   {"approve": true|false, "ttl_s", "uses"} (as `bastion approve`: one use)
    /api/chat, /api/generate, /api/tags, /api/ps, /api/show, /api/version   ollama_api.py

Safe by default: it serves loopback unless told otherwise, and `__main__`
refuses any other address without an API key. With a key, every route but
`/health` wants `Authorization: Bearer KEY` (compared in constant time). CORS
is off unless origins are listed. A body larger than `max_body_bytes` is 413;
more than `max_messages` messages is 400; a body that is not JSON, or not the
shape a route takes, is 400 naming the field. Errors keep the shape of the API
the route belongs to (OpenAI's error object, or Ollama's `{"error": ...}`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from bastion.gateway import ollama_api, openai_api
from bastion.gateway.errors import ApiError
from bastion.gateway.link import LinkError, SupervisorLink
from bastion.gateway.service import Gateway, GatewaySettings, json_body, respond
from bastion.protocol.control import CatalogEntry, GetStatus, StatusReport
from bastion.protocol.trust import ApprovalList, ApprovalResolved, ListApprovals, ResolveApproval

log = logging.getLogger(__name__)



# --- OpenAI routes -----------------------------------------------------------------------


async def chat_completions(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    body = openai_api.parse_body(openai_api.ChatRequest, await json_body(request, gateway.settings))
    model, agent_tools = await gateway.agent_model(body.model)
    session = request.headers.get("x-bastion-session")
    if session is not None:
        body.bastion = (body.bastion or openai_api.BastionRun()).model_copy(update={"session": session})
    if body.bastion is not None and agent_tools is None:
        agent_tools = tuple(body.bastion.tools)
    elif body.bastion is not None and agent_tools is not None:
        agent_tools = (*agent_tools, *body.bastion.tools)
    control = openai_api.chat_control_request(body, gateway.link.new_id("chat"), agent_tools, model)
    exchange = gateway.exchange(control)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    responder = openai_api.ChatResponder(exchange, agent=agent_tools is not None, include_usage=include_usage)
    return await respond(request, exchange, stream=body.stream, lines=responder.stream, collect=responder.collect,
                         media_type="text/event-stream")


async def completions(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    body = openai_api.parse_body(openai_api.CompletionRequest, await json_body(request, gateway.settings))
    control = openai_api.completion_control_request(body, gateway.link.new_id("text"), body.model)
    exchange = gateway.exchange(control)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    responder = openai_api.TextResponder(exchange, include_usage=include_usage)
    return await respond(request, exchange, stream=body.stream, lines=responder.stream, collect=responder.collect,
                         media_type="text/event-stream")


def _model_object(entry: CatalogEntry) -> dict[str, Any]:
    return {"id": entry.name, "object": "model", "created": int(entry.modified_at), "owned_by": "bastion",
            "meta": {"n_ctx": entry.n_ctx, "size": entry.file_size, "description": entry.description}}


async def list_models(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    catalog, _ = await gateway.models()
    return JSONResponse({"object": "list", "data": [_model_object(entry) for entry in catalog]})


async def get_model(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    name = request.path_params["model"]
    catalog, _ = await gateway.models()
    for entry in catalog:
        if entry.name == name:
            return JSONResponse(_model_object(entry))
    raise ApiError(404, f"unknown model {name!r}; known models: {', '.join(e.name for e in catalog)}",
                   code="model_not_found")


# --- bastion's own routes ------------------------------------------------------------------


async def list_approvals(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    listing = await gateway.ask(ListApprovals(request_id=gateway.link.new_id("approvals")))
    assert isinstance(listing, ApprovalList)
    return JSONResponse({"approvals": [_plain(approval) for approval in listing.approvals]})


async def resolve_approval(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    body = await json_body(request, gateway.settings)
    approve = body.get("approve")
    if not isinstance(approve, bool):
        raise ApiError(400, "approve: true or false", param="approve")
    ttl_s, uses = body.get("ttl_s"), body.get("uses", 1)
    if ttl_s is not None and (not isinstance(ttl_s, int | float) or isinstance(ttl_s, bool)):
        raise ApiError(400, "ttl_s: a number of seconds the grant stays valid", param="ttl_s")
    if uses is not None and (not isinstance(uses, int) or isinstance(uses, bool)):
        raise ApiError(400, "uses: how many identical calls the grant covers (a whole number)", param="uses")
    resolved = await gateway.ask(ResolveApproval(request_id=gateway.link.new_id("approve"),
                                                 approval_id=request.path_params["approval_id"], approve=approve,
                                                 ttl_s=None if ttl_s is None else float(ttl_s), uses=uses))
    assert isinstance(resolved, ApprovalResolved)
    return JSONResponse({"approval_id": resolved.approval_id, "approved": resolved.approved})


def _plain(value: Any) -> Any:
    return msgspec.to_builtins(value)


# --- health and metrics --------------------------------------------------------------------


async def health(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    try:
        status = await asyncio.wait_for(gateway.link.ask(GetStatus(request_id=gateway.link.new_id("health"))), 5)
    except (LinkError, TimeoutError) as exc:
        message = exc.message if isinstance(exc, LinkError) else "the supervisor did not answer"
        return JSONResponse({"status": "unavailable", "error": message}, status_code=503)
    if not isinstance(status, StatusReport):
        return JSONResponse({"status": "unavailable"}, status_code=503)
    return JSONResponse({"status": "ok", "supervisor_pid": status.pid, "version": status.version,
                         "models_loaded": status.models_loaded, "runs_active": status.runs_active})


async def metrics(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    try:
        _, loaded = await gateway.models(fresh=True)
    except ApiError:
        loaded = []
    return PlainTextResponse(gateway.metrics.render(loaded), media_type="text/plain; version=0.0.4")


async def root(request: Request) -> Response:
    return PlainTextResponse("bastion is running")


# --- errors, authentication, counting --------------------------------------------------------


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    ollama = request.url.path.startswith("/api/")
    body = exc.ollama_body() if ollama else exc.openai_body()
    return JSONResponse(body, status_code=exc.status, headers=exc.headers())


class Guard:
    """Outermost middleware: the API key, and the request counter by route and status."""

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self._app = app
        self._gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        path = scope["path"]
        status_seen: list[int] = []

        async def counting_send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
            await send(message)

        key = self._gateway.settings.api_key
        if key is not None and path != "/health" and scope["method"] != "OPTIONS" and not _authorized(scope, key):
            error = ApiError(401, "missing or wrong API key: send `Authorization: Bearer KEY`",
                             code="invalid_api_key")
            body = error.ollama_body() if path.startswith("/api/") else error.openai_body()
            response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, counting_send)
        else:
            await self._app(scope, receive, counting_send)
        self._gateway.metrics.request(_route_label(path), status_seen[0] if status_seen else 499)


def _authorized(scope: Scope, key: str) -> bool:
    headers = dict(scope["headers"])
    given = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = given.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/bastion/approvals", "/api/chat",
           "/api/generate", "/api/tags", "/api/ps", "/api/show", "/api/version", "/health", "/metrics")


def _route_label(path: str) -> str:
    return next((route for route in _ROUTES if path == route or path.startswith(route + "/")), "other")


def build_app(settings: GatewaySettings, link: SupervisorLink | None = None) -> Starlette:
    gateway = Gateway(settings=settings, link=link or SupervisorLink(settings.home))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        with contextlib.suppress(LinkError):
            await gateway.link.ensure_connected()  # early, so the first request does not pay for it
        yield
        await gateway.link.close()

    routes = [
        Route("/", root, methods=["GET", "HEAD"]),
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/v1/models", list_models),
        Route("/v1/models/{model:path}", get_model),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/bastion/approvals", list_approvals),
        Route("/v1/bastion/approvals/{approval_id}", resolve_approval, methods=["POST"]),
        *ollama_api.routes(),
    ]
    middleware = [Middleware(Guard, gateway=gateway)]
    if settings.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                                     allow_methods=["GET", "POST", "OPTIONS"],
                                     allow_headers=["Authorization", "Content-Type"]))  # fmt: skip
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {ApiError: api_error}
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=handlers, lifespan=lifespan)
    app.state.gateway = gateway
    return app
