"""What a remote engine says of itself, and what bastion needs before it can ask: the API key
(`read_api_key`), the server's description of the model (`server_facts`: llama-server's `/props`,
an OpenAI-compatible server's `/v1/models`, Ollama's `/api/show`), its own token count
(`count_at`: `/tokenize`), and the one-line forms of its errors (`excerpt`, `reason`).

Everything here fails as `RemoteUnavailable`, carrying the check that failed (the step
`bastion doctor` shows) and the fix; remote/core.py turns these into a load failure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
from dataclasses import dataclass
from typing import Any

import httpx

from bastion.protocol.remote import RemoteEndpoint, RemoteEngine
from bastion.protocol.worker_wire import ModelDescription

log = logging.getLogger(__name__)

OLLAMA_DEFAULT_N_CTX = 4096  # Ollama's own default context, used when neither config nor server gives one


class RemoteUnavailable(Exception):
    """The remote engine cannot be used: why (the message), which check failed (`step`: api key,
    reachable, engine (it answers, but not as the engine configured), model, context; see probe.py)
    and what to do (`fix`)."""

    def __init__(self, message: str, *, step: str = "reachable", fix: str = "") -> None:
        super().__init__(message)
        self.step = step
        self.fix = fix

def read_api_key(endpoint: RemoteEndpoint, environ: dict[str, str] | None = None) -> str:
    """The API key `endpoint` names, '' when it names none; RemoteUnavailable when it cannot be read."""
    environ = dict(os.environ) if environ is None else environ
    if endpoint.api_key_env:
        key = environ.get(endpoint.api_key_env, "")
        if not key:
            raise RemoteUnavailable(f"the environment variable {endpoint.api_key_env} (api_key_env) is not set "
                                    "for the supervisor: export it before `bastion up`", step="api key",
                                    fix=f"export {endpoint.api_key_env}=... then `bastion down` and run again")  # fmt: skip
        return _checked_key(key, f"the environment variable {endpoint.api_key_env}")
    if endpoint.api_key_file:
        try:
            info = os.stat(endpoint.api_key_file)
            if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise RemoteUnavailable(f"the key file {endpoint.api_key_file} can be read by others "
                                        f"(mode {stat.S_IMODE(info.st_mode):04o}): chmod 600 it", step="api key",
                                        fix=f"chmod 600 {endpoint.api_key_file}")  # fmt: skip
            with open(endpoint.api_key_file, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as exc:
            raise RemoteUnavailable(f"cannot read the key file {endpoint.api_key_file}: {exc.strerror}",
                                    step="api key", fix="check api_key_file in config.toml") from None
        return _checked_key(text, f"the key file {endpoint.api_key_file}")
    return ""


def _checked_key(raw: str, where: str) -> str:
    """The key without surrounding white space; refused (never quoted) unless it is one line of printable
    ASCII, which is all an HTTP header can carry: an error about the header would quote it."""
    key = raw.strip()
    if not key or not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise RemoteUnavailable(f"{where} does not hold one API key (printable ASCII, one line, no spaces)",
                                step="api key", fix=f"put the key alone in {where.split(' ', 2)[-1]}")  # fmt: skip
    return key

@dataclass
class ServerFacts:
    """What a server says of the model it serves (0 and '' where it says nothing)."""

    n_ctx: int = 0
    n_ctx_train: int = 0
    n_vocab: int = 0
    n_params: int = 0
    size: int = 0
    architecture: str = ""
    chat_template: str = ""
    bos_token: str = ""
    eos_token: str = ""
    model_name: str = ""
    missing_model: str = ""


async def _json(client: httpx.AsyncClient, method: str, path: str, body: Any = None) -> Any:
    response = await client.request(method, path, json=body)
    response.raise_for_status()
    return response.json()


async def _llama_server_facts(client: httpx.AsyncClient) -> ServerFacts:
    props = await _json(client, "GET", "/props")
    settings = props.get("default_generation_settings") or {}
    facts = ServerFacts(n_ctx=int(settings.get("n_ctx") or 0), chat_template=str(props.get("chat_template") or ""),
                   bos_token=str(props.get("bos_token") or ""), eos_token=str(props.get("eos_token") or ""),
                   model_name=os.path.basename(str(props.get("model_path") or "")))  # fmt: skip
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError, IndexError):
        meta = (await _json(client, "GET", "/v1/models"))["data"][0].get("meta") or {}
        facts.n_ctx_train, facts.n_vocab = int(meta.get("n_ctx_train") or 0), int(meta.get("n_vocab") or 0)
        facts.n_params, facts.size = int(meta.get("n_params") or 0), int(meta.get("size") or 0)
    return facts


async def _openai_facts(client: httpx.AsyncClient, model: str) -> ServerFacts:
    listed = (await _json(client, "GET", "/v1/models"))["data"]
    ids = [str(entry.get("id")) for entry in listed if isinstance(entry, dict)]
    if model and model not in ids:
        return ServerFacts(missing_model=f"the server does not list the model '{model}' (it has: "
                                    f"{', '.join(ids) or 'none'}): set `model` in config.toml to one of them")
    entry = next((e for e in listed if isinstance(e, dict) and (not model or e.get("id") == model)), {})
    meta = entry.get("meta") or {}  # llama.cpp's server
    return ServerFacts(n_ctx=int(entry.get("max_model_len") or 0),  # vLLM
                  n_ctx_train=int(meta.get("n_ctx_train") or 0), n_vocab=int(meta.get("n_vocab") or 0),
                  n_params=int(meta.get("n_params") or 0), size=int(meta.get("size") or 0),
                  model_name=model or str(entry.get("id") or ""))  # fmt: skip


async def _ollama_facts(client: httpx.AsyncClient, model: str) -> ServerFacts:
    if not model:
        return ServerFacts(missing_model="an Ollama model needs `model` (the name `ollama list` shows) in config.toml")
    response = await client.post("/api/show", json={"model": model})
    if response.status_code == 404:
        return ServerFacts(missing_model=f"Ollama has no model '{model}': `ollama pull {model}` on that machine, "
                                    "or set `model` to one `ollama list` shows")  # fmt: skip
    response.raise_for_status()
    shown = response.json()
    info = shown.get("model_info") or {}
    architecture = str(info.get("general.architecture") or "")
    # Ollama's `template` is Go text/template, not Jinja: bastion renders with its built-in one for the
    # architecture (or the model's `template` setting) instead.
    return ServerFacts(n_ctx_train=int(info.get(f"{architecture}.context_length") or 0), architecture=architecture,
                  n_params=int(info.get("general.parameter_count") or 0), model_name=model)  # fmt: skip

def model_description(facts: ServerFacts, endpoint: RemoteEndpoint, *, name: str, n_ctx: int,
                      load_ms: float) -> ModelDescription:  # fmt: skip
    """The worker's description of a remote model: the server's facts, with the context a request
    gets (the configured `n_ctx`, never more than the server gives one, else the server's own)."""
    if facts.missing_model:
        raise RemoteUnavailable(facts.missing_model, step="model", fix="set `model` in config.toml")
    if n_ctx and facts.n_ctx and n_ctx > facts.n_ctx:
        # More than the server gives a request: prompts sized to it would be refused there.
        log.warning("n_ctx %d is more than %s gives a request (%d): using %d", n_ctx, endpoint.describe(),
                    facts.n_ctx, facts.n_ctx)  # fmt: skip
        n_ctx = facts.n_ctx
    n_ctx = n_ctx or facts.n_ctx
    if not n_ctx and endpoint.engine is RemoteEngine.OLLAMA:
        # Ollama sizes the context per request (options.num_ctx): its own default, within the model's.
        n_ctx = min(OLLAMA_DEFAULT_N_CTX, facts.n_ctx_train or OLLAMA_DEFAULT_N_CTX)
    if not n_ctx:
        raise RemoteUnavailable(f"{endpoint.describe()} does not say its context size: set n_ctx for the model "
                                "in config.toml", step="context", fix="set n_ctx in the model's [models.NAME] table")
    return ModelDescription(
        name=name, path=endpoint.url, architecture=facts.architecture or "remote", n_ctx=n_ctx,
        n_ctx_train=facts.n_ctx_train or n_ctx, n_vocab=facts.n_vocab, n_params=facts.n_params, threads=0,
        has_chat_template=bool(facts.chat_template), chat_template=facts.chat_template,
        bos_token=facts.bos_token, eos_token=facts.eos_token, file_size=facts.size, rss_bytes=0,
        load_ms=round(load_ms, 1), gguf_name=facts.model_name,
    )  # fmt: skip


async def server_facts(client: httpx.AsyncClient, endpoint: RemoteEndpoint, url: str) -> ServerFacts:
    """What the server at `url` says of itself, by its engine's routes; RemoteUnavailable, with the
    check that failed and the fix, when it cannot be reached or does not answer as that engine."""
    where = endpoint.describe(url)
    try:
        match endpoint.engine:
            case RemoteEngine.LLAMA_SERVER:
                facts = await _llama_server_facts(client)
            case RemoteEngine.OPENAI:
                facts = await _openai_facts(client, endpoint.model)
            case RemoteEngine.OLLAMA:
                facts = await _ollama_facts(client, endpoint.model)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise RemoteUnavailable(f"cannot reach {where}: {reason(exc)}; is the server running, and is `url` "
                                "in config.toml right?", fix="start the server, or correct `url`") from None  # fmt: skip
    except httpx.HTTPStatusError as exc:
        status = exc.response.status_code
        if status in (401, 403):
            raise RemoteUnavailable(f"{where} refused bastion ({status} to {exc.request.url.path}): "
                                    f"{excerpt(exc.response.text)}", step="api key",
                                    fix="check api_key_env / api_key_file") from None  # fmt: skip
        raise RemoteUnavailable(f"{where} answered {status} to {exc.request.url.path}: "
                                f"{excerpt(exc.response.text)}; is `engine` right for this server?",
                                step="engine", fix="check `engine` and `url`") from None  # fmt: skip
    except httpx.HTTPError as exc:
        raise RemoteUnavailable(f"{where}: {reason(exc)}") from None
    except httpx.InvalidURL as exc:
        raise RemoteUnavailable(f"{where}: the url is not usable: {exc}", step="engine",
                                fix="correct `url`") from None  # fmt: skip
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # AttributeError: JSON, not an object
        raise RemoteUnavailable(f"{where} does not answer as {endpoint.engine.value} does ({exc}); "
                                "is `engine` right for this server?", step="engine",
                                fix="check `engine`") from None  # fmt: skip
    return facts

class NoTokenizer(Exception):
    """The engine has no route that counts tokens."""


async def count_at(client: httpx.AsyncClient, endpoint: RemoteEndpoint, text: str) -> int:
    """`text`'s tokens as the server counts a prompt: special tokens parsed, BOS as the model adds it."""
    match endpoint.engine:
        case RemoteEngine.LLAMA_SERVER:
            response = await client.post("/tokenize", json={"content": text, "add_special": True,
                                                             "parse_special": True})  # fmt: skip
            response.raise_for_status()
            return len(response.json()["tokens"])
        case RemoteEngine.OPENAI:  # vLLM's route reads `prompt`; llama.cpp's server, behind `openai`, `content`
            response = await client.post("/tokenize", json={"model": endpoint.model, "prompt": text, "content": text})
            if response.status_code == 404:
                raise NoTokenizer(f"{endpoint.describe()} has no /tokenize route")
            response.raise_for_status()
            shown = response.json()
            count = int(shown["count"]) if "count" in shown else len(shown["tokens"])
            if text and not count:  # a route of that name that did not read the text
                raise NoTokenizer(f"{endpoint.describe()}'s /tokenize counted nothing")
            return count
    raise NoTokenizer(f"{endpoint.engine.value} servers have no route that counts tokens")

def excerpt(text: str) -> str:
    """An error body, short and on one line (an HTML page shows its text, not its markup)."""
    if "<html" in text[:500].lower():
        title = re.search(r"<title>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
        text = f"an HTML page{': ' + title.group(1).strip() if title else ''}"
    text = " ".join(text.split())
    return text[:300] + ("…" if len(text) > 300 else "") if text else "(no body)"


def reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300]
