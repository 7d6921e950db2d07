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

import contextlib
import hmac
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Annotated, Any

import msgspec
from pydantic import Field, StrictBool
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from bastion.gateway import ollama_api, openai_api
from bastion.gateway.bodies import Lenient, parse_body
from bastion.gateway.errors import ApiError
from bastion.gateway.link import LinkError, SupervisorLink
from bastion.gateway.service import Gateway, GatewaySettings, json_body, respond
from bastion.protocol.control import CatalogEntry, GetStatus, StatusReport
from bastion.protocol.network import is_loopback
from bastion.protocol.trust import ApprovalList, ApprovalResolved, ListApprovals, ResolveApproval

log = logging.getLogger(__name__)



# --- OpenAI routes -----------------------------------------------------------------------


async def chat_completions(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    body = parse_body(openai_api.ChatRequest, await json_body(request, gateway.settings))
    model, agent_tools = await gateway.agent_model(body.model)
    session = request.headers.get("x-bastion-session")
    if session is not None:
        if not session.strip():
            raise ApiError(400, "X-Bastion-Session: give the session's name", param="X-Bastion-Session")
        body.bastion = (body.bastion or openai_api.BastionRun()).model_copy(update={"session": session})
    if body.bastion is not None:
        agent_tools = (*(agent_tools or ()), *body.bastion.tools)
    if agent_tools is not None:
        require_agent_runs(gateway)
    check_model(gateway, model)
    control = openai_api.chat_control_request(body, gateway.link.new_id("chat"), agent_tools, model)
    exchange = gateway.exchange(control)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    responder = openai_api.ChatResponder(exchange, agent=agent_tools is not None, include_usage=include_usage,
                                         logprobs=body.logprobs)
    return await respond(request, exchange, stream=body.stream, lines=responder.stream, collect=responder.collect,
                         media_type="text/event-stream")


def require_agent_runs(gateway: Gateway) -> None:
    if not gateway.settings.agent_runs:
        raise ApiError(403, "bastion's agent runs, sessions and approvals are off on this gateway; start it with "
                            "--agent-runs (`bastion up --http PORT --agent-runs`) to serve them",
                       code="agent_runs_disabled")


def check_model(gateway: Gateway, model: str | None) -> None:
    """Off loopback, a client names registry models only: no files of this machine by path."""
    if model is None or gateway.settings.loopback_only:
        return
    if model.startswith("scripted:") or "/" in model or model.endswith(".gguf"):
        raise ApiError(400, "this gateway serves registry models by name only (see GET /v1/models)",
                       param="model")


async def completions(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    body = parse_body(openai_api.CompletionRequest, await json_body(request, gateway.settings))
    check_model(gateway, body.model)
    control = openai_api.completion_control_request(body, gateway.link.new_id("text"), body.model)
    exchange = gateway.exchange(control)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    responder = openai_api.TextResponder(exchange, include_usage=include_usage, logprobs=body.logprobs is not None)
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


class ApprovalAnswer(Lenient):
    approve: StrictBool  # "yes" is not an answer
    ttl_s: Annotated[float, Field(gt=0, le=365 * 86400)] | None = None
    uses: Annotated[int, Field(ge=1, le=1_000_000)] | None = 1


async def list_approvals(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    require_agent_runs(gateway)
    listing = await gateway.ask(ListApprovals(request_id=gateway.link.new_id("approvals")))
    assert isinstance(listing, ApprovalList)
    return JSONResponse({"approvals": [_plain(approval) for approval in listing.approvals]})


async def resolve_approval(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    require_agent_runs(gateway)
    answer = parse_body(ApprovalAnswer, await json_body(request, gateway.settings))
    resolved = await gateway.ask(ResolveApproval(request_id=gateway.link.new_id("approve"),
                                                 approval_id=request.path_params["approval_id"],
                                                 approve=answer.approve, ttl_s=answer.ttl_s, uses=answer.uses))
    assert isinstance(resolved, ApprovalResolved)
    return JSONResponse({"approval_id": resolved.approval_id, "approved": resolved.approved})


def _plain(value: Any) -> Any:
    return msgspec.to_builtins(value)


# --- health and metrics --------------------------------------------------------------------


async def health(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    try:
        status = await gateway.link.ask(GetStatus(request_id=gateway.link.new_id("health")), 5)
    except (LinkError, TimeoutError) as exc:
        message = exc.message if isinstance(exc, LinkError) else "the supervisor did not answer"
        return JSONResponse({"status": "unavailable", "error": message, "gateway_pid": os.getpid()},
                            status_code=503)
    if not isinstance(status, StatusReport):
        return JSONResponse({"status": "unavailable", "gateway_pid": os.getpid()}, status_code=503)
    return JSONResponse({"status": "ok", "gateway_pid": os.getpid(), "supervisor_pid": status.pid,
                         "version": status.version, "models_loaded": status.models_loaded,
                         "runs_active": status.runs_active})


async def metrics(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    try:
        loaded = await gateway.loaded()
    except ApiError:
        loaded = []
    return PlainTextResponse(gateway.metrics.render(loaded), media_type="text/plain; version=0.0.4")


async def root(request: Request) -> Response:
    return PlainTextResponse("bastion is running")


# --- errors, authentication, counting --------------------------------------------------------


async def api_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPException):  # no such route, or the wrong method
        exc = ApiError(exc.status_code, exc.detail or "not found")
    elif not isinstance(exc, ApiError):
        log.exception("%s %s failed", request.method, request.url.path)
        exc = ApiError(500, f"internal error: {type(exc).__name__}: {exc}")
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

        refusal = self._refusal(scope)
        if refusal is not None:
            body = refusal.ollama_body() if path.startswith("/api/") else refusal.openai_body()
            headers = {"WWW-Authenticate": "Bearer"} if refusal.status == 401 else {}
            await JSONResponse(body, status_code=refusal.status, headers=headers)(scope, receive, counting_send)
        else:
            await self._app(scope, receive, counting_send)
        self._gateway.metrics.request(_route_label(path), status_seen[0] if status_seen else 499)


    def _refusal(self, scope: Scope) -> ApiError | None:
        """Why a request is refused before any route sees it, or None.

        - Bound to loopback, the Host must be a loopback name: a web page that rebinds its own
          domain to 127.0.0.1 cannot reach the gateway.
        - A browser's request from an origin not listed (`--cors-origin`) is refused: a web page
          cannot post to the gateway even where CORS would let the request through unread.
        - With an API key, every route but /health wants it."""
        settings = self._gateway.settings
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        if settings.loopback_only and not is_loopback(_hostname(headers.get("host", "localhost"))):
            return ApiError(403, "this gateway answers requests to a loopback address only", code="bad_host")
        origin = headers.get("origin")
        if origin is not None and origin not in settings.cors_origins:
            return ApiError(403, f"requests from {origin} are not allowed; list it with --cors-origin",
                            code="origin_not_allowed")
        key = settings.api_key
        if key is not None and scope["path"] != "/health" and scope["method"] != "OPTIONS" \
                and not _authorized(headers, key):
            return ApiError(401, "missing or wrong API key: send `Authorization: Bearer KEY`", code="invalid_api_key")
        return None


def _hostname(host: str) -> str:
    """The name in a Host header, without its port (`[::1]:11435` -> `::1`)."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _authorized(headers: dict[str, str], key: str) -> bool:
    given = headers.get("authorization", "")
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
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        ApiError: api_error, HTTPException: api_error, Exception: api_error}
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=handlers, lifespan=lifespan)
    app.state.gateway = gateway
    return app
