"""The HTTP gateway's routes in-process: the real app and the real `openai` and `ollama` clients
over an in-process supervisor (tests/gateway_support.py). Shapes, streaming invariants, tool
calls, errors, limits and the API key; the real processes and sockets are test_gateway_e2e.py's.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from bastion.protocol.sessions import SessionDetail, ShowSession
from bastion.protocol.trust import ApprovalRequired
from tests.gateway_support import BASE_URL, gateway_client, gateway_transport
from tests.inprocess import InProcessSupervisor, script

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
CALL_REPLY = 'I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def sse_chunks(body: str) -> list[Any]:
    """The `data:` payloads of an SSE body, in order ("[DONE]" kept as a string)."""
    out = []
    for block in body.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def openai_client(http: httpx.AsyncClient, **options: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{BASE_URL}/v1", api_key="unused", http_client=http, **options)


def test_a_streamed_chat_keeps_the_invariants_llama_cpp_s_server_tests_check(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, "Hello there, friend.")

    async def test(sup: InProcessSupervisor) -> None:
        async with gateway_client(sup) as http:
            response = await http.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": "Hi"}], "stream": True,
                "stream_options": {"include_usage": True}})  # fmt: skip
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        chunks = sse_chunks(response.text)
        assert chunks[-1] == "[DONE]"
        objects = chunks[:-1]
        assert len({chunk["id"] for chunk in objects}) == 1  # one id on every chunk
        with_choices = [chunk for chunk in objects if chunk["choices"]]
        roles = [c for c in with_choices if "role" in c["choices"][0]["delta"]]
        assert roles == with_choices[:1]  # the role only in the first chunk
        contents = [c["choices"][0]["delta"]["content"] for c in with_choices[1:] if "content" in c["choices"][0]["delta"]]
        assert all(contents) and "".join(contents) == "Hello there, friend."  # non-empty deltas
        finish = with_choices[-1]["choices"][0]
        assert finish["delta"] == {} and finish["finish_reason"] == "stop"
        usage = objects[-1]
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
        assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"]

    supervised(test)


def test_the_openai_sdk_does_a_tool_call_round_trip_and_the_prompt_stays_cached(
    supervised, tmp_path: Path
) -> None:
    model = script(tmp_path, CALL_REPLY, "It is sunny in Paris.")

    async def test(sup: InProcessSupervisor) -> None:
        async with gateway_client(sup) as http:
            client = openai_client(http)
            messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
            # The SDK's stream helper assembles the tool-call deltas: a conformance check of their shape.
            async with client.chat.completions.stream(model=model, messages=messages, tools=[WEATHER_TOOL]) as stream:
                async for _ in stream:
                    pass
                first = await stream.get_final_completion()
            choice = first.choices[0]
            assert choice.finish_reason == "tool_calls" and choice.message.content == "I will check.\n"
            [call] = choice.message.tool_calls
            assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
            messages += [choice.message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
            second = await client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL])
        assert second.choices[0].message.content == "It is sunny in Paris."
        assert second.choices[0].finish_reason == "stop"
        first_prompt, second_prompt = sup.workers.prompts()
        assert second_prompt.startswith(first_prompt + CALL_REPLY)  # the reply exactly as generated

    supervised(test)


def test_json_output_and_a_named_tool_reach_the_worker_as_grammars(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, '{"city": "Paris"}', CALL_REPLY)
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}

    async def test(sup: InProcessSupervisor) -> None:
        async with gateway_client(sup) as http:
            client = openai_client(http)
            shaped = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "City?"}],
                response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
            forced = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL],
                tool_choice={"type": "function", "function": {"name": "get_weather"}})  # fmt: skip
        assert json.loads(shaped.choices[0].message.content) == {"city": "Paris"}
        assert forced.choices[0].message.tool_calls[0].function.name == "get_weather"
        output, call = sup.workers.grammars()
        assert output.schema == schema and not output.lazy
        assert not call.lazy and "get_weather" in json.dumps(call.schema)

    supervised(test)


def test_errors_have_openai_s_shape_and_status(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, "unused")
    chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}

    async def test(sup: InProcessSupervisor) -> None:
        async with gateway_client(sup, max_body_bytes=4096, max_messages=8) as http:
            cases = [
                (await http.post("/v1/chat/completions", content=b"{not json"), 400, None),
                (await http.post("/v1/chat/completions", json=[1, 2]), 400, None),
                (await http.post("/v1/chat/completions", json={**chat, "temperature": "hot"}), 400, "temperature"),
                (await http.post("/v1/chat/completions", json={"model": model, "messages": []}), 400, "messages"),
                (await http.post("/v1/chat/completions", json={**chat, "n": 2}), 400, "n"),
                (await http.post("/v1/chat/completions", json={**chat, "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}), 400,
                 "messages.0.content"),
                (await http.post("/v1/chat/completions", json={**chat, "messages": chat["messages"] * 9}), 400,
                 "messages"),
                (await http.post("/v1/chat/completions", content=b"x" * 5000), 413, None),
                (await http.post("/v1/chat/completions", json={**chat, "model": "no-such-model"}), 404, None),
                (await http.post("/v1/chat/completions", json={**chat, "tools": [WEATHER_TOOL],
                                                               "tool_choice": {"type": "function",
                                                                               "function": {"name": "teleport"}}}),
                 400, None),
                (await http.get("/v1/models/no-such-model"), 404, None),
            ]  # fmt: skip
            for response, status, param in cases:
                assert response.status_code == status, response.text
                error = response.json()["error"]
                assert error["message"] and error["type"]
                if param is not None:
                    assert error["param"] == param, error
            # The SDK maps them onto its exception types.
            client = openai_client(http, max_retries=0)
            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.create(model="no-such-model", messages=chat["messages"])
            with pytest.raises(openai.BadRequestError):
                await client.chat.completions.create(model=model, messages=chat["messages"], n=2)
        assert sup.workers.prompts() == []  # none of them reached a model

    supervised(test)


def test_the_api_key_guards_every_route_but_health(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, "Hello.")

    async def test(sup: InProcessSupervisor) -> None:
        async with gateway_client(sup, api_key="s3cret") as http:
            assert (await http.get("/health")).status_code == 200
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
                for route in ("/v1/models", "/api/tags", "/metrics"):
                    refused = await http.get(route, headers=headers)
                    assert refused.status_code == 401, (route, headers)
                    assert refused.headers["www-authenticate"] == "Bearer"
            assert (await http.get("/api/tags")).json() == {"error": (await http.get("/api/tags")).json()["error"]}
            client = openai.AsyncOpenAI(base_url=f"{BASE_URL}/v1", api_key="s3cret", http_client=http)
            answer = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}])
            assert answer.choices[0].message.content == "Hello."
            with pytest.raises(openai.AuthenticationError):
                await openai.AsyncOpenAI(base_url=f"{BASE_URL}/v1", api_key="nope", http_client=http,
                                         max_retries=0).models.list()

    supervised(test)


def test_models_and_the_legacy_completions_route(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, " lived a fox.")

    async def test(sup: InProcessSupervisor) -> None:
        async with gateway_client(sup) as http:
            client = openai_client(http)
            listed = [m.id for m in (await client.models.list()).data]
            assert "smollm2-135m" in listed and "gemma3-270m" in listed
            assert (await client.models.retrieve("smollm2-135m")).id == "smollm2-135m"
            text = await client.completions.create(model=model, prompt="Once upon a time", max_tokens=32)
        assert text.choices[0].text == " lived a fox." and text.object == "text_completion"
        assert sup.workers.prompts() == ["Once upon a time"]  # raw: no template

    supervised(test)


def test_a_server_side_agent_run_streams_bastion_s_tool_activity_as_extension_chunks(
    supervised, tmp_path: Path
) -> None:
    call = '```tool_call\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n```'
    model = script(tmp_path, call, "It is 42.", call, "It is 42.")

    async def test(sup: InProcessSupervisor) -> None:
        async with gateway_client(sup, agent_runs=True) as http:
            response = await http.post("/v1/chat/completions", json={
                "model": f"{model}+calculator", "stream": True,
                "messages": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "6*7?"}]})
            collected = await openai_client(http).chat.completions.create(
                model=model, messages=[{"role": "user", "content": "6*7?"}],
                extra_body={"bastion": {"tools": ["calculator"]}})  # fmt: skip
        assert response.status_code == 200
        chunks = [c for c in sse_chunks(response.text) if c != "[DONE]"]
        extension = [c["bastion"] for c in chunks if "bastion" in c]
        assert all(c["choices"] == [] for c in chunks if "bastion" in c)  # standard clients skip them
        kinds = [event["type"] for event in extension]
        assert kinds.index("tool_call") < kinds.index("tool_decision") < kinds.index("tool_end")
        assert next(e for e in extension if e["type"] == "tool_end")["content"] == "42"
        content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert content.endswith("It is 42.")
        assert collected.choices[0].message.content.endswith("It is 42.")
        assert not collected.choices[0].message.tool_calls  # bastion ran them; the client has nothing to run
        assert "Be exact." in sup.workers.prompts()[0]  # the history reached the run

    supervised(test)


async def _ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def test_ollama_routes_with_the_ollama_client(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, "Hello there.", CALL_REPLY, " lived a fox.", "Sure.")

    async def test(sup: InProcessSupervisor) -> None:
        async with (gateway_transport(sup) as transport,
                    httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http):
            client = ollama.AsyncClient(host=BASE_URL, transport=transport)
            parts = [part async for part in await client.chat(
                model=model, messages=[{"role": "user", "content": "Hi"}], stream=True)]  # fmt: skip
            assert "".join(p.message.content for p in parts) == "Hello there." and parts[-1].done
            last = parts[-1]
            assert last.done_reason == "stop" and last.eval_count and last.eval_count > 0
            assert last.prompt_eval_count and last.total_duration and last.eval_duration is not None
            called = await client.chat(model=model, messages=[{"role": "user", "content": "Weather?"}],
                                       tools=[WEATHER_TOOL])  # fmt: skip
            [call] = called.message.tool_calls
            assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
            generated = await client.generate(model=model, prompt="Once upon a time", raw=True)
            assert generated.response == " lived a fox." and generated.done
            assert sup.workers.prompts()[-1] == "Once upon a time"
            templated = await client.generate(model=model, prompt="Go", system="Be brief.")
            assert templated.response == "Sure." and "Be brief." in sup.workers.prompts()[-1]
            assert "smollm2-135m" in [m.model for m in (await client.list()).models]
            assert f"scripted-{Path(model.split(':', 1)[1]).stem}" in [m.model for m in (await client.ps()).models]
            assert (await client.show("smollm2-135m")).capabilities
            with pytest.raises(ollama.ResponseError) as missing:
                await client.chat(model="no-such-model", messages=[{"role": "user", "content": "x"}])
            assert missing.value.status_code == 404
            version = await http.get("/api/version")
            assert version.status_code == 200 and version.json()["version"]
            bad = await http.post("/api/chat", content=b"{")
            assert bad.status_code == 400 and isinstance(bad.json()["error"], str)

    supervised(test)


def test_metrics_count_requests_tokens_and_cache_use(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, "One.", "Two.")

    async def test(sup: InProcessSupervisor) -> None:
        async with gateway_client(sup) as http:
            for _ in range(2):
                await http.post("/v1/chat/completions", json={"model": model, "stream": True,
                                                              "messages": [{"role": "user", "content": "Hi"}]})
            await http.post("/v1/chat/completions", content=b"{")
            text = (await http.get("/metrics")).text
        assert 'bastion_http_requests_total{route="/v1/chat/completions",status="200"} 2' in text
        assert 'bastion_http_requests_total{route="/v1/chat/completions",status="400"} 1' in text
        assert "bastion_time_to_first_token_seconds_count" in text
        assert 'kind="completion"' in text and "bastion_kv_cache_generations_total" in text
        assert "bastion_model_queue_depth" in text and "bastion_model_busy_workers" in text
        assert "bastion_inter_token_seconds_count" in text
        # The first request read its prompt afresh, the second (the same conversation start) found it.
        sources = {line.split('source="')[1].split('"')[0]: line.rsplit(" ", 1)[1]
                   for line in text.splitlines() if line.startswith("bastion_kv_cache_generations_total{")}  # fmt: skip
        assert sum(int(n) for n in sources.values()) == 2 and set(sources) <= {"live", "ram", "disk", "none"}

    supervised(test)


def test_without_a_supervisor_health_and_requests_say_503(tmp_path: Path) -> None:
    from bastion.gateway.app import build_app
    from bastion.gateway.service import GatewaySettings
    from bastion.protocol import HomeLayout

    async def test() -> None:
        app = build_app(GatewaySettings(home=HomeLayout(tmp_path / "no-home")))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL) as http:
            health = await http.get("/health")
            chat = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert health.status_code == 503 and "bastion up" in health.json()["error"]
        assert chat.status_code == 503 and chat.headers["retry-after"] and chat.headers["x-should-retry"] == "true"

    asyncio.run(test())


def test_a_session_header_persists_the_conversation_in_bastion(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, "Hello, Ada.", "Your name is Ada.")

    async def test(sup: InProcessSupervisor) -> None:
        async with gateway_client(sup, agent_runs=True) as http:
            client = openai_client(http, default_headers={"X-Bastion-Session": "ada"})
            messages: list[Any] = [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "My name is Ada."}]  # fmt: skip
            first = await client.chat.completions.create(model=model, messages=messages)
            messages += [{"role": "assistant", "content": first.choices[0].message.content},
                         {"role": "user", "content": "What is my name?"}]
            second = await client.chat.completions.create(model=model, messages=messages)
        assert second.choices[0].message.content == "Your name is Ada."
        shown = await sup.ask(ShowSession(request_id="show", name="ada"))
        assert isinstance(shown, SessionDetail)
        assert [(m.role.value, m.content) for m in shown.messages] == [
            ("system", "Be brief."), ("user", "My name is Ada."), ("assistant", "Hello, Ada."),
            ("user", "What is my name?"), ("assistant", "Your name is Ada."),
        ]  # fmt: skip
        # The second prompt continued the first: the session's history, not the resent copy, rendered it.
        first_prompt, second_prompt = sup.workers.prompts()
        assert second_prompt.startswith(first_prompt + "Hello, Ada.")

    supervised(test)


def test_an_agent_run_that_asks_is_approved_through_the_gateway(supervised, tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    write = '```tool_call\n{"name": "write_file", "arguments": {"path": "out.txt", "content": "hi"}}\n```'
    model = script(tmp_path, write, "Written.")

    async def test(sup: InProcessSupervisor) -> None:
        async with gateway_client(sup, agent_runs=True) as http:
            run = asyncio.ensure_future(http.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": "Write it."}],
                "bastion": {"tools": ["files"], "allow_write": True, "workspace": str(workspace)}}))  # fmt: skip

            async def pending() -> list[dict[str, Any]]:
                return (await http.get("/v1/bastion/approvals")).json()["approvals"]

            await sup.wait_for(lambda: any(isinstance(event, ApprovalRequired) for _, event in sup.events))
            [ask] = await pending()
            assert ask["tool"] == "write_file"
            bad = await http.post(f"/v1/bastion/approvals/{ask['approval_id']}", json={"approve": "yes"})
            assert bad.status_code == 400
            unknown = await http.post("/v1/bastion/approvals/nope", json={"approve": True})
            assert unknown.status_code == 400 and "nope" in unknown.json()["error"]["message"]
            resolved = await http.post(f"/v1/bastion/approvals/{ask['approval_id']}", json={"approve": True})
            assert resolved.json() == {"approval_id": ask["approval_id"], "approved": True}
            answer = (await run).json()
        assert answer["choices"][0]["message"]["content"].endswith("Written.")
        kinds = [event["type"] for event in answer["bastion"]["events"]]
        assert kinds.index("approval_required") < kinds.index("tool_decision") < kinds.index("tool_end")
        assert len(sup.sandbox.calls) == 1

    supervised(test)


def test_cors_is_off_unless_origins_are_listed(supervised, tmp_path: Path) -> None:
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}  # fmt: skip

    async def test(sup: InProcessSupervisor) -> None:
        async with gateway_client(sup) as http:
            closed = await http.options("/v1/chat/completions", headers=preflight)
            plain = await http.get("/v1/models", headers={"Origin": "http://app.example"})
        assert "access-control-allow-origin" not in closed.headers
        assert "access-control-allow-origin" not in plain.headers
        async with gateway_client(sup, cors_origins=("http://app.example",)) as http:
            allowed = await http.options("/v1/chat/completions", headers=preflight)
            other = await http.options("/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "http://app.example"
        assert "access-control-allow-origin" not in other.headers

    supervised(test)


def test_sampling_fields_reach_the_worker(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, "0123456789" * 3)

    async def test(sup: InProcessSupervisor) -> None:
        async with gateway_client(sup) as http:
            answer = await openai_client(http).chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Count."}], max_completion_tokens=5,
                temperature=0.3, top_p=0.5, seed=7, stop=["9"])  # fmt: skip
        assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 5
        [sampling] = sup.workers.samplings()
        assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.seed, sampling.stop) == (
            5, 0.3, 0.5, 7, ("9",))

    supervised(test)


def test_web_pages_other_hosts_and_agent_features_are_refused_by_default(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, "Hello.")
    chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}

    async def test(sup: InProcessSupervisor) -> None:
        async with gateway_client(sup) as http:
            # A web page posting from its origin (no preflight needed for text/plain), or one that
            # rebound its domain to 127.0.0.1, is refused; curl and SDKs send neither header.
            page = await http.post("/v1/chat/completions", json=chat, headers={"Origin": "http://evil.example"})
            rebound = await http.post("/v1/chat/completions", json=chat, headers={"Host": "evil.example:11435"})
            assert (page.status_code, page.json()["error"]["code"]) == (403, "origin_not_allowed")
            assert (rebound.status_code, rebound.json()["error"]["code"]) == (403, "bad_host")
            for host in ("localhost:11435", "[::1]:11435", "127.0.0.1"):
                assert (await http.get("/v1/models", headers={"Host": host})).status_code == 200, host
            # bastion's own tools, sessions and approvals wait for --agent-runs.
            refused = [
                await http.post("/v1/chat/completions", json={**chat, "bastion": {"tools": ["calculator"]}}),
                await http.post("/v1/chat/completions", json={**chat, "model": f"{model}+calculator"}),
                await http.post("/v1/chat/completions", json=chat, headers={"X-Bastion-Session": "s"}),
                await http.get("/v1/bastion/approvals"),
            ]
            assert [r.status_code for r in refused] == [403] * 4
            assert all("--agent-runs" in r.json()["error"]["message"] for r in refused)
            assert (await http.post("/v1/chat/completions", json=chat)).status_code == 200
        assert len(sup.workers.prompts()) == 1

    supervised(test)


def test_off_loopback_models_are_named_not_given_by_path(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, "Hello.")

    async def test(sup: InProcessSupervisor) -> None:
        async with gateway_client(sup, loopback_only=False, api_key="k") as http:
            key = {"Authorization": "Bearer k", "Host": "bastion.example"}
            for name in (model, "/etc/passwd", "../x.gguf"):
                refused = await http.post("/v1/chat/completions", headers=key,
                                          json={"model": name, "messages": [{"role": "user", "content": "x"}]})
                assert refused.status_code == 400 and refused.json()["error"]["param"] == "model", name
            assert (await http.get("/v1/models", headers=key)).status_code == 200  # any Host, with the key
        assert sup.workers.prompts() == []

    supervised(test)


def test_oversized_schemas_numbers_and_nesting_are_400s_not_crashes(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, "unused")
    chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
    nested: dict[str, Any] = {}
    inner = nested
    for _ in range(40):
        inner["items"] = {}
        inner = inner["items"]

    async def test(sup: InProcessSupervisor) -> None:
        async with gateway_client(sup) as http:
            cases = [
                {**chat, "response_format": {"type": "json_schema", "json_schema": {
                    "name": "x", "schema": {"type": "array", "maxItems": 10**7}}}},
                {**chat, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": nested}}},
                {**chat, "tools": [{"type": "function", "function": {
                    "name": "f", "parameters": {"type": "object", "properties": {
                        "s": {"type": "string", "pattern": "a{100000}"}}}}}]},
                {**chat, "seed": 2**70},
                {**chat, "max_tokens": 10**12},
                {**chat, "tool_choice": "required"},  # nothing to choose from
            ]  # fmt: skip
            for body in cases:
                response = await http.post("/v1/chat/completions", json=body)
                assert response.status_code == 400, (body, response.text)
            deep = await http.post("/v1/chat/completions", content=b"[" * 5000 + b"]" * 5000)
            assert deep.status_code == 400
            unknown_route = await http.get("/v1/nothing")
            assert unknown_route.status_code == 404 and unknown_route.json()["error"]["message"]
        assert sup.workers.prompts() == []

    supervised(test)


def test_log_probabilities_come_per_token_in_each_api_s_shape(supervised, tmp_path: Path) -> None:
    """A scripted model replays its text with certainty: every token has logprob 0 and is its own
    only alternative, and the tokens' bytes spell the reply exactly, whichever route asked."""
    reply = "Héllo, fox."  # é spans two tokens (bytes): a token's text may be half a character
    model = script(tmp_path, *[reply] * 6)
    chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}

    async def test(sup: InProcessSupervisor) -> None:
        async with gateway_transport(sup) as transport, httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
            client = openai_client(http)
            whole = await client.chat.completions.create(**chat, logprobs=True, top_logprobs=1)
            content = whole.choices[0].logprobs.content
            assert b"".join(bytes(t.bytes) for t in content).decode() == whole.choices[0].message.content == reply
            assert all(t.logprob == 0.0 and [a.token for a in t.top_logprobs] == [t.token] for t in content)

            streamed = await client.chat.completions.create(**chat, logprobs=True, stream=True)
            pieces = [c.choices[0] async for c in streamed if c.choices]
            tokens = [t for p in pieces if p.logprobs for t in p.logprobs.content]
            assert b"".join(bytes(t.bytes) for t in tokens).decode() == reply
            assert all(t.top_logprobs == [] for t in tokens)  # logprobs without top_logprobs: no alternatives
            assert "".join(p.delta.content or "" for p in pieces) == reply

            plain = await client.chat.completions.create(**chat)
            assert plain.choices[0].logprobs is None  # only when asked

            legacy = (await client.completions.create(model=model, prompt="Once", logprobs=2)).choices[0].logprobs
            assert len(legacy.tokens) == len(reply.encode()) and legacy.token_logprobs == [0.0] * len(legacy.tokens)
            assert legacy.text_offset[:3] == [0, 1, 2]

            ollama_client = ollama.AsyncClient(host=BASE_URL, transport=transport)
            said = await ollama_client.chat(**chat, logprobs=True, top_logprobs=3)
            assert said.logprobs is not None and len(said.logprobs) == len(reply.encode())
            assert [len(t.top_logprobs or []) for t in said.logprobs] == [1] * len(said.logprobs)

            orphan = await http.post("/v1/chat/completions", json={**chat, "top_logprobs": 2})
            assert orphan.status_code == 400 and orphan.json()["error"]["param"] == "top_logprobs"
            too_many = await http.post("/v1/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 21})
            assert too_many.status_code == 400
        sent = [sampling.logprobs for sampling in sup.workers.samplings()]
        assert sent[:2] == [1, 0] and sent[2] is None and sent[3:5] == [2, 3]

    supervised(test)
