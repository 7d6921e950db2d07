"""How the supervisor shares cores among busy workers (supervisor/processes/cores.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.protocol import HomeLayout, SamplingParams, StopReason, TokenDelta, WorkerState
from bastion.protocol.worker_wire import Generate, GenerationFinished, SetThreads
from bastion.supervisor.config import SupervisorConfig
from bastion.supervisor.processes.cores import available_cpus, cpu_sets, pin_process, share_cores
from bastion.supervisor.processes.worker_handle import WorkerHandle, WorkerLaunch
from bastion.supervisor.processes.workers import WorkerPool
from bastion.supervisor.runs import ActiveRun, Generation


@pytest.mark.parametrize(
    ("busy", "cores", "ceilings", "expected"),
    [
        ([], 2, {}, {}),
        (["a"], 2, {"a": 2}, {"a": 2}),
        (["a", "b"], 2, {"a": 2, "b": 2}, {"a": 1, "b": 1}),
        (["a", "b"], 8, {"a": 8, "b": 8}, {"a": 4, "b": 4}),
        (["a", "b", "c"], 8, {}, {"a": 3, "b": 3, "c": 2}),
        (["a", "b", "c"], 2, {}, {"a": 1, "b": 1, "c": 1}),  # never zero
        (["a", "b"], 8, {"a": 2}, {"a": 2, "b": 4}),  # a model's own ceiling holds
    ],
)
def test_share_cores(busy, cores, ceilings, expected) -> None:
    assert share_cores(busy, cores, ceilings) == expected


def test_cpu_sets_are_disjoint_when_they_fit_and_shared_when_not() -> None:
    assert cpu_sets({"a": 1, "b": 1}, [0, 1]) == {"a": [0], "b": [1]}
    assert cpu_sets({"a": 2, "b": 2}, [0, 1, 2, 3]) == {"a": [0, 1], "b": [2, 3]}
    assert cpu_sets({"a": 1, "b": 1, "c": 1}, [0, 1]) == {"a": [0, 1], "b": [0, 1], "c": [0, 1]}


@pytest.mark.e2e
def test_pin_process_pins_every_thread_of_a_live_process_and_refuses_a_dead_one() -> None:
    cpus = available_cpus()
    child = subprocess.Popen(
        [sys.executable, "-c", "import threading,time; threading.Thread(target=time.sleep, args=(30,)).start(); "
         "print('ready', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        assert pin_process(child.pid, cpus[:1])
        tasks = os.listdir(f"/proc/{child.pid}/task")
        assert len(tasks) >= 2
        assert all(os.sched_getaffinity(int(task)) == {cpus[0]} for task in tasks)
    finally:
        child.kill()
        child.wait()
    assert pin_process(child.pid, cpus[:1]) is False


# --- the pool's side: SetThreads as workers start and stop generating -------------


def test_the_pool_shares_the_cores_as_workers_start_and_stop_generating(tmp_path: Path) -> None:
    async def scenario() -> list[tuple[str, object]]:
        sent: list[tuple[str, object]] = []
        config = SupervisorConfig()
        pool = WorkerPool(config=config, layout=HomeLayout(tmp_path), send=lambda who, m: sent.append((who.decode(), m)))
        pool._cpus = [0, 1]  # the machine this test pretends to be
        handles = []
        for name in ("a", "b"):
            launch = WorkerLaunch(name=name, model_path=Path("/m.gguf"), n_ctx=512, threads=2)
            handle = WorkerHandle(worker_id=name, launch=launch, send=pool._send, config=config)
            handle.state = WorkerState.IDLE
            handle.on_activity = pool.share_cores
            pool._by_identity[handle.identity] = handle
            handles.append(handle)
        run = ActiveRun(request_id="r", client=b"c", sink=lambda _c, _e: None)

        def generation(i: str) -> Generation:
            return Generation(internal_id=i, session_id="s", prompt="p", sampling=SamplingParams(), run=run)

        handles[0].submit(generation("g1"))  # alone: its full two threads, nothing to send
        handles[1].submit(generation("g2"))  # now two busy workers on two cores
        handles[1].on_message(GenerationFinished(request_id="g2", stop_reason=StopReason.STOP, completion_tokens=1,
                                                 kv_tokens=1))  # fmt: skip
        return sent

    sent = asyncio.run(scenario())
    kinds = [(who, type(m).__name__, getattr(m, "threads", None)) for who, m in sent]
    assert kinds == [
        ("a", "Generate", None),
        ("a", "SetThreads", 1),  # mid-generation: b is starting
        ("b", "SetThreads", 1),  # before b's Generate
        ("b", "Generate", None),
        ("a", "SetThreads", 2),  # b is done: a gets the machine back
    ]
    assert all(isinstance(m, Generate | SetThreads) for _, m in sent)


def test_a_parallel_worker_runs_that_many_generations_queues_the_rest_and_a_crash_fails_them_all() -> None:
    async def scenario() -> None:
        sent: list[object] = []
        config = SupervisorConfig()
        launch = WorkerLaunch(name="m", model_path=Path("/m.gguf"), n_ctx=512, threads=2, parallel=2)
        handle = WorkerHandle(worker_id="w", launch=launch, send=lambda _who, m: sent.append(m), config=config)
        handle.state = WorkerState.IDLE
        run = ActiveRun(request_id="r", client=b"c", sink=lambda _c, _e: None)
        generations = [Generation(internal_id=f"g{i}", session_id=f"s{i}", prompt="p", sampling=SamplingParams(),
                                  run=run) for i in range(4)]  # fmt: skip
        for generation in generations:
            handle.submit(generation)
        assert [m.request_id for m in sent if isinstance(m, Generate)] == ["g0", "g1"]
        assert list(handle.running) == ["g0", "g1"] and len(handle.queue) == 2
        # Messages reach their own generation; the end of one starts the next in line.
        handle.on_message(TokenDelta(request_id="g1", text="x", n=1, tokens_per_s=0.0))
        handle.on_message(GenerationFinished(request_id="g0", stop_reason=StopReason.STOP, completion_tokens=1,
                                             kv_tokens=3))  # fmt: skip
        assert generations[0].outcome.done() and generations[1].tokens_streamed == 1
        assert list(handle.running) == ["g1", "g2"] and [g.internal_id for g in handle.queue] == ["g3"]
        handle.cancel(generations[3])  # queued: ends at once, the worker never hears of it
        assert generations[3].outcome.result().stop_reason is StopReason.CANCELLED
        handle.on_exit(-9)  # the worker crashed: every generation in flight fails, retryable
        for generation in generations[1:3]:
            outcome = generation.outcome.result()
            assert outcome.stop_reason is StopReason.ERROR and outcome.worker_died
            assert outcome.error is not None and outcome.error.retryable
        assert not handle.running and not handle.queue

    asyncio.run(scenario())
