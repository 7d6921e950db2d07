"""RemoteCore against a scriptable HTTP double (tests/remote_double.py), in-process: driven as
worker/proc.py drives it (`start`, then `step` whenever `wake` says there is something to send).

The double stands in for llama.cpp's server, an OpenAI-compatible server and Ollama at byte level,
so each failure RemoteCore classifies (see its module docstring) is produced the way a real server
or network produces it: an error status, an error inside the stream, garbage, a stall, a cut."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bastion.protocol import ErrorCode, GenerationStats, RequestFailed, SamplingParams, StopReason, TokenDelta
from bastion.protocol.remote import RemoteEndpoint, RemoteEngine, RemoteMode
from bastion.protocol.worker_wire import CountTokens, FromWorker, Generate, GenerationFinished, TokenCount
from bastion.worker.remote import core as core_module
from bastion.worker.remote import http_stream
from bastion.worker.remote import replies as replies_module
from bastion.worker.remote.core import RemoteCore
from bastion.worker.remote.server_facts import RemoteUnavailable, read_api_key
from tests.remote_double import Handler, HttpDouble, Received, Reply
from tests.waiting import until, wait_until

LLAMA, OPENAI, OLLAMA = RemoteEngine.LLAMA_SERVER, RemoteEngine.OPENAI, RemoteEngine.OLLAMA
STEP_TIMEOUT_S = 5.0  # the longest any test waits for the core; the double's idle timeouts are far shorter


class Client:
    """One request's messages, as the process shell would carry them."""

    def __init__(
        self, core: RemoteCore, request_id: str, prompt: str, session: str, sampling: SamplingParams
    ) -> None:
        self.messages: list[FromWorker] = []
        self.cancel = False
        self.request_id = request_id
        core.start(Generate(request_id=request_id, session_id=session, prompt=prompt, sampling=sampling),
                   self.messages.append, lambda: self.cancel)  # fmt: skip

    @property
    def text(self) -> str:
        return "".join(m.text for m in self.messages if isinstance(m, TokenDelta))

    @property
    def finished(self) -> GenerationFinished:
        (finished,) = [m for m in self.messages if isinstance(m, GenerationFinished)]
        return finished

    @property
    def failure(self) -> RequestFailed:
        (failed,) = [m for m in self.messages if isinstance(m, RequestFailed)]
        return failed


class Driven:
    """A RemoteCore and the loop of the worker's shell around it: step whenever it wakes."""

    def __init__(self, endpoint: RemoteEndpoint, *, n_ctx: int, api_key: str) -> None:
        self.woken = threading.Event()
        self.core = RemoteCore(endpoint, name="m", n_ctx=n_ctx, wake=self.woken.set, api_key=api_key)
        self._ids = 0

    def generate(self, prompt: str = "<s>hi", *, session: str = "s", **sampling: Any) -> Client:
        self._ids += 1
        return Client(self.core, f"r{self._ids}", prompt, session, SamplingParams(**sampling))

    def step_until(self, done: Callable[[], object], *, what: str, timeout: float = STEP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        for _ in range(100_000):
            self.core.step()
            if done():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.woken.wait(left)
            self.woken.clear()
        raise AssertionError(f"waited {timeout:g} s for {what}")

    def drain(self, timeout: float = STEP_TIMEOUT_S) -> None:
        self.step_until(lambda: self.core.active == 0, what="every generation to end", timeout=timeout)


def ended(client: Client, reason: StopReason) -> GenerationStats:
    """The contract's tail: text first, then a RequestFailed when (and only when) the generation failed,
    then exactly one GenerationStats and one GenerationFinished, all about this request."""
    kinds = [type(m) for m in client.messages]
    tail = [GenerationStats, GenerationFinished]
    if reason is StopReason.ERROR:
        tail.insert(0, RequestFailed)
    assert kinds[-len(tail) :] == tail and set(kinds[: -len(tail)]) <= {TokenDelta}, kinds
    assert all(getattr(m, "request_id", None) == client.request_id for m in client.messages)
    assert client.finished.stop_reason is reason
    stats = client.messages[-2]
    assert isinstance(stats, GenerationStats)
    return stats


def endpoint(
    url: str, engine: RemoteEngine = LLAMA, *, idle_timeout_s: float = 0.5, **fields: Any
) -> RemoteEndpoint:
    model = "" if engine is LLAMA else "m1"
    return RemoteEndpoint(engine=engine, url=url, model=fields.pop("model", model), connect_timeout_s=0.5,
                          idle_timeout_s=idle_timeout_s, **fields)  # fmt: skip


# -- what each engine streams ----------------------------------------------------


def piece(engine: RemoteEngine, text: str) -> dict[str, Any]:
    """One event carrying text, as `engine` streams it."""
    match engine:
        case RemoteEngine.LLAMA_SERVER:
            return {"content": text, "stop": False}
        case RemoteEngine.OPENAI:
            return {"id": "cmpl-1", "object": "text_completion", "model": "m1",
                    "choices": [{"index": 0, "text": text, "finish_reason": None}]}  # fmt: skip
        case RemoteEngine.OLLAMA:
            return {"model": "m1", "response": text, "done": False}


async def head(reply: Reply, engine: RemoteEngine) -> None:
    await reply.head(content_type="application/x-ndjson" if engine is OLLAMA else "text/event-stream")


async def put(reply: Reply, engine: RemoteEngine, payload: Any) -> None:
    await (reply.line(payload) if engine is OLLAMA else reply.event(payload))


def llama_end(slot: int = 0, **fields: Any) -> dict[str, Any]:
    return {"content": "", "stop": True, "stop_type": "eos", "id_slot": slot,
            "timings": {"prompt_n": 4, "cache_n": 0, "predicted_n": 2}, **fields}  # fmt: skip


def llama_reply(*texts: str) -> Handler:
    """A llama-server that answers every request with `texts`, then its final event."""

    async def handler(got: Received, reply: Reply) -> None:
        await head(reply, LLAMA)
        for text in texts:
            await put(reply, LLAMA, piece(LLAMA, text))
        await put(reply, LLAMA, llama_end())
        await reply.end()

    return handler


# -- fixtures ---------------------------------------------------------------------

Serve = Callable[[Handler], HttpDouble]
Cores = Callable[..., Driven]


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core_module, "RETRY_DELAY_S", 0.01)


@pytest.fixture
def serve() -> Iterator[Serve]:
    """`serve(handler)`: a double answering with `handler`; closed after the test, which fails if a
    handler broke (a script that did not run as written proves nothing)."""
    doubles: list[HttpDouble] = []

    def make(handler: Handler) -> HttpDouble:
        doubles.append(HttpDouble(handler))
        return doubles[-1]

    yield make
    for double in doubles:
        double.close()
    assert not [error for double in doubles for error in double.errors]


@pytest.fixture
def cores(serve: Serve) -> Iterator[Cores]:
    """`cores(endpoint, n_ctx=..., api_key=...)`: a driven RemoteCore, closed after the test (before the
    doubles it talks to)."""
    made: list[Driven] = []

    def make(remote: RemoteEndpoint, *, n_ctx: int = 4096, api_key: str = "") -> Driven:
        made.append(Driven(remote, n_ctx=n_ctx, api_key=api_key))
        return made[-1]

    yield make
    for driven in made:
        driven.core.close()


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A URL on which nothing listens: the port is bound (so nobody else takes it) but not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


# -- the happy paths ----------------------------------------------------------------


def test_llama_server_reply_streams_as_it_comes_with_the_servers_own_figures(
    serve: Serve, cores: Cores
) -> None:
    shown = threading.Event()

    async def handler(got: Received, reply: Reply) -> None:
        await head(reply, LLAMA)
        await put(reply, LLAMA, piece(LLAMA, "Hel"))
        await until(shown.is_set, what="the first piece to reach the shell")  # streamed, not buffered
        for text in ("lo, ", "world"):
            await put(reply, LLAMA, piece(LLAMA, text))
        await put(reply, LLAMA, {"content": "", "stop": True, "stop_type": "limit", "id_slot": 1,
                                 "timings": {"prompt_n": 7, "cache_n": 5, "predicted_n": 3}})  # fmt: skip
        await reply.end()

    double = serve(handler)
    driven = cores(endpoint(double.url))
    client = driven.generate("<|user|>hi<|assistant|>", max_tokens=3, stop=("</s>",))
    driven.step_until(lambda: client.text, what="the first piece")
    assert client.text == "Hel"
    shown.set()
    driven.drain()
    stats = ended(client, StopReason.LENGTH)
    assert client.text == "Hello, world"
    assert (stats.prompt_tokens, stats.cached_tokens, stats.completion_tokens) == (12, 5, 3)
    assert client.finished.completion_tokens == 3
    (got,) = double.received
    body = got.json()
    assert (got.method, got.path) == ("POST", "/completion") and "authorization" not in got.headers
    assert body["prompt"] == "<|user|>hi<|assistant|>" and body["stream"] is True
    assert body["cache_prompt"] is True
    assert body["n_predict"] == 3 and body["stop"] == ["</s>"] and body["id_slot"] == -1


def test_openai_reply_takes_its_figures_from_the_usage_chunk_after_the_last_choice(
    serve: Serve, cores: Cores
) -> None:
    async def handler(got: Received, reply: Reply) -> None:
        await head(reply, OPENAI)
        for text in ("Hel", "lo"):
            await put(reply, OPENAI, piece(OPENAI, text))
        await put(reply, OPENAI, {"choices": [{"index": 0, "text": "!", "finish_reason": "stop"}]})
        usage = {"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23,
                 "prompt_tokens_details": {"cached_tokens": 16}}  # fmt: skip
        await put(reply, OPENAI, {"choices": [], "usage": usage})
        await reply.send("data: [DONE]\n\n")
        await reply.end()

    double = serve(handler)
    driven = cores(endpoint(double.url, OPENAI))
    client = driven.generate("raw prompt", max_tokens=50, seed=7)
    driven.drain()
    stats = ended(client, StopReason.STOP)
    assert client.text == "Hello!"
    assert (stats.prompt_tokens, stats.cached_tokens, stats.completion_tokens) == (20, 16, 3)
    (got,) = double.received
    body = got.json()
    assert got.path == "/v1/completions" and body["model"] == "m1" and body["prompt"] == "raw prompt"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 50 and body["seed"] == 7


def test_ollama_reply_is_read_line_by_line_with_its_done_reason_and_counts(
    serve: Serve, cores: Cores
) -> None:
    async def handler(got: Received, reply: Reply) -> None:
        await head(reply, OLLAMA)
        for text in ("Hel", "lo"):
            await put(reply, OLLAMA, piece(OLLAMA, text))
        await put(reply, OLLAMA, {"model": "m1", "response": "", "done": True, "done_reason": "length",
                                  "prompt_eval_count": 9, "eval_count": 3})  # fmt: skip
        await reply.end()

    double = serve(handler)
    driven = cores(endpoint(double.url, OLLAMA), n_ctx=2048)
    client = driven.generate("[INST]hi[/INST]", max_tokens=3)
    driven.drain()
    stats = ended(client, StopReason.LENGTH)
    assert client.text == "Hello"
    assert (stats.prompt_tokens, stats.completion_tokens) == (9, 3)
    (got,) = double.received
    body = got.json()
    assert got.path == "/api/generate" and body["model"] == "m1" and body["prompt"] == "[INST]hi[/INST]"
    assert body["raw"] is True and body["stream"] is True
    assert body["options"]["num_ctx"] == 2048 and body["options"]["num_predict"] == 3


def test_llama_server_sessions_keep_the_slot_that_served_their_first_reply(
    serve: Serve, cores: Cores
) -> None:
    answered = iter([2, 3, 2, 3])  # the slot each reply says served it

    async def handler(got: Received, reply: Reply) -> None:
        await head(reply, LLAMA)
        await put(reply, LLAMA, piece(LLAMA, "ok"))
        await put(reply, LLAMA, llama_end(slot=next(answered)))
        await reply.end()

    double = serve(handler)
    driven = cores(endpoint(double.url))
    for session in ("s", "t", "s", "t"):
        driven.generate(session=session)
        driven.drain()
    assert [got.json()["id_slot"] for got in double.received] == [-1, -1, 2, 3]


def test_an_api_key_from_api_key_env_reaches_the_server_as_a_bearer_token(serve: Serve, cores: Cores) -> None:
    double = serve(llama_reply("ok"))
    remote = endpoint(double.url, api_key_env="BASTION_TEST_REMOTE_KEY")
    driven = cores(remote, api_key=read_api_key(remote, {"BASTION_TEST_REMOTE_KEY": "sk-test-123\n"}))
    driven.generate()
    driven.drain()
    assert double.received[0].headers["authorization"] == "Bearer sk-test-123"


def test_two_generations_in_flight_on_one_core_each_get_their_own_reply(serve: Serve, cores: Cores) -> None:
    async def handler(got: Received, reply: Reply) -> None:
        # Neither is answered until both were asked: the two requests are in flight together.
        await until(lambda: len(double.received) >= 2, timeout=3.0, what="the second request")
        await head(reply, LLAMA)
        for word in ("reply ", "to ", got.json()["prompt"]):
            await put(reply, LLAMA, piece(LLAMA, word))
        await put(reply, LLAMA, llama_end())
        await reply.end()

    double = serve(handler)
    driven = cores(endpoint(double.url))
    alpha, beta = driven.generate("alpha", session="a"), driven.generate("beta", session="b")
    assert driven.core.active == 2
    driven.drain()
    ended(alpha, StopReason.STOP)
    ended(beta, StopReason.STOP)
    assert (alpha.text, beta.text) == ("reply to alpha", "reply to beta")


# -- the API key ------------------------------------------------------------------


def test_read_api_key_names_the_variable_to_export_when_it_is_not_set() -> None:
    remote = endpoint("http://127.0.0.1:9", api_key_env="BASTION_TEST_UNSET_KEY")
    with pytest.raises(RemoteUnavailable, match="BASTION_TEST_UNSET_KEY") as raised:
        read_api_key(remote, {})
    assert "export" in str(raised.value)


def test_read_api_key_refuses_a_key_file_others_can_read(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk-secret\n")
    key_file.chmod(0o644)
    with pytest.raises(RemoteUnavailable, match="chmod 600") as raised:
        read_api_key(endpoint("http://127.0.0.1:9", api_key_file=str(key_file)), {})
    assert str(key_file) in str(raised.value) and "sk-secret" not in str(raised.value)


def test_read_api_key_reads_a_key_file_only_its_owner_can_read(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk-secret\n")
    key_file.chmod(0o600)
    assert read_api_key(endpoint("http://127.0.0.1:9", api_key_file=str(key_file)), {}) == "sk-secret"


def test_read_api_key_says_which_key_file_it_cannot_read(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(RemoteUnavailable, match="cannot read the key file"):
        read_api_key(endpoint("http://127.0.0.1:9", api_key_file=str(missing)), {})


# -- failures before the reply --------------------------------------------------------


def test_a_server_nobody_listens_for_is_unreachable_after_one_retry(
    cores: Cores, refused_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[str] = []
    connect = asyncio.open_connection

    async def counted(host: str, port: int, **options: Any) -> Any:
        attempts.append(f"{host}:{port}")
        return await connect(host, port, **options)

    monkeypatch.setattr(http_stream.asyncio, "open_connection", counted)
    driven = cores(endpoint(refused_url))
    client = driven.generate()
    driven.drain()
    ended(client, StopReason.ERROR)
    assert client.failure.code is ErrorCode.REMOTE_UNREACHABLE and client.failure.retryable
    assert "cannot reach" in client.failure.message and refused_url in client.failure.message
    assert attempts == [refused_url.removeprefix("http://")] * 2 and client.text == ""


def test_a_host_name_that_does_not_resolve_is_unreachable_and_says_so(cores: Cores) -> None:
    driven = cores(endpoint("http://no-such-host.invalid:8080"))
    client = driven.generate()
    driven.drain()
    ended(client, StopReason.ERROR)
    assert client.failure.code is ErrorCode.REMOTE_UNREACHABLE and "no-such-host.invalid" in client.failure.message
    assert "Name or service not known" in client.failure.message or "resolution" in client.failure.message


def test_https_to_a_plain_http_server_is_unreachable_with_the_tls_error(cores: Cores) -> None:
    """A plain-HTTP server answers the TLS hello with HTTP: the handshake fails, and says so."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(STEP_TIMEOUT_S)

    def answer_in_plain_http() -> None:
        for _ in range(2):  # the attempt and its one retry
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    server = threading.Thread(target=answer_in_plain_http, daemon=True)
    server.start()
    try:
        driven = cores(endpoint(f"https://127.0.0.1:{listener.getsockname()[1]}"))
        client = driven.generate()
        driven.drain()
    finally:
        listener.close()
        server.join(STEP_TIMEOUT_S)
    ended(client, StopReason.ERROR)
    assert client.failure.code is ErrorCode.REMOTE_UNREACHABLE
    assert "SSL" in client.failure.message or "TLS" in client.failure.message, client.failure.message


def test_a_server_that_hangs_up_before_answering_is_tried_twice_then_unreachable(
    serve: Serve, cores: Cores
) -> None:
    async def handler(got: Received, reply: Reply) -> None:
        reply.cut()

    double = serve(handler)
    driven = cores(endpoint(double.url))
    client = driven.generate()
    driven.drain()
    ended(client, StopReason.ERROR)
    assert client.failure.code is ErrorCode.REMOTE_UNREACHABLE and client.failure.retryable
    assert double.connections == 2 and len(double.received) == 2


def test_an_html_error_page_is_reported_by_its_status_and_title_without_retry(
    serve: Serve, cores: Cores
) -> None:
    page = ("<!DOCTYPE html>\n<html><head><title>Upstream exploded</title><style>body{color:red}</style>"
            "</head>"
            "<body><h1>Sorry</h1><p>Something went wrong.</p></body></html>")  # fmt: skip

    async def handler(got: Received, reply: Reply) -> None:
        await reply.answer(500, page, reason="Internal Server Error", content_type="text/html")

    double = serve(handler)
    driven = cores(endpoint(double.url))
    client = driven.generate()
    driven.drain()
    ended(client, StopReason.ERROR)
    failure = client.failure
    assert failure.code is ErrorCode.REMOTE_ERROR and not failure.retryable
    assert "500" in failure.message and "Upstream exploded" in failure.message
    assert "<" not in failure.message and "color:red" not in failure.message
    assert len(double.received) == 1


@pytest.mark.parametrize(("status", "reason", "body", "hints"), [
    (404, "Not Found", "File Not Found", ("`url`", "`engine`")),
    (401, "Unauthorized", {"error": {"message": "Invalid API Key", "code": 401}},
     ("API key", "Invalid API Key")),
])  # fmt: skip
def test_an_error_status_says_what_to_check(
    serve: Serve, cores: Cores, status: int, reason: str, body: Any, hints: tuple[str, ...]
) -> None:
    async def handler(got: Received, reply: Reply) -> None:
        await reply.answer(status, body, reason=reason)

    double = serve(handler)
    driven = cores(endpoint(double.url, OPENAI))
    client = driven.generate()
    driven.drain()
    ended(client, StopReason.ERROR)
    failure = client.failure
    assert failure.code is ErrorCode.REMOTE_ERROR and not failure.retryable and str(status) in failure.message
    assert all(hint in failure.message for hint in hints), failure.message
    assert len(double.received) == 1


def test_a_busy_server_is_asked_again_after_its_short_retry_after(serve: Serve, cores: Cores) -> None:
    ok = llama_reply("after ", "the wait")

    async def handler(got: Received, reply: Reply) -> None:
        if len(double.received) == 1:
            await reply.answer(429, {"error": {"message": "slow down"}}, reason="Too Many Requests",
                               headers={"Retry-After": "0"})  # fmt: skip
        else:
            await ok(got, reply)

    double = serve(handler)
    driven = cores(endpoint(double.url))
    client = driven.generate()
    driven.drain()
    ended(client, StopReason.STOP)
    assert client.text == "after the wait" and len(double.received) == 2


def test_a_busy_server_asking_for_a_long_wait_fails_at_once_saying_when_to_retry(
    serve: Serve, cores: Cores
) -> None:
    async def handler(got: Received, reply: Reply) -> None:
        await reply.answer(503, "loading model", reason="Service Unavailable", content_type="text/plain",
                           headers={"Retry-After": "3600"})  # fmt: skip

    double = serve(handler)
    driven = cores(endpoint(double.url))
    client = driven.generate()
    driven.drain()
    ended(client, StopReason.ERROR)
    failure = client.failure
    assert failure.code is ErrorCode.REMOTE_ERROR and failure.retryable
    assert failure.retry_after_ms == 3_600_000
    assert "loading model" in failure.message and len(double.received) == 1


# -- failures inside the stream -------------------------------------------------------


def test_a_stream_line_that_is_not_json_is_a_remote_error(serve: Serve, cores: Cores) -> None:
    async def handler(got: Received, reply: Reply) -> None:
        await head(reply, LLAMA)
        await reply.send("data: not json\n\n")
        await reply.end()

    double = serve(handler)
    driven = cores(endpoint(double.url))
    client = driven.generate()
    driven.drain()
    ended(client, StopReason.ERROR)
    assert client.failure.code is ErrorCode.REMOTE_ERROR and "not JSON" in client.failure.message
    assert "not json" in client.failure.message and len(double.received) == 1


@pytest.mark.parametrize(("engine", "error"), [
    (LLAMA, b'data: {"error": {"message": "boom"}}\n\n'),
    (OPENAI, b'data: {"error": {"message": "boom", "type": "server_error"}}\n\ndata: [DONE]\n\n'),
    (OLLAMA, b'{"error": "boom"}\n'),
    # llama.cpp's server sends a failure mid-stream as an `error:` field, not `data:`; on its
    # OpenAI-compatible endpoints `data: [DONE]` still follows it.
    (LLAMA, b'error: {"code": 500, "message": "boom", "type": "server_error"}\n\n'),
    (OPENAI, b'error: {"code": 500, "message": "boom", "type": "server_error"}\n\ndata: [DONE]\n\n'),
], ids=["llama-server", "openai", "ollama", "llama-server-error-field", "openai-error-field"])  # fmt: skip
def test_an_error_inside_the_stream_is_a_remote_error_quoting_the_server(
    serve: Serve, cores: Cores, engine: RemoteEngine, error: bytes
) -> None:
    async def handler(got: Received, reply: Reply) -> None:
        await head(reply, engine)
        await put(reply, engine, piece(engine, "Hel"))
        await reply.send(error)
        await reply.end()

    double = serve(handler)
    driven = cores(endpoint(double.url, engine))
    client = driven.generate()
    driven.drain()
    ended(client, StopReason.ERROR)
    assert client.failure.code is ErrorCode.REMOTE_ERROR and "boom" in client.failure.message
    assert client.text == "Hel" and len(double.received) == 1


def test_a_line_longer_than_the_limit_fails_instead_of_being_buffered(
    serve: Serve, cores: Cores, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replies_module, "MAX_LINE_BYTES", 256)

    async def handler(got: Received, reply: Reply) -> None:
        await head(reply, LLAMA)
        await reply.send('data: {"content": "')
        # Never a newline, and never a silence the idle timeout would catch: only the limit ends this.
        for _ in range(1000):
            if got.closed.is_set():
                return
            await reply.send("x" * 1000)
        await reply.hold()

    double = serve(handler)
    driven = cores(endpoint(double.url))
    client = driven.generate()
    driven.drain()
    ended(client, StopReason.ERROR)
    assert client.failure.code is ErrorCode.REMOTE_ERROR and "longer than 256 bytes" in client.failure.message
    assert double.received[0].closed.wait(STEP_TIMEOUT_S)


def test_a_stall_past_the_idle_timeout_is_interrupted_and_keeps_the_text_so_far(
    serve: Serve, cores: Cores
) -> None:
    async def handler(got: Received, reply: Reply) -> None:
        await head(reply, LLAMA)
        for text in ("Hel", "lo"):
            await put(reply, LLAMA, piece(LLAMA, text))
        await reply.hold()

    double = serve(handler)
    driven = cores(endpoint(double.url, idle_timeout_s=0.3))
    client = driven.generate()
    driven.drain()
    ended(client, StopReason.ERROR)
    assert client.failure.code is ErrorCode.REMOTE_INTERRUPTED and "idle_timeout_s" in client.failure.message
    assert client.text == "Hello"
    assert double.received[0].closed.wait(STEP_TIMEOUT_S)  # the core let go of the connection


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "reset"])
def test_a_connection_cut_mid_reply_is_interrupted_and_keeps_the_text_so_far(
    serve: Serve, cores: Cores, reset: bool
) -> None:
    shown = threading.Event()

    async def handler(got: Received, reply: Reply) -> None:
        await head(reply, LLAMA)
        await put(reply, LLAMA, piece(LLAMA, "Hello"))
        await until(shown.is_set, what="the text to reach the shell")
        reply.cut(reset=reset)

    double = serve(handler)
    driven = cores(endpoint(double.url))
    client = driven.generate()
    driven.step_until(lambda: client.text, what="the text")
    shown.set()
    driven.drain()
    ended(client, StopReason.ERROR)
    assert client.failure.code is ErrorCode.REMOTE_INTERRUPTED and not client.failure.retryable
    assert client.text == "Hello" and len(double.received) == 1  # no retry after text was sent


@pytest.mark.parametrize("engine", [LLAMA, OPENAI, OLLAMA], ids=lambda e: e.value)
def test_a_stream_that_ends_without_its_end_marker_is_interrupted(
    serve: Serve, cores: Cores, engine: RemoteEngine
) -> None:
    async def handler(got: Received, reply: Reply) -> None:
        await head(reply, engine)
        for text in ("Hel", "lo"):
            await put(reply, engine, piece(engine, text))
        await reply.end()  # a clean end of the body, but no stop / finish_reason and [DONE] / done

    double = serve(handler)
    driven = cores(endpoint(double.url, engine))
    client = driven.generate()
    driven.drain()
    ended(client, StopReason.ERROR)
    assert client.failure.code is ErrorCode.REMOTE_INTERRUPTED and client.text == "Hello"


# -- cancel ---------------------------------------------------------------------------


def test_a_cancel_mid_reply_ends_the_generation_and_closes_the_connection(serve: Serve, cores: Cores) -> None:
    async def handler(got: Received, reply: Reply) -> None:
        await head(reply, LLAMA)
        await put(reply, LLAMA, piece(LLAMA, "Hel"))
        await reply.hold()

    double = serve(handler)
    # An idle timeout far past the wait below: only the cancel can end this generation in time.
    driven = cores(endpoint(double.url, idle_timeout_s=30.0))
    client = driven.generate()
    driven.step_until(lambda: client.text, what="the first piece")
    client.cancel = True
    driven.drain(timeout=2.0)
    ended(client, StopReason.CANCELLED)
    assert client.text == "Hel"
    assert double.received[0].closed.wait(2.0), "the server never saw the connection close"


def test_a_cancel_while_the_server_is_silent_closes_the_connection(serve: Serve, cores: Cores) -> None:
    async def handler(got: Received, reply: Reply) -> None:
        await reply.hold()  # a long prefill: not even the status line yet

    double = serve(handler)
    driven = cores(endpoint(double.url, idle_timeout_s=30.0))
    client = driven.generate()
    wait_until(lambda: double.received, timeout=STEP_TIMEOUT_S, interval=0.01, what="the request to arrive")
    client.cancel = True
    driven.drain(timeout=2.0)
    ended(client, StopReason.CANCELLED)
    assert double.received[0].closed.wait(2.0), "the server never saw the connection close"


# -- describe() -------------------------------------------------------------------------


def routes(table: dict[str, Callable[[Reply], Any]]) -> Handler:
    """A handler answering each path from `table`, 404 elsewhere."""

    async def handler(got: Received, reply: Reply) -> None:
        answer = table.get(got.path)
        await (answer(reply) if answer else reply.answer(404, "File Not Found", reason="Not Found"))

    return handler


def test_describe_takes_the_llama_servers_context_template_and_tokens_from_props(
    serve: Serve, cores: Cores
) -> None:
    props = {"default_generation_settings": {"n_ctx": 8192}, "chat_template": "{{ bos_token }}{{ messages }}",
             "bos_token": "<s>", "eos_token": "</s>", "model_path": "/models/tiny-q4.gguf"}  # fmt: skip
    models = {"data": [{"id": "tiny", "meta": {"n_ctx_train": 32768, "n_vocab": 32000, "n_params": 1000}}]}
    double = serve(
        routes({"/props": lambda r: r.answer(200, props), "/v1/models": lambda r: r.answer(200, models)})
    )
    description = cores(endpoint(double.url), n_ctx=0).core.describe()
    assert description.n_ctx == 8192 and description.n_ctx_train == 32768 and description.n_vocab == 32000
    assert description.chat_template == props["chat_template"] and description.has_chat_template
    assert (description.bos_token, description.eos_token) == ("<s>", "</s>")
    assert description.gguf_name == "tiny-q4.gguf" and description.name == "m"


def test_describe_names_the_models_an_openai_server_has_when_it_lacks_the_configured_one(
    serve: Serve, cores: Cores
) -> None:
    models = {"object": "list", "data": [{"id": "qwen-7b"}, {"id": "llama-8b"}]}
    double = serve(routes({"/v1/models": lambda r: r.answer(200, models)}))
    with pytest.raises(RemoteUnavailable) as raised:
        cores(endpoint(double.url, OPENAI, model="mistral")).core.describe()
    assert all(name in str(raised.value) for name in ("mistral", "qwen-7b", "llama-8b", "`model`"))


def test_describe_says_to_pull_a_model_ollama_does_not_have(serve: Serve, cores: Cores) -> None:
    double = serve(routes({"/api/show": lambda r: r.answer(404, {"error": "model 'm1' not found"})}))
    with pytest.raises(RemoteUnavailable, match="ollama pull m1"):
        cores(endpoint(double.url, OLLAMA), n_ctx=2048).core.describe()


def test_describe_of_a_server_nobody_listens_for_says_to_check_it_and_the_url(
    cores: Cores, refused_url: str
) -> None:
    with pytest.raises(RemoteUnavailable) as raised:
        cores(endpoint(refused_url)).core.describe()
    assert "is the server running" in str(raised.value) and "`url`" in str(raised.value)


@pytest.mark.parametrize(("body", "content_type"), [
    ("<html><body>A web app</body></html>", "text/html"),
    ("null", "application/json"),
    (["a", "list"], "application/json"),
], ids=["html", "json-null", "json-list"])  # fmt: skip
def test_describe_of_a_server_that_is_not_llama_server_says_the_engine_may_be_wrong(
    serve: Serve, cores: Cores, body: Any, content_type: str
) -> None:
    double = serve(routes({"/props": lambda r: r.answer(200, body, content_type=content_type)}))
    with pytest.raises(RemoteUnavailable, match="is `engine` right"):
        cores(endpoint(double.url)).core.describe()


def test_describe_of_a_server_without_props_says_the_engine_may_be_wrong(serve: Serve, cores: Cores) -> None:
    double = serve(routes({}))
    with pytest.raises(RemoteUnavailable, match="404") as raised:
        cores(endpoint(double.url)).core.describe()
    assert "is `engine` right" in str(raised.value) and "/props" in str(raised.value)


def test_the_double_reports_a_broken_script() -> None:
    """The fixture's check of `errors` is what makes a handler's failed wait fail its test."""

    async def handler(got: Received, reply: Reply) -> None:
        raise RuntimeError("script bug")

    double = HttpDouble(handler)
    try:
        with pytest.raises(httpx.HTTPError):
            httpx.post(double.url + "/x", content=json.dumps({}), timeout=2.0)
    finally:
        double.close()
    assert double.errors == ["RuntimeError: script bug"]


# -- counting tokens ----------------------------------------------------------------------


def count_with(driven: Any, text: str) -> FromWorker:
    answers: list[FromWorker] = []
    driven.core.count_tokens(CountTokens(request_id="c1", text=text), answers.append)
    driven.step_until(lambda: answers, what="the count")
    [answer] = answers
    return answer


def test_a_count_is_the_llama_servers_own_tokenization_of_the_prompt(serve: Serve, cores: Cores) -> None:
    double = serve(routes({"/tokenize": lambda r: r.answer(200, {"tokens": [1, 2, 3, 4]})}))
    answer = count_with(cores(endpoint(double.url)), "<|im_start|>user\nhi")
    assert answer == TokenCount(request_id="c1", count=4)
    body = double.received[0].json()
    assert body["content"] == "<|im_start|>user\nhi" and body["add_special"] is True


def test_a_count_reads_vllms_tokenize_answer(serve: Serve, cores: Cores) -> None:
    double = serve(routes({"/tokenize": lambda r: r.answer(200, {"count": 7, "max_model_len": 4096})}))
    answer = count_with(cores(endpoint(double.url, OPENAI)), "hello")
    assert answer == TokenCount(request_id="c1", count=7) and double.received[0].json()["prompt"] == "hello"


@pytest.mark.parametrize("engine", [OPENAI, OLLAMA])
def test_a_server_without_a_tokenizer_route_says_so_instead_of_a_count(
    serve: Serve, cores: Cores, engine: RemoteEngine
) -> None:
    double = serve(routes({}))
    answer = count_with(cores(endpoint(double.url, engine)), "hello")
    assert isinstance(answer, RequestFailed) and answer.code is ErrorCode.REMOTE_ERROR
    assert "tokenize" in answer.message or "count" in answer.message
    assert len(double.received) == (1 if engine is OPENAI else 0)  # Ollama is not even asked


# -- chat mode ------------------------------------------------------------------------------


CONVERSATION = json.dumps({"messages": [
    {"role": "system", "content": "be brief"}, {"role": "user", "content": "12 times 34?"},
    {"role": "assistant", "content": "<tool_call>{...}</tool_call>"},
    {"role": "tool", "content": "408", "name": "calculator"}],
    "tools": [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]})  # fmt: skip


def test_chat_mode_posts_the_messages_and_writes_the_server_s_tool_calls_back_as_text(
    serve: Serve, cores: Cores
) -> None:
    async def handler(got: Received, reply: Reply) -> None:
        await head(reply, OPENAI)
        chunk = {"id": "c", "object": "chat.completion.chunk", "model": "m1"}
        await reply.event({**chunk, "choices": [{"index": 0, "delta": {"content": "Let me check."}}]})
        for fragment in ('{"expres', 'sion": "1+1"}'):
            await reply.event({**chunk, "choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "function": {"name": "calculator" if "expres" in fragment else None,
                                          "arguments": fragment}}]}}]})  # fmt: skip
        await reply.event({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
        await reply.event({**chunk, "choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 9}})
        await reply.send("data: [DONE]\n\n")
        await reply.end()

    double = serve(handler)
    driven = cores(endpoint(double.url, OPENAI, mode=RemoteMode.CHAT))
    client = driven.generate(CONVERSATION)
    driven.drain()
    stats = ended(client, StopReason.STOP)
    assert client.text == 'Let me check.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+1"}}\n</tool_call>'
    assert (stats.prompt_tokens, stats.completion_tokens) == (30, 9)
    body = double.received[0].json()
    assert double.received[0].path == "/v1/chat/completions" and body["tools"][0]["function"]["name"] == "calculator"
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert body["messages"][-1]["content"] == "[calculator returned]\n408"


def test_chat_mode_on_ollama_keeps_tool_messages_and_reads_its_whole_calls(serve: Serve, cores: Cores) -> None:
    async def handler(got: Received, reply: Reply) -> None:
        await head(reply, OLLAMA)
        await reply.line({"model": "m1", "message": {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "calculator", "arguments": {"expression": "2*3"}}}]}, "done": False})  # fmt: skip
        await reply.line({"model": "m1", "message": {"role": "assistant", "content": ""}, "done": True,
                          "done_reason": "stop", "prompt_eval_count": 12, "eval_count": 5})  # fmt: skip
        await reply.end()

    double = serve(handler)
    driven = cores(endpoint(double.url, OLLAMA, mode=RemoteMode.CHAT))
    client = driven.generate(CONVERSATION)
    driven.drain()
    ended(client, StopReason.STOP)
    assert client.text == '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2*3"}}\n</tool_call>'
    body = double.received[0].json()
    assert double.received[0].path == "/api/chat" and body["messages"][-1] == {
        "role": "tool", "content": "408", "tool_name": "calculator"}  # fmt: skip


def test_a_chat_mode_prompt_that_is_not_a_conversation_is_refused(serve: Serve, cores: Cores) -> None:
    double = serve(routes({}))
    driven = cores(endpoint(double.url, OPENAI, mode=RemoteMode.CHAT))
    client = driven.generate("plain text, not the JSON a chat-mode formatter writes")
    driven.drain()
    ended(client, StopReason.ERROR)
    assert client.failure.code is ErrorCode.INVALID_REQUEST and not double.received


def test_a_key_that_is_not_one_printable_line_is_refused_without_being_quoted(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk-SECRET123\n# my note\n")
    key_file.chmod(0o600)
    with pytest.raises(RemoteUnavailable) as refused:
        read_api_key(RemoteEndpoint(engine=OPENAI, url="http://h:1", api_key_file=str(key_file)))
    assert refused.value.step == "api key" and "SECRET" not in str(refused.value)
    with pytest.raises(RemoteUnavailable):
        read_api_key(RemoteEndpoint(engine=OPENAI, url="http://h:1", api_key_env="K"), {"K": "sk-ünicode"})


def test_a_redirect_is_an_error_to_fix_not_a_stream(serve: Serve, cores: Cores) -> None:
    async def handler(got: Received, reply: Reply) -> None:
        await reply.answer(301, "", reason="Moved Permanently", headers={"Location": "https://elsewhere/"})

    double = serve(handler)
    driven = cores(endpoint(double.url))
    client = driven.generate()
    driven.drain()
    ended(client, StopReason.ERROR)
    assert client.failure.code is ErrorCode.REMOTE_ERROR and "301" in client.failure.message


def test_a_chat_reply_retried_after_a_cut_starts_its_tool_call_afresh(
    serve: Serve, cores: Cores, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core_module, "RETRY_DELAY_S", 0.0)
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": "m1"}

    def call_part(name: str | None, arguments: str) -> dict[str, Any]:
        return {**chunk, "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"name": name, "arguments": arguments}}]}}]}  # fmt: skip

    async def handler(got: Received, reply: Reply) -> None:
        await head(reply, OPENAI)
        await reply.event(call_part("calculator", '{"expres'))
        if len(double.received) == 1:  # the first attempt is cut before any text
            reply.cut()
            return
        await reply.event(call_part(None, 'sion": "1+1"}'))
        await reply.event({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
        await reply.send("data: [DONE]\n\n")
        await reply.end()

    double = serve(handler)
    driven = cores(endpoint(double.url, OPENAI, mode=RemoteMode.CHAT))
    client = driven.generate(CONVERSATION)
    driven.drain()
    ended(client, StopReason.STOP)
    assert len(double.received) == 2
    assert client.text == '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+1"}}\n</tool_call>'


def test_a_malformed_chat_tool_call_is_a_remote_error(serve: Serve, cores: Cores) -> None:
    async def handler(got: Received, reply: Reply) -> None:
        await head(reply, OPENAI)
        await reply.event({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": None, "function": 3}]}}]})
        await reply.end()

    double = serve(handler)
    driven = cores(endpoint(double.url, OPENAI, mode=RemoteMode.CHAT))
    client = driven.generate(CONVERSATION)
    driven.drain()
    ended(client, StopReason.ERROR)
    assert client.failure.code is ErrorCode.REMOTE_ERROR and "tool call" in client.failure.message


def test_log_probabilities_are_refused_not_silently_dropped(serve: Serve, cores: Cores) -> None:
    double = serve(llama_reply("never sent"))
    driven = cores(endpoint(double.url))
    client = driven.generate(logprobs=2)
    assert client.failure.code is ErrorCode.INVALID_REQUEST and "log-probabilities" in client.failure.message
    assert client.finished.stop_reason is StopReason.ERROR and not double.received and driven.core.active == 0


def test_a_context_larger_than_the_server_gives_a_request_is_cut_to_the_server_s(serve: Serve, cores: Cores) -> None:
    props = {"default_generation_settings": {"n_ctx": 2048}, "chat_template": "", "bos_token": "", "eos_token": ""}
    double = serve(routes({"/props": lambda r: r.answer(200, props)}))
    assert cores(endpoint(double.url), n_ctx=16384).core.describe().n_ctx == 2048


def test_a_remote_reply_that_loops_is_cut_where_the_loop_began_and_the_server_let_go(
    serve: Serve, cores: Cores
) -> None:
    async def handler(got: Received, reply: Reply) -> None:
        await head(reply, LLAMA)
        for text in ["So", ",", " that", "'s", " me", "."] + [" That", "'s", " me", "."] * 40:
            if got.closed.is_set():
                return
            await put(reply, LLAMA, piece(LLAMA, text))
        await reply.hold()

    double = serve(handler)
    driven = cores(endpoint(double.url, idle_timeout_s=5.0))
    client = driven.generate(max_tokens=500)
    driven.drain()
    ended(client, StopReason.REPETITION)
    keep = client.finished.keep_chars
    assert keep is not None and client.text[:keep].startswith("So, that's me.") and keep < 30  # one span kept
    assert client.finished.completion_tokens < 60  # cut long before the 166 events or the 500 tokens
    assert double.received[0].closed.wait(STEP_TIMEOUT_S)  # the loop was not left running on the server
