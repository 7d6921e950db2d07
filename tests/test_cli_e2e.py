"""End to end through the real CLI, supervisor, worker processes and SmolLM2.

Each test here starts from the user's side: the `bastion` command with a
`BASTION_HOME` of its own, or — for tests that neither stop nor break the
supervisor — one the module shares. The supervisor is started by the first
command, as it is for a user, and stopped by the fixture (which also checks
nothing is left behind).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bastion.protocol import WorkerState
from tests.e2e_support import Bastion, events_of, start_streaming, wait_for_supervisor
from tests.real_models import smollm2_gguf
from tests.waiting import wait_gone

pytestmark = pytest.mark.real_model


def test_first_run_starts_the_supervisor_and_streams_an_answer(bastion: Bastion) -> None:
    done = bastion("run", "What is the capital of France?", "--max-tokens", "24", "--temperature", "0")
    assert done.returncode == 0, done.stderr
    assert "started the bastion supervisor" in done.stderr
    assert done.stdout.strip(), "no answer on stdout"
    assert "tokens" in done.stderr and "tok/s" in done.stderr  # the stats line
    # The supervisor stays up for the next command, with its sockets in a private dir.
    status = bastion("status")
    assert status.returncode == 0 and "running" in status.stdout
    code, (report,) = bastion.json("status")
    assert code == 0 and report["running"] is True and report["models_loaded"] == 1
    assert report["home"] == str(bastion.home) and psutil.pid_exists(report["pid"])
    assert (bastion.home / "run").stat().st_mode & 0o777 == 0o700


def test_json_stream_has_typed_events_in_order(shared_bastion: Bastion) -> None:
    code, lines = shared_bastion.json("run", "Name three colours.", "--max-tokens", "16", "--temperature", "0")
    assert code == 0
    types = [line["type"] for line in lines if line["type"] != "load_progress"]
    assert types[:3] == ["run_start", "turn_start", "context_budget"]
    assert types[-3:] == ["generation_stats", "turn_end", "run_end"]
    assert set(types[3:-3]) == {"token"}
    budget = events_of(lines, "context_budget")[0]
    assert 0 < budget["used_tokens"] <= budget["max_tokens"] < budget["context_size"] == 4096
    start = events_of(lines, "run_start")[0]
    assert start["model"] == "smollm2-135m" and start["worker_pid"] > 0 and start["template"]
    tokens = events_of(lines, "token")
    counts = [t["n"] for t in tokens]  # a running count; tokens decoded within 50 ms travel together
    assert counts[0] == 1 and counts == sorted(set(counts))
    assert all(isinstance(t["text"], str) and t["tokens_per_s"] >= 0 for t in tokens)
    stats = events_of(lines, "generation_stats")[0]
    assert stats["completion_tokens"] == counts[-1]
    assert stats["prompt_tokens"] > 0 and stats["ttft_ms"] > 0 and stats["decode_tokens_per_s"] > 0
    assert lines[-1]["stop_reason"] in ("stop", "length")


def test_same_seed_same_answer_and_greedy_is_repeatable(shared_bastion: Bastion) -> None:
    args = ("run", "Tell me a fact about owls.", "--max-tokens", "20")
    first = shared_bastion(*args, "--seed", "7", "--temperature", "0.9")
    second = shared_bastion(*args, "--seed", "7", "--temperature", "0.9")
    assert first.returncode == second.returncode == 0
    assert first.stdout == second.stdout
    greedy = [shared_bastion(*args, "--temperature", "0") for _ in range(2)]
    assert greedy[0].returncode == 0 and greedy[0].stdout == greedy[1].stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--model", "no-such-model"), "smollm2-135m"),  # the error lists the known models
        (("--model", "/nonexistent/model.gguf"), "/nonexistent/model.gguf"),
        (("--max-tokens", "0"), "max-tokens"),
        (("--bogus-flag",), "bogus"),
    ],
    ids=["unknown_model", "missing_file", "bad_value", "bad_flag"],
)
def test_usage_errors_exit_2_with_a_clear_message(shared_bastion: Bastion, args: tuple[str, ...], needle: str) -> None:
    done = shared_bastion("run", "hello", *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert needle in done.stderr


def test_not_a_gguf_is_a_usage_error_in_json_too(shared_bastion: Bastion, tmp_path: Path) -> None:
    fake = tmp_path / "notes.gguf"
    fake.write_text("just text")
    code, lines = shared_bastion.json("run", "hello", "--model", str(fake))
    assert code == 2
    error = events_of(lines, "error")[0]
    assert error["code"] == "invalid_model_file" and str(fake) in error["message"]
    assert lines[-1] == {"type": "run_end", "request_id": error["request_id"], "stop_reason": "error"}


def test_a_gguf_that_crashes_the_loader_is_a_model_error(shared_bastion: Bastion, tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + os.urandom(4096))
    code, lines = shared_bastion.json("run", "hello", "--model", str(broken))
    assert code == 1
    error = events_of(lines, "error")[0]
    assert error["code"] == "model_load_failed" and "broken" in error["message"]
    # The supervisor survived it.
    assert shared_bastion("status").returncode == 0


def test_extending_a_prompt_reuses_the_kv_cache(shared_bastion: Bastion) -> None:
    history = " ".join(f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(60))
    _, first = shared_bastion.json("run", history, "--max-tokens", "4", "--temperature", "0")
    _, second = shared_bastion.json("run", history + " Fact 60: sixty is even. Which fact is last?",
                             "--max-tokens", "4", "--temperature", "0")
    cold = events_of(first, "generation_stats")[0]
    warm = events_of(second, "generation_stats")[0]
    assert cold["prompt_tokens"] > 300
    assert warm["cached_tokens"] > 0.9 * cold["prompt_tokens"] - 20
    assert warm["ttft_ms"] < cold["ttft_ms"]


def test_ps_load_and_unload(bastion: Bastion) -> None:
    assert bastion("load", "smollm2-135m").returncode == 0
    again = bastion("load", "smollm2-135m")
    assert again.returncode == 0 and "already loaded" in again.stderr
    code, lines = bastion.json("ps")
    assert code == 0
    (model,) = lines[0]["models"]
    assert model["name"] == "smollm2-135m" and model["state"] == "idle"
    assert psutil.pid_exists(model["pid"]) and model["rss_bytes"] > 50 * 2**20
    assert model["n_ctx"] == 4096 and model["chat_template"]
    assert bastion("run", "Hi", "--max-tokens", "3").returncode == 0
    _, lines = bastion.json("ps")
    assert lines[0]["models"][0]["kv_tokens"] > 0
    assert bastion("unload", "smollm2-135m").returncode == 0
    assert not psutil.pid_exists(model["pid"]) or psutil.Process(model["pid"]).status() == psutil.STATUS_ZOMBIE
    assert bastion.json("ps")[1][0]["models"] == []
    missing = bastion("unload", "smollm2-135m")
    assert missing.returncode == 2 and "not loaded" in missing.stderr


def test_killing_a_worker_mid_generation_reports_an_error_promptly(bastion: Bastion) -> None:
    process, events, first_token, reader = start_streaming(
        bastion, "Write a very long story about a lighthouse keeper.", "--max-tokens", "2000")
    assert first_token.wait(120), process.stderr.read() if process.stderr else ""
    worker_pid = next(e["worker_pid"] for _, e in events if e["type"] == "run_start")
    killed_at = time.monotonic()
    os.kill(worker_pid, signal.SIGKILL)
    assert process.wait(timeout=30) == 1
    reader.join(10)
    error = next((at, e) for at, e in events if e["type"] == "error")
    assert error[1]["code"] == "worker_died" and "SIGKILL" in error[1]["message"]
    assert error[0] - killed_at < 10  # seen through the process exit, not a heartbeat timeout
    assert events[-1][1] == {"type": "run_end", "request_id": error[1]["request_id"], "stop_reason": "error"}
    # The model loads again on the next request.
    assert bastion("run", "Hi", "--max-tokens", "3").returncode == 0


def test_ctrl_c_cancels_the_generation_in_the_worker(shared_bastion: Bastion) -> None:
    process, events, first_token, reader = start_streaming(
        shared_bastion, "Write a very long essay about the history of bread.", "--max-tokens", "3000",
        "--temperature", "0.7", "--seed", "1")
    assert first_token.wait(120)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 130
    reader.join(10)
    kinds = [e["type"] for _, e in events]
    assert kinds[-1] == "run_end" and events[-1][1]["stop_reason"] == "cancelled"
    stats = next(e for _, e in events if e["type"] == "generation_stats")
    assert stats["completion_tokens"] < 3000
    # The worker is idle again at once, and serves the next request.
    assert shared_bastion.models()["smollm2-135m"].state is WorkerState.IDLE
    assert shared_bastion("run", "Hi", "--max-tokens", "3").returncode == 0


def test_a_killed_client_s_generation_stops_in_the_worker(shared_bastion: Bastion) -> None:
    """SIGKILL sends no Cancel: the supervisor watches the process the client's hello named."""
    process, _events, first_token, reader = start_streaming(
        shared_bastion, "Write a very long essay about the history of bread.", "--max-tokens", "3000",
        "--ignore-eos", "-s", "killed-client")
    assert first_token.wait(120)
    assert shared_bastion.models()["smollm2-135m"].state is WorkerState.BUSY
    process.kill()
    killed = time.monotonic()
    process.wait(10)
    reader.join(10)
    status = shared_bastion.wait_for_model("smollm2-135m", lambda m: m.state is WorkerState.IDLE, timeout=30)
    idle_after = time.monotonic() - killed
    assert status.state is WorkerState.IDLE and idle_after < 1.0, f"busy for {idle_after:.2f} s after the kill"
    # The partial reply is kept, marked as cut short, and the session goes on.
    code, (shown,) = shared_bastion.json("sessions", "show", "killed-client")
    assert code == 0 and shown["messages"][-1]["role"] == "assistant"
    assert shared_bastion("run", "Hi", "--max-tokens", "3", "-s", "killed-client").returncode == 0


def test_down_stops_everything_and_removes_the_sockets(bastion: Bastion) -> None:
    assert bastion("run", "Hi", "--max-tokens", "2").returncode == 0
    assert len(bastion.processes()) == 2  # the supervisor and one worker
    done = bastion("down")
    assert done.returncode == 0, done.stderr
    assert bastion.processes() == []
    assert not list((bastion.home / "run").glob("*.sock"))
    assert bastion("status").returncode == 1
    assert bastion("down").returncode == 0  # stopping a stopped supervisor is fine


def test_sigterm_to_the_supervisor_stops_its_workers(bastion: Bastion) -> None:
    assert bastion("up").returncode == 0
    assert bastion("load", "smollm2-135m").returncode == 0
    status = bastion.json("status")[1][0]
    supervisor = psutil.Process(status["pid"])
    workers = supervisor.children()
    assert len(workers) == 1
    supervisor.send_signal(signal.SIGTERM)
    assert not wait_gone([supervisor, *workers])
    assert not list((bastion.home / "run").glob("*.sock"))


def test_workers_exit_when_the_supervisor_is_killed(bastion: Bastion) -> None:
    assert bastion("load", "smollm2-135m").returncode == 0
    status = bastion.json("status")[1][0]
    supervisor = psutil.Process(status["pid"])
    workers = supervisor.children()
    supervisor.send_signal(signal.SIGKILL)
    assert not wait_gone(workers), "a worker outlived its supervisor"
    # The next command starts a fresh supervisor over the stale sockets.
    assert bastion("run", "Hi", "--max-tokens", "2").returncode == 0


def test_two_models_generate_concurrently_in_their_own_workers(shared_bastion: Bastion) -> None:
    loaded = shared_bastion("load", "gemma3-270m", timeout=600)
    assert loaded.returncode == 0, loaded.stderr
    assert shared_bastion("load", "smollm2-135m").returncode == 0
    prompt = "Write a long story about a dragon who learns to bake bread."
    runs = {
        name: start_streaming(shared_bastion, prompt, "--model", name, "--max-tokens", "200", "--ignore-eos",
                              "--temperature", "0.8", "--seed", "3")
        for name in ("smollm2-135m", "gemma3-270m")
    }
    token_times = {}
    for name, (process, events, _first, reader) in runs.items():
        assert process.wait(timeout=240) == 0, process.stderr.read() if process.stderr else ""
        reader.join(10)
        token_times[name] = [at for at, e in events if e["type"] == "token"]
        assert len(token_times[name]) >= 8, f"{name} stopped after {len(token_times[name])} tokens"
    pids = {name: next(e["worker_pid"] for _, e in runs[name][1] if e["type"] == "run_start") for name in runs}
    assert pids["smollm2-135m"] != pids["gemma3-270m"]
    small, gemma = token_times["smollm2-135m"], token_times["gemma3-270m"]
    # Overlapping token streams: each model produced tokens while the other was producing.
    assert small[0] < gemma[-1] and gemma[0] < small[-1]
    _, lines = shared_bastion.json("ps")
    listed = {model["name"]: model for model in lines[0]["models"]}
    assert listed["gemma3-270m"]["architecture"] == "gemma3"
    assert listed["gemma3-270m"]["chat_template"].startswith("builtin:gemma")
    assert {listed[name]["pid"] for name in pids} == set(pids.values())
    # While both generated, each decoded with its share of the cores, not all of them.
    cores = len(os.sched_getaffinity(0))
    if cores % 2 == 0:  # an even split: each gets half
        for name in runs:
            log = (shared_bastion.home / "logs" / f"worker-{name}.log").read_text()
            assert f"decoding with {cores // 2} thread(s)" in log, log[-2000:]


def test_a_full_queue_answers_busy_with_a_retry_hint(bastion: Bastion) -> None:
    import subprocess
    import sys

    supervisor = subprocess.Popen(
        [sys.executable, "-m", "bastion.supervisor", "--max-queued-per-worker", "1"],
        env=bastion.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_supervisor(bastion, supervisor.pid)
        assert bastion("load", "smollm2-135m").returncode == 0
        long = ("Write a long story.", "--max-tokens", "400", "--ignore-eos")
        first, events, first_token, reader = start_streaming(bastion, *long)
        assert first_token.wait(120)
        queued, queued_events, _, queued_reader = start_streaming(bastion, *long)
        # The queue holds one; a third request is refused at once instead of waiting.
        bastion.wait_for_model("smollm2-135m", lambda model: model.queued == 1)
        code, lines = bastion.json("run", *long)
        assert code == 1
        error = events_of(lines, "error")[0]
        assert error["code"] == "busy" and error["retryable"] is True and error["retry_after_ms"] > 0
        for process in (first, queued):
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=60) == 130
    finally:
        bastion("down")
        supervisor.wait(timeout=30)


def test_a_hung_worker_is_killed_and_its_run_fails(bastion: Bastion) -> None:
    import subprocess
    import sys

    supervisor = subprocess.Popen(
        [sys.executable, "-m", "bastion.supervisor", "--worker-silence-limit", "3"],
        env=bastion.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_supervisor(bastion, supervisor.pid)
        assert bastion("load", "smollm2-135m").returncode == 0
        process, events, first_token, reader = start_streaming(
            bastion, "Write a very long story about a lighthouse keeper.", "--max-tokens", "2000")
        assert first_token.wait(120)
        worker_pid = next(e["worker_pid"] for _, e in events if e["type"] == "run_start")
        os.kill(worker_pid, signal.SIGSTOP)  # alive but silent: only heartbeats can tell
        assert process.wait(timeout=60) == 1
        reader.join(10)
        error = next(e for _, e in events if e["type"] == "error")
        assert error["code"] == "worker_unresponsive" and "heartbeat" in error["message"]
    finally:
        bastion("down")
        supervisor.wait(timeout=30)


def test_killing_the_supervisor_mid_run_fails_the_client_promptly(bastion: Bastion) -> None:
    process, events, first_token, reader = start_streaming(
        bastion, "Write a very long story about a lighthouse keeper.", "--max-tokens", "3000")
    assert first_token.wait(120)
    supervisor_pid = bastion.json("status")[1][0]["pid"]
    os.kill(supervisor_pid, signal.SIGKILL)
    assert process.wait(timeout=30) == 1
    reader.join(10)
    error = next(e for _, e in events if e["type"] == "error")
    assert error["code"] == "supervisor_unavailable"
    assert events[-1][1]["type"] == "run_end" and events[-1][1]["stop_reason"] == "error"


def test_a_broken_config_is_a_usage_error_naming_the_line_and_fixing_it_needs_no_restart(
    bastion: Bastion, tmp_path: Path
) -> None:
    bastion.home.mkdir(parents=True)
    config = bastion.home / "config.toml"
    config.write_text('[models.mine]\npath = "x.gguf"\nn_ctx = "big"\n')
    broken = bastion("run", "Hi", "--max-tokens", "2")
    assert broken.returncode == 2
    assert "config.toml:3" in broken.stderr and "n_ctx" in broken.stderr
    # Fix it while the supervisor runs: the next request sees the new registry.
    config.write_text(f'default = "mine"\n[models.mine]\npath = "{smollm2_gguf()}"\nn_ctx = 1024\n')
    fixed = bastion.json("run", "Hi", "--max-tokens", "2")
    assert fixed[0] == 0
    assert events_of(fixed[1], "run_start")[0]["model"] == "mine"
    assert bastion.json("ps")[1][0]["models"][0]["n_ctx"] == 1024


def test_a_relative_model_path_is_resolved_against_the_callers_directory(shared_bastion: Bastion, tmp_path: Path) -> None:
    import shutil
    import subprocess

    from tests.e2e_support import BASTION

    assert shared_bastion("up").returncode == 0  # started from another directory
    workdir = tmp_path / "work"
    workdir.mkdir()
    shutil.copy(smollm2_gguf(), workdir / "local.gguf")
    done = subprocess.run([BASTION, "run", "Hi", "--model", "./local.gguf", "--max-tokens", "2"],
                          cwd=workdir, env=shared_bastion.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.e2e
def test_the_command_imports_nothing_heavy_before_it_is_needed(bastion: Bastion) -> None:
    """`bastion status` and `--help` start in well under a fifth of a second only while the
    command module leaves process tools, HTTP, pydantic and rich alone (bench/cli_latency.py)."""
    heavy = ("psutil", "urllib.request", "http.client", "pydantic", "rich")
    probe = ("import sys, bastion.client.cli as cli\n"
             "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
             f"print('loaded:', *(m for m in {heavy!r} if m in sys.modules))")  # fmt: skip
    for args in (["--help"], ["status"]):
        done = subprocess.run([sys.executable, "-c", probe, *args], env=bastion.env, capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        assert done.stdout.splitlines()[-1] == "loaded:", (args, done.stdout[-200:], done.stderr[-500:])
