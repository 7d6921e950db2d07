"""The worker as a real process (`python -m bastion.worker`) against a ROUTER the
test binds: handshake, streaming, errors as data, cancel, heartbeats, exits."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import psutil
import pytest

from bastion.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    ErrorCode,
    GenerationStats,
    Heartbeat,
    Hello,
    HelloAccepted,
    RequestFailed,
    Role,
    Shutdown,
    StopReason,
    TokenDelta,
)
from bastion.protocol.common import Message
from bastion.protocol.control import Run
from bastion.protocol.worker_wire import (
    FromWorker,
    Generate,
    GenerationFinished,
    WorkerLoadFailed,
    WorkerReady,
)
from tests.fake_supervisor import TIMEOUT, FakeSupervisor
from tests.real_models import smollm2_gguf

pytestmark = pytest.mark.e2e

LONG_REPLY = " ".join(f"The quick brown fox number {i} jumps." for i in range(20))




@pytest.fixture
def supervisor() -> Iterator[FakeSupervisor]:
    # pytest's tmp_path can exceed the ~107-byte limit of a unix socket path.
    directory = Path(tempfile.mkdtemp(prefix="bw-"))
    sup = FakeSupervisor(directory)
    yield sup
    sup.close()
    shutil.rmtree(directory, ignore_errors=True)


def exit_code(process: subprocess.Popen[bytes], sup: FakeSupervisor) -> int:
    try:
        return process.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"worker did not exit\n{sup.stderr()}")


def ended(messages: list[FromWorker]) -> tuple[str, GenerationStats, GenerationFinished]:
    stats, finished = messages[-2], messages[-1]
    assert isinstance(stats, GenerationStats) and isinstance(finished, GenerationFinished), messages[-2:]
    assert all(isinstance(m, TokenDelta) for m in messages[:-2])
    return "".join(m.text for m in messages if isinstance(m, TokenDelta)), stats, finished


def test_handshake_then_ready_then_streams_and_shuts_down(supervisor: FakeSupervisor) -> None:
    process = supervisor.start("--fake-script", supervisor.script("Hello, supervisor."))
    hello = supervisor.accept()
    assert hello.role is Role.WORKER and hello.name == "w1" and hello.pid == process.pid
    assert hello.protocol_version == PROTOCOL_VERSION
    assert supervisor.identity == b"w1"
    ready = supervisor.recv()
    assert isinstance(ready, WorkerReady)
    assert ready.model.name == "test-model" and ready.model.architecture == "fake"
    assert ready.model.n_ctx == 2048 and ready.model.rss_bytes > 0
    supervisor.generate("g1")
    text, stats, finished = ended(supervisor.until_finished("g1"))
    assert text == "Hello, supervisor."
    assert finished.stop_reason is StopReason.STOP
    assert stats.completion_tokens == finished.completion_tokens == 18
    supervisor.send(Shutdown())
    assert exit_code(process, supervisor) == 0


@pytest.mark.real_model
def test_real_model_streams_through_the_socket(supervisor: FakeSupervisor) -> None:
    process = supervisor.start(engine="llama", model=str(smollm2_gguf()))
    ready = supervisor.ready()
    assert ready.model.architecture == "llama" and ready.model.has_chat_template
    assert ready.model.file_size > 0 and ready.model.n_params > 100_000_000
    prompt = "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"
    supervisor.generate("g1", prompt, temperature=0.0, max_tokens=32)
    text, stats, finished = ended(supervisor.until_finished("g1"))
    assert text.strip() and "\ufffd" not in text
    assert finished.stop_reason in (StopReason.STOP, StopReason.LENGTH)
    assert 0 < stats.completion_tokens <= 32 and stats.decode_tokens_per_s > 0
    follow_up = prompt + text + "<|im_end|>\n<|im_start|>user\nAnd three more.<|im_end|>\n"
    supervisor.generate("g2", follow_up, max_tokens=4)
    _, again, _ = ended(supervisor.until_finished("g2"))
    assert again.cached_tokens >= stats.prompt_tokens
    supervisor.send(Shutdown())
    assert exit_code(process, supervisor) == 0


def test_invalid_model_file_fails_the_load_and_exits_1(supervisor: FakeSupervisor) -> None:
    not_a_model = supervisor.directory / "model.gguf"
    not_a_model.write_text("this is not a GGUF file")
    process = supervisor.start(engine="llama", model=str(not_a_model))
    supervisor.accept()
    failed = supervisor.recv()
    assert isinstance(failed, WorkerLoadFailed) and failed.code is ErrorCode.INVALID_MODEL_FILE
    assert exit_code(process, supervisor) == 1


@pytest.mark.parametrize(
    "answer",
    [
        HelloAccepted(protocol_version=PROTOCOL_VERSION + 1, supervisor_pid=1),
        RequestFailed(code=ErrorCode.PROTOCOL_MISMATCH, message="speak version 99"),
    ],
    ids=["other-version", "refused"],
)
def test_protocol_mismatch_exits_3(supervisor: FakeSupervisor, answer: Message) -> None:
    process = supervisor.start()
    assert isinstance(supervisor.recv(), Hello)
    supervisor.send(answer)
    assert exit_code(process, supervisor) == 3


def test_bad_frames_get_typed_errors_and_the_worker_keeps_serving(supervisor: FakeSupervisor) -> None:
    supervisor.start("--fake-script", supervisor.script("still here"))
    supervisor.ready()
    whole = supervisor.codec.encode(Generate(request_id="x", session_id="s", prompt="p"))
    encode = msgspec.msgpack.encode
    cases = [
        (b"\xc1 not msgpack", ErrorCode.MALFORMED_MESSAGE),
        (whole[: len(whole) // 2], ErrorCode.MALFORMED_MESSAGE),
        (encode({"type": "teleport", "to": "mars"}), ErrorCode.UNKNOWN_MESSAGE),
        (encode(Run(request_id="c1", prompt="control, not worker")), ErrorCode.WRONG_DIRECTION),
        (encode(TokenDelta(request_id="t", text="mine", n=1, tokens_per_s=1.0)), ErrorCode.WRONG_DIRECTION),
    ]
    for frame, code in cases:
        supervisor.send_raw(frame)
        reply = supervisor.recv()
        assert isinstance(reply, RequestFailed), reply
        assert reply.code is code and reply.request_id == ""
    supervisor.generate("g1")
    text, _, finished = ended(supervisor.until_finished("g1"))
    assert text == "still here" and finished.stop_reason is StopReason.STOP


def test_cancel_mid_generation_then_serves_again(supervisor: FakeSupervisor) -> None:
    supervisor.start("--fake-script", supervisor.script(LONG_REPLY, "done"), "--fake-token-delay", "0.02")
    supervisor.ready()
    supervisor.generate("g1", max_tokens=500)
    first = supervisor.recv()
    assert isinstance(first, TokenDelta)
    supervisor.send(Cancel(request_id="g1"))
    _, stats, finished = ended([first, *supervisor.until_finished("g1")])
    assert finished.stop_reason is StopReason.CANCELLED
    assert 1 <= stats.completion_tokens < 100
    supervisor.generate("g2")
    text, _, finished = ended(supervisor.until_finished("g2"))
    assert text == "done" and finished.stop_reason is StopReason.STOP


def test_second_generate_while_busy_is_refused_as_retryable(supervisor: FakeSupervisor) -> None:
    supervisor.start("--fake-script", supervisor.script("slow reply"), "--fake-token-delay", "0.05")
    supervisor.ready()
    supervisor.generate("g1")
    assert isinstance(supervisor.recv(), TokenDelta)
    supervisor.generate("g2")
    seen = supervisor.until_finished("g2")
    refused = [m for m in seen if isinstance(m, RequestFailed)]
    assert len(refused) == 1 and refused[0].request_id == "g2"
    assert refused[0].code is ErrorCode.BUSY and refused[0].retryable
    assert isinstance(seen[-1], GenerationFinished) and seen[-1].stop_reason is StopReason.ERROR
    rest = [m for m in seen if isinstance(m, TokenDelta)] + supervisor.until_finished("g1")
    _, _, finished = ended(rest)
    assert finished.stop_reason is StopReason.STOP


def test_engine_failure_is_reported_and_worker_keeps_serving(supervisor: FakeSupervisor) -> None:
    supervisor.start("--fake-script", supervisor.script("recovered"))
    supervisor.ready()
    supervisor.generate("g1", prompt="make it <<fail>>")
    failed, finished = supervisor.until_finished("g1")
    assert isinstance(failed, RequestFailed) and failed.request_id == "g1"
    assert failed.code is ErrorCode.INTERNAL
    assert isinstance(finished, GenerationFinished) and finished.stop_reason is StopReason.ERROR
    supervisor.generate("g2")
    text, _, _ = ended(supervisor.until_finished("g2"))
    assert text == "recovered"


def test_heartbeats_report_busy_and_growing_progress(supervisor: FakeSupervisor) -> None:
    script = supervisor.script(LONG_REPLY)
    supervisor.start("--fake-script", script, "--fake-token-delay", "0.01", "--heartbeat-interval", "0.1")
    supervisor.ready()
    supervisor.generate("g1", max_tokens=80)
    supervisor.until_finished("g1")
    busy = [h for h in supervisor.heartbeats if h.busy]
    assert len(busy) >= 3
    assert [h.seq for h in supervisor.heartbeats] == sorted({h.seq for h in supervisor.heartbeats})
    assert busy[-1].progress > busy[0].progress
    while (beat := supervisor.recv_raw()) and not isinstance(beat, Heartbeat):
        pass
    assert not beat.busy and beat.kv_tokens > 80


def test_heartbeats_flow_during_a_slow_load(supervisor: FakeSupervisor) -> None:
    supervisor.start("--fake-load-delay", "1.0", "--heartbeat-interval", "0.1")
    supervisor.accept()
    assert isinstance(supervisor.recv(), WorkerReady)
    assert len(supervisor.heartbeats) >= 5
    assert all(not h.busy and h.progress == 0 for h in supervisor.heartbeats)


def test_generate_sent_during_the_load_is_served_once_loaded(supervisor: FakeSupervisor) -> None:
    supervisor.start("--fake-load-delay", "0.5", "--fake-script", supervisor.script("was queued"))
    supervisor.accept()
    supervisor.generate("early")
    assert isinstance(supervisor.recv(), WorkerReady)
    text, _, finished = ended(supervisor.until_finished("early"))
    assert text == "was queued" and finished.stop_reason is StopReason.STOP


def test_worker_exits_when_supervisor_heartbeats_stop(supervisor: FakeSupervisor) -> None:
    process = supervisor.start("--heartbeat-interval", "0.1", "--heartbeat-timeout", "1.0")
    supervisor.ready()
    started = time.monotonic()
    assert exit_code(process, supervisor) == 4
    assert time.monotonic() - started < 5.0
    assert "no word from the supervisor" in supervisor.stderr()


def test_sigterm_cancels_the_generation_and_exits_cleanly(supervisor: FakeSupervisor) -> None:
    process = supervisor.start("--fake-script", supervisor.script(LONG_REPLY), "--fake-token-delay", "0.02")
    supervisor.ready()
    supervisor.generate("g1", max_tokens=500)
    assert isinstance(supervisor.recv(), TokenDelta)
    process.send_signal(signal.SIGTERM)
    *_, finished = supervisor.until_finished("g1")
    assert isinstance(finished, GenerationFinished) and finished.stop_reason is StopReason.CANCELLED
    assert exit_code(process, supervisor) == 0


def test_wrong_parent_pid_exits_at_once(supervisor: FakeSupervisor) -> None:
    process = supervisor.start("--parent-pid", "1")
    assert exit_code(process, supervisor) == 4
    assert not supervisor.router.poll(0)  # it never said hello


def test_worker_dies_with_its_parent(supervisor: FakeSupervisor) -> None:
    # An intermediate parent that spawns the worker with its own pid, then waits.
    parent_code = (
        "import os, subprocess, sys\n"
        "worker = subprocess.Popen(sys.argv[1:] + ['--parent-pid', str(os.getpid())])\n"
        "print(worker.pid, flush=True)\n"
        "worker.wait()\n"
    )
    command = [sys.executable, "-c", parent_code, *supervisor.command()]
    parent = subprocess.Popen(command, stdout=subprocess.PIPE)
    supervisor.processes.append(parent)
    assert parent.stdout is not None
    worker = psutil.Process(int(parent.stdout.readline()))
    supervisor.ready()
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + TIMEOUT
    while not gone(worker):
        if time.monotonic() > deadline:
            worker.kill()
            pytest.fail(f"worker outlived its parent\n{supervisor.stderr()}")
        time.sleep(0.05)  # polling the process table; nothing to wait on for a non-child


def gone(process: psutil.Process) -> bool:
    """Exited; an orphan may stay a zombie if no init reaps it."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_parallel_worker_serves_as_many_requests_at_once_and_refuses_one_more(supervisor: FakeSupervisor) -> None:
    supervisor.start("--fake-script", supervisor.script("first of two", "second of two", LONG_REPLY, "short"),
                     "--parallel", "2", "--fake-token-delay", "0.02")
    supervisor.ready()
    supervisor.generate("g1")
    supervisor.generate("g2")
    supervisor.generate("g3")  # a third while both sequences are busy
    seen: list[FromWorker] = []
    finished: set[str] = set()
    while finished != {"g1", "g2", "g3"}:
        message = supervisor.recv()
        seen.append(message)
        if isinstance(message, GenerationFinished):
            finished.add(message.request_id)
    texts = {rid: "".join(m.text for m in seen if isinstance(m, TokenDelta) and m.request_id == rid)
             for rid in ("g1", "g2")}
    assert texts == {"g1": "first of two", "g2": "second of two"}
    # Interleaved on the wire: both were decoding at once.
    order = [m.request_id for m in seen if isinstance(m, TokenDelta)]
    assert order.index("g2") < len(order) - order[::-1].index("g1") - 1
    (refused,) = [m for m in seen if isinstance(m, RequestFailed)]
    assert refused.request_id == "g3" and refused.code is ErrorCode.BUSY and refused.retryable
    # A cancel reaches only its own request.
    supervisor.generate("g4", max_tokens=500)
    supervisor.generate("g5", max_tokens=40)
    supervisor.send(Cancel(request_id="g4"))
    ends = {}
    while len(ends) < 2:
        message = supervisor.recv()
        if isinstance(message, GenerationFinished):
            ends[message.request_id] = message.stop_reason
    assert ends["g4"] is StopReason.CANCELLED and ends["g5"] in (StopReason.STOP, StopReason.LENGTH)


def test_the_worker_refuses_a_parallel_count_out_of_bounds(supervisor: FakeSupervisor) -> None:
    for bad in ("0", "17"):
        process = supervisor.start("--parallel", bad)
        assert exit_code(process, supervisor) == 2
    assert "--parallel must be between 1 and 16" in supervisor.stderr()
