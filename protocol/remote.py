"""How a model served by a remote engine is reached: what the supervisor's
registry reads from `config.toml` and hands to the model's worker.

A remote model is still served by a worker process of its own (crash
isolation, restart, heartbeat, cancel and backpressure stay one mechanism);
that worker speaks HTTP to the engine instead of calling libllama. This struct
crosses the process boundary as JSON on the worker's command line, so it
carries no secret: only where the API key is (an environment variable's name
or a file of mode 0600), which the worker reads itself.

Engines:
    llama-server  llama.cpp's own server: `/completion` with the raw prompt,
                  `cache_prompt`, a slot per session (`id_slot`); `/props`
                  gives the context size and the chat template
    openai        any OpenAI-compatible server (vLLM, LM Studio, llama-cpp-
                  python's server, another bastion's gateway): `/v1/completions`
    ollama        Ollama: `/api/generate` with `raw: true`; `/api/show`
Modes: `completion` sends the prompt bastion rendered with its own template,
so templates, `--show-prompt`, tool-call parsing and token budgets behave as
with a local model; `chat`, for servers that take only messages, sends the
conversation and the tools, and the server applies its template (llama-server
and OpenAI-compatible servers: `/v1/chat/completions`; Ollama: `/api/chat`).
"""

from __future__ import annotations

import enum
from typing import Annotated
from urllib.parse import urlsplit

import msgspec


class RemoteEngine(enum.Enum):
    LLAMA_SERVER = "llama-server"
    OPENAI = "openai"
    OLLAMA = "ollama"


class RemoteMode(enum.Enum):
    COMPLETION = "completion"  # bastion renders the prompt with the model's template and sends the text
    CHAT = "chat"  # bastion sends the messages (and tools); the server applies its own template


_Seconds = Annotated[float, msgspec.Meta(gt=0, le=86400)]
_Url = Annotated[str, msgspec.Meta(pattern=r"^https?://[^\s/]+(/\S*)?$")]


class RemoteEndpoint(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    engine: RemoteEngine
    url: _Url  # the server's base URL, e.g. http://gpu-box:8080 (no /v1); with `urls`, the first of them
    # Several servers of the same model (scale-out): each session stays on one, new sessions go to the
    # least busy healthy one, and a server that stops answering is taken out until it answers again.
    urls: tuple[_Url, ...] = ()
    model: str = ""  # the remote's name for the model ('' : the server's only or default one)
    api_key_env: str = ""  # the environment variable holding the API key
    api_key_file: str = ""  # or a file holding it, readable by its owner only
    mode: RemoteMode = RemoteMode.COMPLETION
    # Unreachable when no connection is made within this.
    connect_timeout_s: _Seconds = 5.0
    # The longest silence allowed within a reply (a long prompt's prefill included):
    # past it the reply is cut and reported interrupted.
    idle_timeout_s: _Seconds = 120.0

    def __post_init__(self) -> None:
        for url in (self.url, *self.urls):
            problem = url_problem(url)
            if problem:
                shown = "a url" if "credentials" in problem else f"url {url!r}"  # a password is not repeated
                raise ValueError(f"{shown}: {problem}")

    @property
    def backends(self) -> tuple[str, ...]:
        return self.urls or (self.url,)

    def describe(self, url: str = "") -> str:
        model = f" model {self.model}" if self.model else ""
        return f"{self.engine.value} at {url or self.url}{model}"


def url_problem(url: str) -> str:
    """Why `url` cannot be a server's base address, or ''. (The pattern on the field admits what
    these catch: a port that is not a number or out of range, credentials in the address, which
    would end up in logs and `bastion ps`.)"""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return str(exc)
    if not parts.hostname:
        return "it names no host"
    if parts.username is not None or parts.password is not None:
        return "credentials do not belong in the address: use api_key_env or api_key_file"
    if port == 0:
        return "port 0 is no port"
    return ""


class BackendGauge(msgspec.Struct, frozen=True, kw_only=True):
    """One server of a remote model, as its worker sees it (heartbeats carry these; `bastion ps` shows them)."""

    url: str
    healthy: bool
    in_flight: int = 0  # requests streaming from it now
    sessions: int = 0  # sessions that stay on it
    requests: int = 0  # requests it answered
    prompt_tokens: int = 0  # the prompt tokens it reported, in all
    cached_tokens: int = 0  # of which it said it reused from its cache
    # Replies for which it claimed more reuse than any prompt bastion sent it shares with the
    # new one: it restored another conversation's state, or other clients share the server.
    contradicted: int = 0
    last_error: str = ""


class ProbeStep(msgspec.Struct, frozen=True, kw_only=True):
    """One check of a remote engine: what was checked, whether it passed, what was seen, what to do."""

    name: str  # reachable, model, context, streaming
    ok: bool
    detail: str
    fix: str = ""


class RemoteProbe(msgspec.Struct, frozen=True, kw_only=True):
    """What `bastion doctor` found when it tried one remote model's engine."""

    model: str  # the registry's name
    engine: RemoteEngine
    url: str
    steps: list[ProbeStep]

    @property
    def ok(self) -> bool:
        return all(step.ok for step in self.steps)
