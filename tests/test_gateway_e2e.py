"""The HTTP gateway through the real processes: `bastion up --http`, a real supervisor, real workers
with SmolLM2 or scripted models, real sockets, and real clients: the `openai` SDK (sync and async),
the `ollama` client, and the `llm` command pointed at the gateway. The routes' rules are tested
in-process in test_gateway_inprocess.py; here they must hold over the wire.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from bastion.protocol import HomeLayout, WorkerState
from bastion.protocol.control import GetStatus, StatusReport
from tests.e2e_support import Bastion, wait_for_supervisor, write_config
from tests.scripted import script
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
CALL_REPLY = 'I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
LONG_STORY = [{"role": "user", "content": "Write a very long story about a dragon and a lighthouse."}]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_http(bastion: Bastion, *extra: str) -> str:
    """`bastion up --http` on a free loopback port; the gateway's base URL."""
    port = free_port()
    done = bastion("up", "--http", f"127.0.0.1:{port}", *extra)
    assert done.returncode == 0, done.stderr
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def gateway(shared_bastion: Bastion) -> str:
    return serve_http(shared_bastion)


def read_until_content(response: httpx.Response) -> Iterator[str]:
    """Read the stream up to its first content chunk; the line iterator, for the caller to hold.

    A `for` over a temporary `iter_lines()` that breaks lets the iterator be finalised at once,
    and closing it can close the connection: the server would see the client leave there and
    then, instead of where the test means it to."""
    lines = response.iter_lines()
    for line in lines:  # ends with the stream at the latest
        if '"content": "' in line:
            break
    return lines


def client_of(base: str, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", **options)


@pytest.mark.real_model
def test_the_openai_sdk_chats_with_smollm2_streamed_and_not_and_the_cache_is_reused(gateway: str) -> None:
    client = client_of(gateway)
    messages: list[Any] = [{"role": "system", "content": "You are brief."},
                           {"role": "user", "content": "Name a colour."}]  # fmt: skip
    first = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=16, temperature=0)
    assert first.choices[0].message.content and first.choices[0].finish_reason in ("stop", "length")
    assert first.usage is not None and first.usage.completion_tokens > 0
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And another one?"}]
    pieces, usage = [], None
    for chunk in client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=16,
                                                temperature=0, stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert pieces and usage is not None
    # The stateless client resent the history; the worker still had all of it but the new turn.
    assert usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


@pytest.mark.real_model
def test_smollm2_s_log_probabilities_reach_the_openai_sdk(gateway: str) -> None:
    """Greedy sampling picks the most likely token, so each token's report, read from SmolLM2's
    logits in the worker, lists the chosen token first; the tokens spell the reply."""
    client = client_of(gateway)
    reply = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Name a colour."}],
                                           max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)  # fmt: skip
    tokens = reply.choices[0].logprobs.content
    assert b"".join(bytes(t.bytes) for t in tokens).decode() == reply.choices[0].message.content
    assert len(tokens) == reply.usage.completion_tokens
    for token in tokens:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        assert token.top_logprobs[0].token == token.token and token.top_logprobs[0].logprob == token.logprob
    assert any(token.logprob < -1e-3 for token in tokens)  # a real distribution, not a replayed script


@pytest.mark.real_model
def test_interleaved_stateless_chats_each_find_their_own_cached_prefix(gateway: str) -> None:
    client = client_of(gateway)
    chats: dict[str, list[Any]] = {
        topic: [{"role": "system", "content": f"You talk about {topic}."},
                {"role": "user", "content": f"Tell me one thing about {topic}. " * 20}]
        for topic in ("owls", "rivers")
    }  # fmt: skip
    first: dict[str, Any] = {}
    for topic, messages in chats.items():  # owls, then rivers: the worker now holds the rivers chat
        first[topic] = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=16,
                                                      temperature=0)  # fmt: skip
        messages += [{"role": "assistant", "content": first[topic].choices[0].message.content},
                     {"role": "user", "content": "And another?"}]
    for topic, messages in chats.items():
        second = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=16,
                                                temperature=0)  # fmt: skip
        # Each chat's earlier turn came back from its own KV snapshot, not from a fresh prefill.
        assert second.usage.prompt_tokens_details.cached_tokens >= first[topic].usage.prompt_tokens, topic


@pytest.mark.real_model
def test_json_schema_output_from_smollm2_parses(gateway: str) -> None:
    schema = {"type": "object", "properties": {"colour": {"type": "string"}, "count": {"type": "integer"}},
              "required": ["colour", "count"], "additionalProperties": False}  # fmt: skip
    answer = client_of(gateway).chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Give a colour and a count as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}},
        max_tokens=48, temperature=0)  # fmt: skip
    parsed = json.loads(answer.choices[0].message.content)
    assert set(parsed) == {"colour", "count"} and isinstance(parsed["count"], int)


@pytest.mark.real_model
def test_required_tool_choice_makes_smollm2_call_the_client_s_tool(gateway: str) -> None:
    assert_required_call_to_weather(gateway, "smollm2-135m")


def assert_required_call_to_weather(gateway: str, model: str) -> None:
    """Asked about the weather with `get_weather` required, `model` answers with one valid call to it."""
    answer = client_of(gateway).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL], tool_choice="required", temperature=0)  # fmt: skip
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)


def test_async_sdk_tool_call_round_trip_and_error_mapping_over_the_wire(gateway: str, tmp_path: Path) -> None:
    model = script(tmp_path, CALL_REPLY, "It is sunny in Paris.")

    async def talk() -> None:
        client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)
        messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
        async with client.chat.completions.stream(model=model, messages=messages, tools=[WEATHER_TOOL]) as stream:
            first = await stream.get_final_completion()
        [call] = first.choices[0].message.tool_calls
        messages += [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
        second = await client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL])
        assert second.choices[0].message.content == "It is sunny in Paris."
        assert second.usage.prompt_tokens_details.cached_tokens > 0.8 * second.usage.prompt_tokens
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="no-such-model", messages=messages)
        await client.close()

    asyncio.run(talk())


@pytest.mark.real_model
def test_the_ollama_client_chats_generates_and_lists(gateway: str) -> None:
    client = ollama.Client(host=gateway)
    reply = client.chat(model="smollm2-135m", messages=[{"role": "user", "content": "Say hi."}],
                        options={"temperature": 0, "num_predict": 12})  # fmt: skip
    assert reply.message.content and reply.done and reply.eval_count and reply.eval_count <= 12
    parts = list(client.generate(model="smollm2-135m", prompt="Once upon a time", raw=True, stream=True,
                                 options={"num_predict": 8}))  # fmt: skip
    assert parts[-1].done and "".join(p.response for p in parts)
    assert "smollm2-135m" in [m.model for m in client.list().models]
    loaded = {m.model: m for m in client.ps().models}
    assert loaded["smollm2-135m"].context_length == 4096


@pytest.mark.real_model
def test_llm_configured_for_an_openai_compatible_server_uses_the_gateway(gateway: str, tmp_path: Path) -> None:
    config = tmp_path / "llm"
    config.mkdir()
    (config / "extra-openai-models.yaml").write_text(
        f'- model_id: bastion-smollm2\n  model_name: smollm2-135m\n  api_base: "{gateway}/v1"\n')
    llm = str(Path(sys.executable).with_name("llm"))
    done = subprocess.run([llm, "-m", "bastion-smollm2", "Say hi.", "-o", "max_tokens", "12", "-o", "temperature", "0"],
                          env={**os.environ, "LLM_USER_PATH": str(config)}, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_bad_requests_over_the_wire(gateway: str) -> None:
    with httpx.Client(base_url=gateway, timeout=30) as http:
        assert http.post("/v1/chat/completions", content=b"{").status_code == 400
        wrong = http.post("/v1/chat/completions", json={"messages": "hello"})
        assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "messages"
        huge = http.post("/v1/chat/completions", content=b"x" * (9 * 1024 * 1024))
        assert huge.status_code == 413
        unknown = http.post("/api/chat", json={"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]})
        assert unknown.status_code == 404 and "no-such-model" in unknown.json()["error"]
        assert http.get("/health").json()["status"] == "ok"


@pytest.mark.real_model
def test_a_client_that_disconnects_mid_stream_stops_its_generation(shared_bastion: Bastion, gateway: str) -> None:
    with httpx.Client(base_url=gateway, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json={
                "model": "smollm2-135m", "messages": LONG_STORY, "max_tokens": 2000, "ignore_eos": True,
                "stream": True}) as response:
            _held = read_until_content(response)
            assert shared_bastion.models()["smollm2-135m"].state is WorkerState.BUSY
        closed = time.monotonic()
    status = shared_bastion.wait_for_model("smollm2-135m", lambda m: m.state is WorkerState.IDLE, timeout=10)
    idle_after = time.monotonic() - closed
    assert status.state is WorkerState.IDLE
    # Measured here: 40-100 ms including the polling itself; bounded loosely for a loaded machine.
    assert idle_after < 2.0, f"the worker was still busy {idle_after:.2f} s after the client left"


def test_an_api_key_is_required_off_loopback_and_checked_on_it(bastion: Bastion) -> None:
    refused = subprocess.run([sys.executable, "-m", "bastion.gateway", "--host", "0.0.0.0", "--port", "1"],
                             env=bastion.env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 2 and "API key" in refused.stderr
    cli_refused = bastion("up", "--http", "0.0.0.0:1")
    assert cli_refused.returncode == 2 and "API key" in cli_refused.stderr
    key_file = bastion.home.parent / "key"
    key_file.write_text("s3cret\n")
    base = serve_http(bastion, "--api-key-file", str(key_file))
    with httpx.Client(base_url=base, timeout=30) as http:
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert http.get("/health").status_code == 200
    # The key never appears on a command line.
    assert not any("s3cret" in " ".join(p.cmdline()) for p in bastion.processes())


@pytest.mark.real_model
def test_a_killed_gateway_s_generations_stop_in_the_worker(bastion: Bastion) -> None:
    """Its HTTP clients cannot cancel through a dead gateway: the supervisor sees the process go."""
    base = serve_http(bastion)
    gateway_pid = int(HomeLayout(bastion.home).gateway_pid_file.read_text())
    with httpx.Client(base_url=base, timeout=60) as http, http.stream("POST", "/v1/chat/completions", json={
            "model": "smollm2-135m", "messages": LONG_STORY, "max_tokens": 2000, "ignore_eos": True,
            "stream": True}) as response:  # fmt: skip
        _held = read_until_content(response)
        assert bastion.models()["smollm2-135m"].state is WorkerState.BUSY
        os.kill(gateway_pid, signal.SIGKILL)
        killed = time.monotonic()
    status = bastion.wait_for_model("smollm2-135m", lambda m: m.state is WorkerState.IDLE, timeout=30)
    idle_after = time.monotonic() - killed
    assert status.state is WorkerState.IDLE and idle_after < 1.0, f"busy for {idle_after:.2f} s after the kill"


def test_the_gateway_outlives_a_supervisor_restart(bastion: Bastion, tmp_path: Path) -> None:
    base = serve_http(bastion)
    model = script(tmp_path, "First.", "Second.")
    client = client_of(base, max_retries=0)
    assert client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}]) \
        .choices[0].message.content == "First."
    status = bastion.ask(GetStatus(request_id="status"))
    assert isinstance(status, StatusReport)
    supervisor_pid = status.pid
    subprocess.run([sys.executable, "-c", f"import os, signal; os.kill({supervisor_pid}, signal.SIGKILL)"], check=True)
    with httpx.Client(base_url=base, timeout=30) as http:
        wait_until(lambda: http.get("/health").status_code == 503, timeout=30, what="/health to report the loss")
        down = http.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "x"}]})
        assert down.status_code == 503 and down.headers["retry-after"]
        assert bastion("up").returncode == 0
        wait_until(lambda: http.get("/health").status_code == 200, timeout=30, what="/health to recover")
    # A new supervisor, a new worker: the scripted model replays from its first reply.
    assert client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}]) \
        .choices[0].message.content == "First."
    # `bastion down` stops the gateway it started too.
    assert bastion("down").returncode == 0
    assert not [p for p in bastion.processes() if "bastion.gateway" in " ".join(p.cmdline())]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/health", timeout=5)


@pytest.mark.real_model
def test_twenty_concurrent_streams_on_one_model_complete_or_are_told_busy(bastion: Bastion) -> None:
    supervisor = subprocess.Popen([sys.executable, "-m", "bastion.supervisor", "--max-queued-per-worker", "6"],
                                  env=bastion.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for_supervisor(bastion, supervisor.pid)
        assert bastion("load", "smollm2-135m").returncode == 0
        base = serve_http(bastion)
        results: list[tuple[str, Any]] = [("", None)] * 20
        clients = [httpx.Client(base_url=base, timeout=120) for _ in range(20)]  # made before the race
        start = threading.Barrier(20)

        def one(index: int) -> None:
            start.wait(30)
            response = clients[index].post("/v1/chat/completions", json={
                "model": "smollm2-135m", "stream": True, "max_tokens": 48, "temperature": 0,
                "messages": [{"role": "user", "content": f"Tell me fact number {index} about owls."}]})
            results[index] = ("busy", response) if response.status_code == 429 else ("done", response)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        for client in clients:
            client.close()
        done = [response for kind, response in results if kind == "done"]
        busy = [response for kind, response in results if kind == "busy"]
        assert len(done) + len(busy) == 20 and busy, "with a queue of 6, twenty at once must overflow it"
        for response in busy:
            assert int(response.headers["retry-after"]) >= 1 and response.json()["error"]["type"] == "rate_limit_error"
        for response in done:
            assert response.status_code == 200
            chunks = [json.loads(line[6:]) for line in response.text.splitlines()
                      if line.startswith("data: {")]  # fmt: skip
            assert response.text.rstrip().endswith("data: [DONE]")
            assert len({chunk["id"] for chunk in chunks}) == 1  # nothing of another stream mixed in
            finishes = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
            assert len(finishes) == 1
            assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    finally:
        bastion("down")
        supervisor.wait(timeout=30)


def test_bastion_serve_runs_the_gateway_in_the_foreground(bastion: Bastion) -> None:
    port = free_port()
    process = bastion.popen("serve", "--port", str(port))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            def healthy() -> bool:
                try:
                    return http.get("/health").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(healthy, timeout=60, what="`bastion serve` to answer")
    finally:
        process.terminate()
        # uvicorn shuts down cleanly, then lets SIGTERM end the process as it would have.
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)


@pytest.mark.real_model
def test_four_streams_on_a_parallel_model_decode_together_and_each_answers_as_alone(bastion: Bastion) -> None:
    """`parallel = 4`: four gateway clients share one worker's context, each in its own sequence;
    the streams overlap in time, and each reply is the one the same request gets alone."""
    write_config(bastion, "[models.smollm2-135m]\nparallel = 4\n")
    base = serve_http(bastion)
    client = client_of(base, timeout=120)
    questions = [f"Name {thing} and say one thing about it." for thing in ("a river", "a bird", "a tree", "a star")]

    def ask(question: str, trace: list[float] | None = None) -> str:
        text = ""
        for chunk in client.chat.completions.create(
                model="smollm2-135m", stream=True, max_tokens=32, temperature=0,
                messages=[{"role": "user", "content": question}]):
            piece = chunk.choices[0].delta.content if chunk.choices else None
            if piece and trace is not None and not trace:
                trace.append(time.monotonic())
            text += piece or ""
        if trace is not None:
            trace.append(time.monotonic())
        return text

    alone = [ask(question) for question in questions]
    traces: list[list[float]] = [[] for _ in questions]
    replies = [""] * len(questions)
    start = threading.Barrier(len(questions))

    def concurrent(index: int) -> None:
        start.wait(30)
        replies[index] = ask(questions[index], traces[index])

    threads = [threading.Thread(target=concurrent, args=(i,)) for i in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert replies == alone and all(alone)
    first_tokens, ends = [t[0] for t in traces], [t[-1] for t in traces]
    assert max(first_tokens) < min(ends), "every stream had begun before any ended: they were decoded together"
    table = bastion("ps").stdout
    assert "4 × 4096" in table, table
