"""Remote engines through the real processes: a bastion model served by llama.cpp's own C++ server
(as `xllamacpp` ships it prebuilt, serving the bundled SmolLM2 GGUF on loopback) and by a second
bastion's gateway (its OpenAI and Ollama routes), driven with the real CLI and supervisor.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import msgspec
import pytest

from bastion.protocol.control import ListModels, ModelList
from tests.e2e_support import Bastion, start_streaming
from tests.real_models import smollm2_gguf
from tests.scripted import tool_call as scripted_call
from tests.test_gateway_e2e import assert_required_call_to_weather, free_port, serve_http
from tests.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.real_model]

SERVER = Path(__file__).parent.parent / "bench" / "serve_llama_server.py"
SERVER_N_CTX = 2048
SLOTS = 2
SLOT_N_CTX = SERVER_N_CTX // SLOTS  # what each request may use: the context a bastion run budgets with


class LlamaServer:
    """llama.cpp's server on a loopback port, in a process of its own."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, str(SERVER), "--model", str(smollm2_gguf()), "--port", str(self.port),
             "--n-ctx", str(SERVER_N_CTX), "--threads", "2", "--parallel", str(SLOTS)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        wait_until(self._healthy, timeout=120, interval=0.1, what="llama-server to load SmolLM2")

    def _healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"llama-server exited: {self.process.stderr.read() if self.process.stderr else ''}")
        try:
            return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def slots_busy(self) -> int:
        return sum(bool(slot.get("is_processing")) for slot in httpx.get(f"{self.url}/slots", timeout=5).json())

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def llama_server() -> Iterator[LlamaServer]:
    server = LlamaServer()
    yield server
    server.stop()


def remote_entry(name: str, url: str, engine: str = "llama-server", **more: str) -> str:
    lines = [f"[models.{name}]", f'engine = "{engine}"', f'url = "{url}"']
    lines += [f'{key} = "{value}"' for key, value in more.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def far(shared_bastion: Bastion, llama_server: LlamaServer) -> Bastion:
    shared_bastion.home.mkdir(parents=True, exist_ok=True)
    (shared_bastion.home / "config.toml").write_text(remote_entry("far", llama_server.url))
    return shared_bastion


def events_of(lines: list[dict], kind: str) -> list[dict]:
    return [line for line in lines if line["type"] == kind]


def test_a_model_served_by_llama_server_answers_with_bastion_s_template_and_the_server_s_figures(
        far: Bastion) -> None:  # fmt: skip
    code, lines = far.json("run", "--model", "far", "Name three colours.", "--max-tokens", "12", "--temperature", "0")
    assert code == 0, lines
    start, budget = events_of(lines, "run_start")[0], events_of(lines, "context_budget")[0]
    assert start["model"] == "far" and start["template"].startswith("gguf")  # the server's /props template
    assert budget["counting"] == "remote" and budget["context_size"] == SLOT_N_CTX  # the server's /tokenize
    stats = events_of(lines, "generation_stats")[0]
    text = "".join(t["text"] for t in events_of(lines, "token"))
    assert text.strip() and stats["completion_tokens"] == 12 and stats["prompt_tokens"] > 10
    listing = far.ask(ListModels(request_id="ls"))
    assert isinstance(listing, ModelList)
    [model] = [m for m in listing.models if m.name == "far"]
    assert model.n_ctx == SLOT_N_CTX and model.path == far_url(far)


def far_url(bastion: Bastion) -> str:
    return (bastion.home / "config.toml").read_text().split('url = "')[1].split('"')[0]


def test_a_session_s_second_turn_is_served_from_the_server_s_cache(far: Bastion) -> None:
    args = ("--model", "far", "--session", "cached", "--max-tokens", "8", "--temperature", "0")
    code, first = far.json("run", *args, "Tell me about the sea.")
    assert code == 0, first
    code, second = far.json("run", *args, "And about rivers?")
    assert code == 0, second
    before, after = events_of(first, "generation_stats")[0], events_of(second, "generation_stats")[0]
    # The second prompt starts with the whole first exchange, which the server's slot still holds.
    assert after["prompt_tokens"] > before["prompt_tokens"]
    assert after["cached_tokens"] >= before["prompt_tokens"]


def test_cancelling_a_run_frees_the_server_s_slot(far: Bastion, llama_server: LlamaServer) -> None:
    process, events, first_token, reader = start_streaming(
        far, "--model", "far", "Count to a thousand.", "--max-tokens", "1500", "--ignore-eos", "--temperature", "0")
    assert first_token.wait(120), events
    assert llama_server.slots_busy() == 1
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    reader.join(10)
    assert [e for _, e in events if e["type"] == "run_end"][-1]["stop_reason"] == "cancelled"
    wait_until(lambda: llama_server.slots_busy() == 0, timeout=10, what="the server to stop generating")


def test_a_server_killed_mid_reply_keeps_the_partial_and_says_interrupted_then_unreachable(
        bastion: Bastion) -> None:  # fmt: skip
    server = LlamaServer()
    try:
        bastion.home.mkdir(parents=True, exist_ok=True)
        (bastion.home / "config.toml").write_text(remote_entry("doomed", server.url))
        process, events, first_token, reader = start_streaming(
            bastion, "--model", "doomed", "--session", "cut", "Count to a thousand.", "--max-tokens", "1500",
            "--ignore-eos")  # fmt: skip
        assert first_token.wait(120), events
        server.stop(signal.SIGKILL)
        assert process.wait(timeout=60) == 1
        reader.join(10)
        kinds = [e["type"] for _, e in events]
        error = next(e for _, e in events if e["type"] == "error")
        assert error["code"] == "remote_interrupted" and "kept" in error["message"], error
        assert "token" in kinds and kinds[-1] == "run_end"
        streamed = "".join(e["text"] for _, e in events if e["type"] == "token")
        _, (detail,) = bastion.json("sessions", "show", "cut")
        [reply] = [m for m in detail["messages"] if m["role"] == "assistant"]
        assert reply["interrupted"] and reply["content"] == streamed and streamed  # the partial reply is kept
        code, lines = bastion.json("run", "--model", "doomed", "Hello?")  # the worker is still up; the server is not
        assert code == 1 and events_of(lines, "error")[0]["code"] == "remote_unreachable", lines
    finally:
        server.stop(signal.SIGKILL)


def test_a_remote_nobody_serves_fails_to_load_and_says_what_to_check(bastion: Bastion) -> None:
    bastion.home.mkdir(parents=True, exist_ok=True)
    (bastion.home / "config.toml").write_text(remote_entry("nowhere", f"http://127.0.0.1:{free_port()}"))
    code, lines = bastion.json("run", "--model", "nowhere", "Hello?")
    assert code == 1
    error = events_of(lines, "error")[0]
    assert error["code"] == "model_load_failed" and "cannot reach" in error["message"] and "url" in error["message"]


def test_bastion_serves_a_model_through_another_bastion_s_openai_and_ollama_routes(
        bastion: Bastion, tmp_path: Path) -> None:  # fmt: skip
    upstream = Bastion(tmp_path / "upstream")
    try:
        gateway = serve_http(upstream)
        bastion.home.mkdir(parents=True, exist_ok=True)
        # An OpenAI-compatible server need not say its context size: the entry does.
        (bastion.home / "config.toml").write_text(
            remote_entry("via-openai", gateway, "openai", model="smollm2-135m") + "n_ctx = 4096\n"
            + remote_entry("via-ollama", gateway, "ollama", model="smollm2-135m"))  # fmt: skip
        for name in ("via-openai", "via-ollama"):
            code, lines = bastion.json("run", "--model", name, "Name a colour.", "--max-tokens", "6",
                                       "--temperature", "0")  # fmt: skip
            assert code == 0, (name, lines)
            stats = events_of(lines, "generation_stats")[0]
            assert "".join(t["text"] for t in events_of(lines, "token")).strip()
            assert stats["completion_tokens"] == 6 and stats["prompt_tokens"] > 0, (name, stats)
    finally:
        upstream.cleanup()


def test_llama_cpp_python_s_openai_server_is_a_backend_in_completion_and_chat_mode(bastion: Bastion) -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(SERVER.with_name("serve_llama_cpp_python.py")), "--model", str(smollm2_gguf()),
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"

        def listening() -> bool:
            assert server.poll() is None, "llama_cpp.server exited"
            try:
                return httpx.get(f"{url}/v1/models", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(listening, timeout=120, interval=0.1, what="llama_cpp.server to load SmolLM2")
        bastion.home.mkdir(parents=True, exist_ok=True)
        (bastion.home / "config.toml").write_text(
            remote_entry("lcp", url, "openai") + "n_ctx = 2048\nparallel = 1\n"
            + remote_entry("lcp-chat", url, "openai", mode="chat") + "n_ctx = 2048\nparallel = 1\n")  # fmt: skip
        code, lines = bastion.json("run", "--model", "lcp", "Name a colour.", "--max-tokens", "6", "--temperature", "0")
        assert code == 0, lines
        stats = events_of(lines, "generation_stats")[0]
        assert "".join(t["text"] for t in events_of(lines, "token")).strip()
        # Its stream carries no usage: the reply's tokens are counted as they come, the prompt's are unknown;
        # nor has it a /tokenize route: the budget estimates, erring towards pruning early.
        assert stats["completion_tokens"] == 6 and "no token counts" in stats["cache_note"]
        budget = events_of(lines, "context_budget")[0]
        assert budget["counting"] == "estimate" and budget["used_tokens"] > 10
        # In chat mode its own template (the GGUF's, applied by llama-cpp-python) formats the prompt.
        code, lines = bastion.json("run", "--model", "lcp-chat", "Name a colour.", "--max-tokens", "6",
                                   "--temperature", "0")  # fmt: skip
        assert code == 0, lines
        assert events_of(lines, "run_start")[0]["template"].startswith("server")
        assert "".join(t["text"] for t in events_of(lines, "token")).strip()
        assert events_of(lines, "generation_stats")[0]["completion_tokens"] == 6
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_doctor_tries_each_remote_and_says_what_to_fix(bastion: Bastion, llama_server: LlamaServer) -> None:
    bastion.home.mkdir(parents=True, exist_ok=True)
    (bastion.home / "config.toml").write_text(
        remote_entry("good", llama_server.url)
        + remote_entry("closed", f"http://127.0.0.1:{free_port()}")
        + remote_entry("keyless", llama_server.url, api_key_env="BASTION_TEST_UNSET_KEY")
        + remote_entry("unlisted", llama_server.url, "openai", model="no-such-model")
        + remote_entry("chatty", llama_server.url, mode="chat"))  # fmt: skip
    code, lines = bastion.json("doctor")
    assert code == 1  # not every remote is usable
    probes = {probe["model"]: probe for probe in lines[0]["remotes"]}
    assert set(probes) == {"good", "closed", "keyless", "unlisted", "chatty"}
    assert all(step["ok"] for step in probes["chatty"]["steps"]), probes["chatty"]

    def failed(name: str) -> dict:
        [step] = [step for step in probes[name]["steps"] if not step["ok"]]
        return step

    assert [(s["name"], s["ok"]) for s in probes["good"]["steps"]] == [
        ("reachable", True), ("model", True), ("context", True), ("streaming", True)]
    assert "tokens streamed" in probes["good"]["steps"][-1]["detail"]
    assert failed("closed")["name"] == "reachable" and "url" in failed("closed")["fix"]
    assert failed("keyless")["name"] == "api key" and "BASTION_TEST_UNSET_KEY" in failed("keyless")["fix"]
    assert failed("unlisted")["name"] == "model" and "no-such-model" in failed("unlisted")["detail"]
    text = bastion("doctor")
    assert text.returncode == 1 and "closed: llama-server at" in text.stdout and "fix:" in text.stdout


def test_two_servers_of_one_model_keep_their_sessions_and_take_over_from_each_other(bastion: Bastion) -> None:
    servers = [LlamaServer(), LlamaServer()]
    try:
        bastion.home.mkdir(parents=True, exist_ok=True)
        (bastion.home / "config.toml").write_text(
            f'[models.pool]\nengine = "llama-server"\nurls = ["{servers[0].url}", "{servers[1].url}"]\n')

        def turn(session: str, text: str) -> dict:
            code, lines = bastion.json("run", "--model", "pool", "--session", session, text, "--max-tokens", "8",
                                       "--temperature", "0")  # fmt: skip
            assert code == 0, lines
            return events_of(lines, "generation_stats")[0]

        def backends() -> dict[str, dict]:
            listing = bastion.ask(ListModels(request_id="ls"))
            assert isinstance(listing, ModelList)
            [model] = [m for m in listing.models if m.name == "pool"]
            return {b.url: msgspec.structs.asdict(b) for b in model.backends}

        def backends_when(condition: Callable[[dict[str, dict]], bool]) -> dict[str, dict] | None:
            current = backends()
            return current if condition(current) else None

        first_a = turn("a", "Tell me about the sea.")
        placed = wait_until(lambda: backends_when(lambda b: sum(x["sessions"] for x in b.values()) == 1), timeout=10,
                            what="session a placed")  # fmt: skip
        [home_of_a] = [server for server in servers if placed[server.url]["sessions"] == 1]
        first_b = turn("b", "Tell me about mountains.")
        # New sessions go to the least busy server: one each.
        wait_until(lambda: [b["sessions"] for b in backends().values()] == [1, 1], timeout=10, what="one session each")
        second_a, second_b = turn("a", "And rivers?"), turn("b", "And valleys?")
        # Each stayed where its first turn is cached.
        assert second_a["cached_tokens"] >= first_a["prompt_tokens"] and second_b["cached_tokens"] >= first_b["prompt_tokens"]
        seen = wait_until(lambda: backends_when(lambda b: all(x["requests"] == 2 for x in b.values())),
                          timeout=10, what="two requests each")  # fmt: skip
        assert all(b["healthy"] and b["cached_tokens"] > 0 and b["contradicted"] == 0 for b in seen.values())
        # The server that holds session a dies; a's next turn moves to the other and completes.
        home_of_a.stop(signal.SIGKILL)
        moved = turn("a", "And lakes?")
        assert "moved from" in moved["cache_note"] and home_of_a.url in moved["cache_note"]
        assert moved["cached_tokens"] < first_a["prompt_tokens"]  # the other server had never seen it
        after = wait_until(lambda: backends_when(lambda b: not b[home_of_a.url]["healthy"]), timeout=10,
                           what="the dead server marked down")  # fmt: skip
        [survivor] = [s for s in servers if s is not home_of_a]
        assert after[survivor.url]["sessions"] == 2 and after[survivor.url]["healthy"]
        assert "DOWN" in bastion("ps").stdout
    finally:
        for server in servers:
            server.stop(signal.SIGKILL)



def test_an_api_key_reaches_the_server_and_nothing_of_bastion_s_keeps_it(bastion: Bastion, tmp_path: Path) -> None:
    key = "sk-bastion-test-7f3a9c2e5d"
    key_file = tmp_path / "upstream.key"
    key_file.write_text(key)
    key_file.chmod(0o600)
    upstream = Bastion(tmp_path / "upstream")
    try:
        gateway = serve_http(upstream, "--api-key-file", str(key_file))
        bastion.env["UPSTREAM_KEY"] = key  # the supervisor (started by the first command) inherits it
        bastion.home.mkdir(parents=True, exist_ok=True)
        (bastion.home / "config.toml").write_text(
            remote_entry("keyed", gateway, "openai", model="smollm2-135m", api_key_env="UPSTREAM_KEY")
            + "n_ctx = 4096\n"
            + remote_entry("filed", gateway, "openai", model="smollm2-135m", api_key_file=str(key_file))
            + "n_ctx = 4096\n"
            + remote_entry("keyless", gateway, "openai", model="smollm2-135m") + "n_ctx = 4096\n")  # fmt: skip
        outputs = []
        for name in ("keyed", "filed"):
            code, lines = bastion.json("run", "--model", name, "Say hi.", "--max-tokens", "4")
            assert code == 0, lines
            outputs.append(json.dumps(lines))
        code, lines = bastion.json("run", "--model", "keyless", "Say hi.", "--max-tokens", "4")
        error = events_of(lines, "error")[0]
        assert code == 1 and "401" in error["message"] and "api_key" in error["message"], error
        outputs.append(json.dumps(lines) + bastion("ps").stdout)
        # The key was used, and is in none of bastion's files, events, process arguments or logs.
        workers = [" ".join(p.cmdline()) for p in bastion.processes()]
        assert workers and not any(key in cmdline for cmdline in workers)
        assert not any(key in text for text in outputs)
        for path in bastion.home.rglob("*"):
            if path.is_file():
                assert key.encode() not in path.read_bytes(), path
    finally:
        upstream.cleanup()


def test_a_remote_prompt_is_counted_by_the_server_s_tokenizer_or_the_gguf_s_vocabulary_here(
        bastion: Bastion, llama_server: LlamaServer) -> None:  # fmt: skip
    bastion.home.mkdir(parents=True, exist_ok=True)
    (bastion.home / "config.toml").write_text(
        remote_entry("by-vocab", llama_server.url, vocab=str(smollm2_gguf()))
        + remote_entry("by-server", llama_server.url))  # fmt: skip
    budgets = {}
    for name in ("by-vocab", "by-server"):
        code, lines = bastion.json("run", "--model", name, "Name three rivers of Europe.", "--max-tokens", "4")
        assert code == 0, lines
        budget, stats = events_of(lines, "context_budget")[0], events_of(lines, "generation_stats")[0]
        budgets[name] = (budget["counting"], budget["used_tokens"], stats["prompt_tokens"])
    # Either way the budget's count is exactly what the server then counted for the prompt.
    assert budgets["by-vocab"][0] == "vocabulary" and budgets["by-vocab"][1] == budgets["by-vocab"][2]
    assert budgets["by-server"][0] == "remote" and budgets["by-server"][1] == budgets["by-server"][2]


def test_a_remote_model_calls_a_client_s_tool_through_bastion_s_gateway_under_its_grammar(far: Bastion) -> None:
    """The server completes bastion's prompt (the tools rendered by bastion's template) under the
    call grammar bastion sends it; bastion parses the call and the OpenAI SDK gets tool_calls."""
    assert_required_call_to_weather(serve_http(far), "far")


def test_chat_mode_sends_the_messages_and_the_server_formats_them(far: Bastion, llama_server: LlamaServer) -> None:
    config = far.home / "config.toml"
    if "far-chat" not in config.read_text():
        config.write_text(config.read_text() + remote_entry("far-chat", llama_server.url, mode="chat"))
    code, lines = far.json("run", "--model", "far-chat", "Name three colours.", "--max-tokens", "8",
                           "--temperature", "0")  # fmt: skip
    assert code == 0, lines
    start, stats = events_of(lines, "run_start")[0], events_of(lines, "generation_stats")[0]
    assert start["template"].startswith("server")  # which side formatted the prompt
    assert "".join(t["text"] for t in events_of(lines, "token")).strip()
    assert stats["completion_tokens"] == 8 and stats["prompt_tokens"] > 10  # the server's usage
    shown = far("run", "--model", "far-chat", "Name three colours.", "--show-prompt")
    assert shown.returncode == 0 and '"messages": [' in shown.stdout and "Name three colours." in shown.stdout


@pytest.mark.parametrize("engine", ["openai", "ollama"])
def test_a_chat_mode_model_s_tool_calls_come_back_as_calls_and_its_results_go_back(
        bastion: Bastion, tmp_path: Path, engine: str) -> None:  # fmt: skip
    """The upstream (a second bastion serving canned replies) parses the call itself and answers with
    structured tool_calls; this bastion turns them back into a call it runs, and sends the result on."""
    replies = tmp_path / "replies.json"
    replies.write_text(json.dumps([scripted_call("calculator", expression="12*34"), "It is 408."]))
    upstream = Bastion(tmp_path / "upstream")
    upstream.home.mkdir(parents=True)
    (upstream.home / "config.toml").write_text(
        f'[models.canned]\nsource = {{ kind = "scripted", path = "{replies}" }}\n')
    try:
        gateway = serve_http(upstream)
        bastion.home.mkdir(parents=True, exist_ok=True)
        (bastion.home / "config.toml").write_text(
            remote_entry("up", gateway, engine, model="canned", mode="chat") + "n_ctx = 4096\n")
        code, lines = bastion.json("run", "--model", "up", "What is 12 times 34?", "--tools", "calculator")
        assert code == 0, lines
        [call] = events_of(lines, "tool_call")
        assert call["name"] == "calculator" and json.loads(call["arguments"]) == {"expression": "12*34"}
        assert "408" in "".join(e["text"] for e in events_of(lines, "tool_output"))
        assert "".join(t["text"] for t in events_of(lines, "token")).endswith("It is 408.")
    finally:
        upstream.cleanup()
