"""Crash recovery: restart with backoff, flapping, hang detection, retries.

Three layers, fastest first: the pure rules of recovery.py; the restart
wiring of `LoadedModels` driven in-process with real `WorkerHandle`s whose
lives a test scripts (no processes); and end to end through the CLI with real
supervisor and worker processes (scripted models for deterministic process
behaviour, SmolLM2 where the model's own timing matters).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import psutil
import pytest

from bastion.protocol import Heartbeat, HomeLayout, WorkerState
from bastion.supervisor.config import SupervisorConfig
from bastion.supervisor.errors import ModelFailedError, ModelUnloadedError
from bastion.supervisor.models.loaded import LoadedModels
from bastion.supervisor.models.registry import ModelSpec
from bastion.supervisor.models.restarts import (
    CrashHistory,
    GiveUp,
    Restart,
    RestartPolicy,
)
from bastion.supervisor.models.sources import ScriptedReplies
from bastion.supervisor.processes.liveness import failure_line, hang_reason
from tests.e2e_support import Bastion, events_of, start_streaming, wait_for_supervisor
from tests.standin_pool import StandInPool
from tests.waiting import quiescent, until, wait_until

# --- the rules ---------------------------------------------------------------

POLICY = RestartPolicy(first_backoff_s=0.0, backoff_s=0.5, backoff_max_s=2.0, crash_limit=4, window_s=60.0)


def test_a_lone_crash_restarts_at_once_then_backoff_doubles_up_to_the_cap() -> None:
    history = CrashHistory(POLICY)
    assert [history.record(t) for t in (0.0, 1.0, 2.0)] == [
        Restart(delay_s=0.0, crashes=1), Restart(delay_s=0.5, crashes=2), Restart(delay_s=1.0, crashes=3),
    ]  # fmt: skip
    capped = CrashHistory(msgspec.structs.replace(POLICY, crash_limit=10))
    delays = [capped.record(float(t)) for t in range(7)]
    assert [d.delay_s for d in delays if isinstance(d, Restart)] == [0.0, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0]


def test_the_crash_limit_within_the_window_gives_up() -> None:
    history = CrashHistory(POLICY)
    for t in (0.0, 10.0, 20.0):
        assert isinstance(history.record(t), Restart)
    assert history.record(30.0) == GiveUp(crashes=4, window_s=60.0)
    assert history.restarts(31.0) == 3
    # A failed model keeps its record: nothing expires until it is loaded again.
    assert history.restarts(1000.0) == 3


def test_crashes_older_than_the_window_are_forgotten_and_backoff_starts_over() -> None:
    history = CrashHistory(POLICY)
    for t in (0.0, 10.0, 20.0):
        history.record(t)
    assert history.restarts(75.0) == 1  # only the crash at 20 s is within 60 s
    assert history.record(100.0) == Restart(delay_s=0.0, crashes=1)


def test_a_limit_of_one_never_restarts() -> None:
    assert isinstance(CrashHistory(msgspec.structs.replace(POLICY, crash_limit=1)).record(0.0), GiveUp)


def test_a_silent_worker_is_hung_whatever_it_was_doing() -> None:
    common = dict(silence_limit_s=30.0, stall_limit_s=60.0)
    assert hang_reason(now=100.0, last_seen=60.0, busy=False, progress_at=0.0, **common) == "no heartbeat for 40 s"
    assert hang_reason(now=100.0, last_seen=99.0, busy=False, progress_at=0.0, **common) is None


def test_a_busy_worker_without_progress_is_hung_an_idle_one_is_not() -> None:
    common = dict(now=100.0, last_seen=99.5, silence_limit_s=30.0, stall_limit_s=60.0)
    assert hang_reason(busy=True, progress_at=30.0, **common) == "busy with no progress for 70 s"
    assert hang_reason(busy=True, progress_at=50.0, **common) is None
    assert hang_reason(busy=False, progress_at=0.0, **common) is None


def test_failure_line_is_the_exit_and_the_last_thing_said() -> None:
    assert failure_line("exited with code 1", ["loading", "RuntimeError: bad tensor", "  "]) == (
        "exited with code 1: RuntimeError: bad tensor")
    assert failure_line("was killed by SIGKILL", []) == "was killed by SIGKILL"
    # The worker's own log records: errors are worth quoting, routine chatter is not.
    error = "2024-05-01 12:00:00,123 worker w1-2 ERROR bastion.worker.proc: engine failed"
    assert failure_line("exited with code 1", [error]) == "exited with code 1: ERROR bastion.worker.proc: engine failed"
    info = "2024-05-01 12:00:00,123 worker w1-2 INFO bastion.worker.proc: loaded x.gguf in 40 ms"
    assert failure_line("was killed by SIGKILL", [error, info]) == "was killed by SIGKILL"


# --- the wiring, in-process ---------------------------------------------------

ScriptedPool = StandInPool


FAST = SupervisorConfig(restart_first_backoff_s=0.01, restart_backoff_s=0.01, restart_backoff_max_s=0.04, restart_limit=3, restart_window_s=60.0)


@pytest.fixture
def scripted_spec(tmp_path: Path) -> ModelSpec:
    path = tmp_path / "replies.json"
    path.write_text(json.dumps(["hello"]))
    return ModelSpec(name="m", source=ScriptedReplies(path=str(path)), n_ctx=256, threads=1)


def recovering(tmp_path: Path, config: SupervisorConfig = FAST) -> tuple[LoadedModels, ScriptedPool]:
    pool = ScriptedPool(config)
    return LoadedModels(config=config, layout=HomeLayout(tmp_path / "home"), pool=pool), pool  # type: ignore[arg-type]


async def restarting(models: LoadedModels, name: str) -> None:
    """Until the supervisor has handled the worker's exit: the model is restarting."""
    await until(lambda: {s.name: s.state for s in models.statuses()}.get(name) is WorkerState.RESTARTING,
                what=f"{name} restarting")


async def settle(models: LoadedModels, name: str, timeout: float = 5.0) -> WorkerState:
    """The model's state once it is no longer restarting."""

    def state() -> WorkerState:
        return {status.name: status.state for status in models.statuses()}.get(name, WorkerState.DEAD)

    await until(lambda: state() is not WorkerState.RESTARTING, timeout=timeout, what=f"{name} done restarting")
    return state()


def test_a_crashed_worker_is_restarted_with_the_same_launch(tmp_path: Path, scripted_spec: ModelSpec) -> None:
    async def scenario() -> None:
        models, pool = recovering(tmp_path)
        model, _ = await models.ensure_loaded(scripted_spec, lambda *_: None)
        first = model.handle
        pool.crash(first)
        await restarting(models, "m")
        (status,) = models.statuses()
        assert status.state is WorkerState.RESTARTING and "SIGSEGV" in status.failure
        assert "Segmentation fault" in status.failure
        # A run asking for the model now waits for the restart instead of failing.
        handle = await asyncio.wait_for(model.serving(), 5)
        assert handle is not first and handle.launch == first.launch and handle.state is WorkerState.IDLE
        (status,) = models.statuses()
        assert status.state is WorkerState.IDLE and status.restarts == 1
        again, already = await models.ensure_loaded(scripted_spec, lambda *_: None)
        assert again is model and already and again.handle is handle

    asyncio.run(scenario())


def test_crashing_again_and_again_marks_the_model_failed_until_loaded(tmp_path: Path,
                                                                      scripted_spec: ModelSpec) -> None:
    async def scenario() -> None:
        models, pool = recovering(tmp_path)
        model, _ = await models.ensure_loaded(scripted_spec, lambda *_: None)
        waiter: asyncio.Future[object] | None = None
        for _ in range(3):
            await settle(models, "m")
            if model.handle.exited.done():
                break
            waiter = asyncio.ensure_future(model.serving())
            pool.crash(model.handle)
            await until(lambda: models.statuses()[0].state in (WorkerState.RESTARTING, WorkerState.FAILED),
                        what="the crash handled")
        assert waiter is not None
        assert await settle(models, "m") is WorkerState.FAILED
        (status,) = models.statuses()
        assert status.restarts == 2 and status.pid == 0
        assert status.failure.startswith("crashed 3 times within 60 s; last: worker for m")
        assert models.names() == [] and not pool.alive()
        with pytest.raises(ModelFailedError, match="bastion load m"):
            await waiter
        with pytest.raises(ModelFailedError, match="bastion load m"):
            await models.ensure_loaded(scripted_spec, lambda *_: None)
        # `bastion load` clears the mark and loads afresh, with a clean record.
        assert models.clear_failure("m")
        fresh, already = await models.ensure_loaded(scripted_spec, lambda *_: None)
        assert not already and fresh is not model
        (status,) = models.statuses()
        assert status.state is WorkerState.IDLE and status.restarts == 0 and status.failure == ""

    asyncio.run(scenario())


def test_a_worker_that_fails_every_restart_ends_failed_not_looping(tmp_path: Path,
                                                                   scripted_spec: ModelSpec) -> None:
    async def scenario() -> None:
        models, pool = recovering(tmp_path)
        model, _ = await models.ensure_loaded(scripted_spec, lambda *_: None)
        pool.loads_fail = True
        pool.crash(model.handle)
        await until(lambda: models.statuses()[0].state in (WorkerState.RESTARTING, WorkerState.FAILED),
                        what="the crash handled")
        assert await settle(models, "m") is WorkerState.FAILED
        assert len(pool.started) == 3  # the first worker and two restarts, then no more
        (status,) = models.statuses()
        assert status.failure.endswith("last: the script is gone")
        assert not pool.alive()

    asyncio.run(scenario())


def test_unloading_a_restarting_model_cancels_the_restart(tmp_path: Path, scripted_spec: ModelSpec) -> None:
    async def scenario() -> None:
        slow = msgspec.structs.replace(FAST, restart_first_backoff_s=30.0, restart_backoff_s=30.0,
                                       restart_backoff_max_s=30.0)
        models, pool = recovering(tmp_path, slow)
        model, _ = await models.ensure_loaded(scripted_spec, lambda *_: None)
        pool.crash(model.handle)
        await restarting(models, "m")
        waiter = asyncio.ensure_future(model.serving())
        assert await models.unload("m")
        with pytest.raises(ModelUnloadedError):
            await waiter
        assert models.statuses() == [] and len(pool.started) == 1
        # Loaded again later, it starts from scratch.
        _, already = await models.ensure_loaded(scripted_spec, lambda *_: None)
        assert not already and models.statuses()[0].restarts == 0

    asyncio.run(scenario())


def test_a_load_during_a_restart_waits_for_it(tmp_path: Path, scripted_spec: ModelSpec) -> None:
    async def scenario() -> None:
        models, pool = recovering(tmp_path, msgspec.structs.replace(FAST, restart_first_backoff_s=0.2, restart_backoff_s=0.2,
                                                                 restart_backoff_max_s=0.2))
        model, _ = await models.ensure_loaded(scripted_spec, lambda *_: None)
        pool.crash(model.handle)
        await restarting(models, "m")
        started = time.monotonic()
        again, already = await models.ensure_loaded(scripted_spec, lambda *_: None)
        assert time.monotonic() - started >= 0.15
        assert again is model and already and again.handle.state is WorkerState.IDLE and len(pool.started) == 2

    asyncio.run(scenario())


def test_a_requested_stop_is_not_a_crash(tmp_path: Path, scripted_spec: ModelSpec) -> None:
    async def scenario() -> None:
        models, pool = recovering(tmp_path)
        model, _ = await models.ensure_loaded(scripted_spec, lambda *_: None)
        await pool.stop(model.handle)  # e.g. idle unloading, or a memory budget making room
        await until(lambda: models.statuses() == [], what="the model forgotten")
        await quiescent()  # had a restart been scheduled, it would have run by now
        assert len(pool.started) == 1
        with pytest.raises(ModelUnloadedError):
            await model.serving()

    asyncio.run(scenario())


def test_shutdown_does_not_restart_anything(tmp_path: Path, scripted_spec: ModelSpec) -> None:
    async def scenario() -> None:
        models, pool = recovering(tmp_path, msgspec.structs.replace(FAST, restart_first_backoff_s=0.05, restart_backoff_s=0.05))
        model, _ = await models.ensure_loaded(scripted_spec, lambda *_: None)
        pool.crash(model.handle)
        await restarting(models, "m")
        await models.unload_all()
        await quiescent()  # a restart that survived the shutdown would have run by now
        assert len(pool.started) == 1 and not pool.alive()

    asyncio.run(scenario())


def test_heartbeat_gauges_reach_the_model_status(tmp_path: Path, scripted_spec: ModelSpec) -> None:
    async def scenario() -> None:
        models, _pool = recovering(tmp_path)
        model, _ = await models.ensure_loaded(scripted_spec, lambda *_: None)
        model.handle.process = types.SimpleNamespace(pid=os.getpid())  # type: ignore[assignment]
        model.handle.on_message(Heartbeat(seq=1, progress=7, kv_tokens=120, snapshots_ram=2,
                                          snapshot_ram_bytes=3 << 20, snapshots_disk=5, snapshot_disk_bytes=9 << 20))
        (status,) = models.statuses()
        assert (status.kv_tokens, status.snapshots_ram, status.snapshot_ram_bytes, status.snapshots_disk,
                status.snapshot_disk_bytes) == (120, 2, 3 << 20, 5, 9 << 20)
        assert status.pid == os.getpid() and status.rss_bytes > 0

    asyncio.run(scenario())


# --- the ps table --------------------------------------------------------------


def test_ps_shows_restarts_failures_and_kv_snapshots() -> None:
    from bastion.client.render import model_table
    from bastion.protocol.control import ModelStatus

    serving = ModelStatus(name="a", path="/a.gguf", state=WorkerState.IDLE, pid=42, restarts=2,
                          failure="was killed by SIGKILL", snapshots_ram=2, snapshot_ram_bytes=3 * 2**20,
                          snapshots_disk=1, snapshot_disk_bytes=2**20, n_ctx=4096, kv_cache_type="q8_0")
    failed = ModelStatus(name="b", path="/b.gguf", state=WorkerState.FAILED, pid=0, restarts=2,
                         failure="crashed 3 times within 60 s; last: exited with code 1: out of memory")
    table = model_table([serving, failed]).splitlines()
    assert "KV SNAPSHOTS" in table[0]
    assert "idle (2 restarts)" in table[1] and "2, 3.0 MiB + 1 on disk, 1.0 MiB" in table[1]
    assert "4096 (kv q8_0)" in table[1]
    batched = msgspec.structs.replace(serving, parallel=4, running=3, kv_cache_type="f16", state=WorkerState.BUSY)
    row = model_table([batched]).splitlines()[1]
    assert "4 × 4096" in row and "busy 3/4 (2 restarts)" in row
    assert table[2].split()[:3] == ["b", "-", "failed"]
    assert "b failed: crashed 3 times within 60 s; last: exited with code 1: out of memory" in table
    assert "  run `bastion load b` to try again" in table


# --- real processes ------------------------------------------------------------
# Scripted models run a real worker process whose replies are canned: its
# crashes, restarts and hangs are the process's, its timing is deterministic.



def scripted_models(bastion: Bastion, tmp_path: Path, *names: str) -> dict[str, Path]:
    """Register scripted models under `names` in the home's config.toml; their script files by name."""
    bastion.home.mkdir(parents=True, exist_ok=True)
    scripts = {}
    tables = []
    for name in names:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps([f"reply {i} from {name}" for i in range(500)]))
        scripts[name] = path
        tables.append(f'[models.{name}]\nsource = {{ kind = "scripted", path = "{path}" }}\n')
    (bastion.home / "config.toml").write_text("\n".join(tables))
    return scripts


@pytest.fixture
def supervisor(bastion: Bastion, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start the supervisor with the given flags (once per test)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*flags: str) -> subprocess.Popen[bytes]:
        bastion.home.mkdir(parents=True, exist_ok=True)
        log = open(tmp_path / "supervisor.log", "ab")  # noqa: SIM115 - handed to the child
        with log:
            process = subprocess.Popen([sys.executable, "-m", "bastion.supervisor", *flags], env=bastion.env,
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        started.append(process)
        wait_for_supervisor(bastion, process.pid)
        return process

    yield start
    for process in started:
        process.terminate()  # as `bastion down` does, but reaping our own child (a zombie would hold `down` up)
        process.wait(timeout=60)


def models_of(bastion: Bastion) -> dict[str, dict]:
    """What `bastion ps --json` lists, by name (asked over the test's own control connection)."""
    return {name: msgspec.to_builtins(status) for name, status in bastion.models().items()}


def wait_for_entry(bastion: Bastion, name: str, ready, timeout: float = 60.0) -> dict:
    """The model's `ps` entry once `ready(entry)` holds (entry is None while it is not listed)."""
    return wait_until(lambda: (entry := models_of(bastion).get(name)) is not None and ready(entry) and entry,
                      timeout=timeout, interval=0.05, what=f"{name} to be ready")


def serving(entry: dict | None) -> bool:
    return entry is not None and entry["state"] in ("idle", "busy") and entry["pid"] > 0


def workers_of(bastion: Bastion) -> list[psutil.Process]:
    return [p for p in bastion.processes() if "bastion.worker" in " ".join(p.info["cmdline"] or [])]


@pytest.mark.e2e
def test_a_killed_worker_is_restarted_and_its_model_keeps_serving(bastion: Bastion, tmp_path: Path) -> None:
    scripted_models(bastion, tmp_path, "echo")
    assert bastion("load", "echo").returncode == 0
    before = models_of(bastion)["echo"]
    os.kill(before["pid"], signal.SIGKILL)
    after = wait_for_entry(bastion, "echo", lambda e: serving(e) and e["pid"] != before["pid"], timeout=30)
    assert after["restarts"] == 1 and "SIGKILL" in after["failure"]
    assert "idle (1 restart)" in bastion("ps").stdout
    done = bastion("run", "hi", "--model", "echo")
    assert done.returncode == 0 and done.stdout.strip() == "reply 0 from echo"  # a fresh worker replays from 0
    assert len(workers_of(bastion)) == 1


@pytest.mark.e2e
def test_a_model_that_keeps_crashing_fails_while_another_keeps_answering(bastion: Bastion, tmp_path: Path) -> None:
    scripted_models(bastion, tmp_path, "flaky", "steady")
    assert bastion("load", "flaky").returncode == 0
    assert bastion("load", "steady").returncode == 0
    steady_pid = models_of(bastion)["steady"]["pid"]
    for crash in range(3):
        entry = wait_for_entry(bastion, "flaky", serving, timeout=30)
        os.kill(entry["pid"], signal.SIGKILL)
        answer = bastion("run", "still there?", "--model", "steady")
        assert answer.returncode == 0 and answer.stdout.strip() == f"reply {crash} from steady"
    failed = wait_for_entry(bastion, "flaky", lambda e: e["state"] == "failed", timeout=30)
    assert failed["pid"] == 0 and failed["restarts"] == 2
    assert failed["failure"].startswith("crashed 3 times within 60 s; last: worker for flaky")
    assert "SIGKILL" in failed["failure"]
    table = bastion("ps").stdout
    assert "flaky failed: crashed 3 times" in table and "bastion load flaky" in table
    # A request for it is refused, clearly; the other model never noticed.
    code, lines = bastion.json("run", "hello?", "--model", "flaky")
    error = events_of(lines, "error")[0]
    assert code == 1 and error["code"] == "model_failed" and "`bastion load flaky`" in error["message"]
    assert models_of(bastion)["steady"]["pid"] == steady_pid
    assert models_of(bastion)["steady"]["restarts"] == 0
    # `bastion load` clears the mark and starts it afresh.
    loaded = bastion("load", "flaky")
    assert loaded.returncode == 0, loaded.stderr
    fresh = models_of(bastion)["flaky"]
    assert serving(fresh) and fresh["restarts"] == 0 and fresh["failure"] == ""
    assert bastion("run", "hello?", "--model", "flaky").stdout.strip() == "reply 0 from flaky"


@pytest.mark.e2e
def test_a_model_whose_restarts_die_on_load_ends_failed(bastion: Bastion, tmp_path: Path) -> None:
    scripts = scripted_models(bastion, tmp_path, "doomed")
    assert bastion("load", "doomed").returncode == 0
    pid = models_of(bastion)["doomed"]["pid"]
    scripts["doomed"].write_text('"no longer a list"')  # every restart now fails to load
    os.kill(pid, signal.SIGKILL)
    failed = wait_for_entry(bastion, "doomed", lambda e: e["state"] == "failed", timeout=30)
    assert "must hold a non-empty list of reply strings" in failed["failure"]
    assert workers_of(bastion) == []
    # Fixing the cause and loading it brings it back.
    scripts["doomed"].write_text('["back"]')
    assert bastion("load", "doomed").returncode == 0
    assert bastion("run", "hi", "--model", "doomed").stdout.strip() == "back"


@pytest.mark.e2e
def test_load_and_unload_while_a_model_is_restarting(bastion: Bastion, tmp_path: Path, supervisor) -> None:
    scripted_models(bastion, tmp_path, "slow")
    supervisor("--restart-first-backoff", "4", "--restart-backoff", "4", "--restart-backoff-max", "4")
    assert bastion("load", "slow").returncode == 0
    first = models_of(bastion)["slow"]["pid"]
    os.kill(first, signal.SIGKILL)
    wait_for_entry(bastion, "slow", lambda e: e["state"] == "restarting")
    # A load waits for the restart and reports the model loaded.
    started = time.monotonic()
    code, lines = bastion.json("load", "slow")
    assert code == 0 and lines[-1]["already_loaded"] is True
    assert lines[-1]["model"]["pid"] not in (0, first) and time.monotonic() - started > 0.5
    # An unload cancels a pending restart: nothing comes back.
    os.kill(lines[-1]["model"]["pid"], signal.SIGKILL)
    wait_for_entry(bastion, "slow", lambda e: e["state"] == "restarting")
    assert bastion("unload", "slow").returncode == 0
    log = tmp_path / "supervisor.log"
    wait_until(lambda: "slow: unloaded while restarting; its restart is cancelled" in log.read_text(),
               what="the restart cancelled")
    assert models_of(bastion) == {} and workers_of(bastion) == []


@pytest.mark.e2e
def test_a_silent_worker_is_killed_as_hung_and_restarted(bastion: Bastion, tmp_path: Path, supervisor) -> None:
    scripted_models(bastion, tmp_path, "frozen")
    supervisor("--worker-silence-limit", "3")
    assert bastion("load", "frozen").returncode == 0
    pid = models_of(bastion)["frozen"]["pid"]
    os.kill(pid, signal.SIGSTOP)  # alive but silent: only heartbeats can tell
    after = wait_for_entry(bastion, "frozen", lambda e: serving(e) and e["pid"] != pid, timeout=30)
    assert after["restarts"] == 1 and "no heartbeat" in after["failure"]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def long_prompt(words: int = 100) -> str:
    return " ".join(f"item{i}" for i in range(words)) + "\nWhich item came first?"


@pytest.mark.real_model
def test_a_generation_cut_before_its_first_token_is_retried(bastion: Bastion) -> None:
    process, events, first_token, reader = start_streaming(
        bastion, long_prompt(), "--session", "retry", "--max-tokens", "8", "--temperature", "0")

    def seen(kind: str) -> dict:
        event = wait_until(lambda: next((e for _, e in events if e["type"] == kind), None)
                           or (process.poll() is not None and {"type": "exited early"}),
                           timeout=120, interval=0.01, what=kind)
        assert event["type"] == kind, events
        return event

    pid = seen("run_start")["worker_pid"]
    os.kill(pid, signal.SIGSTOP)  # as early as the client can: the prompt's prefill takes far longer
    seen("context_budget")  # the generation is on its way to the stopped worker
    assert not first_token.is_set(), "the first token came before the worker could be stopped"
    # The generation was handed to the (stopped) worker: the model is busy with it.
    bastion.wait_for_model("smollm2-135m", lambda model: model.state is WorkerState.BUSY)
    os.kill(pid, signal.SIGKILL)
    assert process.wait(timeout=180) == 0, process.stderr.read() if process.stderr else ""
    reader.join(10)
    kinds = [e["type"] for _, e in events]
    warning = next(e for _, e in events if e["type"] == "warning")
    assert warning["code"] == "generation_retried" and "SIGKILL" in warning["message"]
    assert "error" not in kinds and kinds[-1] == "run_end"
    tokens = [e for _, e in events if e["type"] == "token"]
    counts = [t["n"] for t in tokens]  # one attempt's tokens only: the count starts at 1 once and only grows
    assert counts[0] == 1 and counts == sorted(set(counts)) and kinds.count("generation_stats") == 1
    _, (detail,) = bastion.json("sessions", "show", "retry")
    assert [(m["role"], m["interrupted"]) for m in detail["messages"]] == [("user", False), ("assistant", False)]


@pytest.mark.real_model
def test_a_worker_killed_mid_reply_interrupts_the_turn_and_the_session_goes_on(bastion: Bastion) -> None:
    process, events, first_token, reader = start_streaming(
        bastion, "Write a very long story about a lighthouse keeper.", "--session", "cut", "--max-tokens", "2000")
    assert first_token.wait(120)
    pid = next(e["worker_pid"] for _, e in events if e["type"] == "run_start")
    os.kill(pid, signal.SIGKILL)
    assert process.wait(timeout=60) == 1
    reader.join(10)
    error = next(e for _, e in events if e["type"] == "error")
    assert error["code"] == "worker_died" and "SIGKILL" in error["message"]
    assert not any(e["type"] == "warning" and e["code"] == "generation_retried" for _, e in events)
    _, (detail,) = bastion.json("sessions", "show", "cut")
    reply = detail["messages"][-1]
    assert reply["role"] == "assistant" and reply["interrupted"] is True and reply["content"]
    # The next turn waits for the restarted worker and goes on normally.
    code, lines = bastion.json("run", "Shorter, please.", "--session", "cut", "--max-tokens", "8")
    assert code == 0 and lines[-1]["stop_reason"] in ("stop", "length")
    assert events_of(lines, "run_start")[0]["worker_pid"] not in (0, pid)
    _, (detail,) = bastion.json("sessions", "show", "cut")
    assert [(m["role"], m["interrupted"]) for m in detail["messages"]] == [
        ("user", False), ("assistant", True), ("user", False), ("assistant", False)]


def freeze_engine_thread(pid: int) -> threading.Thread:
    """Stop only the worker's main thread, where its engine evaluates, as a
    deadlock would: its IO thread keeps answering heartbeats. (ptrace's
    SEIZE + INTERRUPT stops one thread, unlike SIGSTOP.) The returned thread
    waits for the worker's end, which must be collected by its tracer before
    its parent, the supervisor, hears of it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    for request in (PTRACE_SEIZE, PTRACE_INTERRUPT):
        if libc.ptrace(request, pid, None, None) != 0:
            pytest.skip(f"ptrace is not permitted here: {os.strerror(ctypes.get_errno())}")

    def collect() -> None:
        with contextlib.suppress(ChildProcessError):
            while not os.WIFSIGNALED(os.waitpid(pid, WALL)[1]):
                pass  # the interrupt's stop; then the kill

    reaper = threading.Thread(target=collect, daemon=True)
    reaper.start()
    return reaper


PTRACE_SEIZE, PTRACE_INTERRUPT, WALL = 0x4206, 0x4207, 0x40000000


@pytest.mark.real_model
def test_a_busy_worker_without_progress_is_killed_as_hung(bastion: Bastion, supervisor) -> None:
    supervisor("--worker-stall-limit", "3")
    assert bastion("load", "smollm2-135m").returncode == 0
    process, events, first_token, reader = start_streaming(
        bastion, "Write a very long story about a lighthouse keeper.", "--max-tokens", "2000")
    assert first_token.wait(120)
    pid = next(e["worker_pid"] for _, e in events if e["type"] == "run_start")
    frozen_at = time.monotonic()
    reaper = freeze_engine_thread(pid)
    assert process.wait(timeout=60) == 1
    reader.join(10)
    reaper.join(10)
    error = next((at, e) for at, e in events if e["type"] == "error")
    assert error[1]["code"] == "worker_unresponsive" and "busy with no progress" in error[1]["message"]
    assert 3 <= error[0] - frozen_at < 15  # heartbeats kept coming: only the progress counter told
    after = wait_for_entry(bastion, "smollm2-135m", serving, timeout=60)
    assert after["pid"] != pid and after["restarts"] == 1
    assert "killed as hung (busy with no progress" in after["failure"]
