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
with a local model.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec


class RemoteEngine(enum.Enum):
    LLAMA_SERVER = "llama-server"
    OPENAI = "openai"
    OLLAMA = "ollama"


class RemoteMode(enum.Enum):
    COMPLETION = "completion"


_Seconds = Annotated[float, msgspec.Meta(gt=0, le=86400)]
_Url = Annotated[str, msgspec.Meta(pattern=r"^https?://[^\s/]+(/\S*)?$")]


class RemoteEndpoint(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    engine: RemoteEngine
    url: _Url  # the server's base URL, e.g. http://gpu-box:8080 (no /v1)
    model: str = ""  # the remote's name for the model ('' : the server's only or default one)
    api_key_env: str = ""  # the environment variable holding the API key
    api_key_file: str = ""  # or a file holding it, readable by its owner only
    mode: RemoteMode = RemoteMode.COMPLETION
    # Unreachable when no connection is made within this.
    connect_timeout_s: _Seconds = 5.0
    # The longest silence allowed within a reply (a long prompt's prefill included):
    # past it the reply is cut and reported interrupted.
    idle_timeout_s: _Seconds = 120.0

    def describe(self) -> str:
        model = f" model {self.model}" if self.model else ""
        return f"{self.engine.value} at {self.url}{model}"


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
