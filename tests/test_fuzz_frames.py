"""Fuzzing the edges: random, truncated, oversized and wrong-direction frames
thrown at a live supervisor's control socket and at a live worker. Nothing
crashes, every reply is a typed error, and a normal request works afterwards."""

from __future__ import annotations

import itertools
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.protocol import (
    PROTOCOL_VERSION,
    Hello,
    HelloAccepted,
    HomeLayout,
    RequestFailed,
    Role,
    client_codec,
)
from bastion.protocol.control import ListModels, ModelList
from tests.e2e_support import Bastion
from tests.fake_supervisor import FakeSupervisor
from tests.protocol_samples import SAMPLES as ALL_SAMPLES

pytestmark = pytest.mark.e2e

# Real messages of every kind, except the ones that would legitimately end the
# process under test (shutdown) or start minutes of work (loading a model).
SAMPLES = [m for m in ALL_SAMPLES if type(m).__struct_config__.tag not in ("shutdown", "load_model")]

_raw = msgspec.msgpack.Encoder()
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
# Bytes, msgpack of anything, real messages cut short, messages with a known tag
# and garbage fields, and messages of every direction (most are the wrong one).
FRAMES = st.one_of(
    st.binary(max_size=256),
    _VALUES.map(_raw.encode),
    st.sampled_from(SAMPLES).flatmap(
        lambda m: st.integers(0, max(0, len(_raw.encode(m)) - 1)).map(lambda n: _raw.encode(m)[:n])),
    st.tuples(st.sampled_from([type(m).__struct_config__.tag for m in SAMPLES]),
              st.dictionaries(st.text(max_size=8), _VALUES, max_size=3))
    .map(lambda tag_fields: _raw.encode({**tag_fields[1], "type": tag_fields[0]})),
    st.sampled_from(SAMPLES).map(_raw.encode),
)
_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Bastion, zmq.Socket]]:
    bastion = Bastion(tmp_path_factory.mktemp("fuzz") / "home")
    assert bastion("up").returncode == 0
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(HomeLayout(bastion.home).control_endpoint)
    socket.send(client_codec().encode(Hello(protocol_version=PROTOCOL_VERSION, role=Role.CLIENT)))
    assert socket.poll(10_000)
    assert isinstance(client_codec().decode(socket.recv()), HelloAccepted)
    yield bastion, socket
    socket.close()
    context.term()
    bastion.cleanup()


_sentinels = itertools.count(1)


def _replies_until_answered(socket: zmq.Socket, request_id: str, timeout_s: float = 30.0) -> list[object]:
    """Every reply up to the answer to `request_id`, decoded (they must all decode). The
    supervisor answers frames in the order they arrive, so the answer to a request sent
    last comes after the replies to the frames before it; replies to valid requests that
    run as tasks may come later, and are read (and checked) with the next example's."""
    replies: list[object] = []
    deadline = time.monotonic() + timeout_s
    while True:
        assert socket.poll(max(0, int((deadline - time.monotonic()) * 1000))), f"no answer to {request_id}: {replies}"
        reply = client_codec().decode(socket.recv())
        replies.append(reply)
        if isinstance(reply, ModelList) and reply.request_id == request_id:
            return replies


@given(frames=st.lists(FRAMES, min_size=1, max_size=5))
@_SETTINGS
def test_the_control_socket_answers_bad_frames_with_typed_errors(control, frames: list[bytes]) -> None:
    _bastion, socket = control
    for frame in frames:
        socket.send(frame)
    sentinel = f"still-serving-{next(_sentinels)}"
    socket.send(client_codec().encode(ListModels(request_id=sentinel)))
    # A valid request in the mix gets its real answer; everything else is a typed error.
    for reply in _replies_until_answered(socket, sentinel):
        assert isinstance(reply, msgspec.Struct)


@pytest.mark.real_model
def test_after_the_fuzzing_the_supervisor_still_runs_a_model(control) -> None:
    bastion, _socket = control
    code, lines = bastion.json("run", "Hi", "--max-tokens", "3")
    assert code == 0, lines
    assert "".join(line["text"] for line in lines if line["type"] == "token").strip()
    assert lines[-1]["type"] == "run_end" and lines[-1]["stop_reason"] in ("stop", "length")


@pytest.fixture(scope="module")
def worker() -> Iterator[FakeSupervisor]:
    directory = Path(tempfile.mkdtemp(prefix="bf-"))
    supervisor = FakeSupervisor(directory)
    supervisor.start("--fake-script", supervisor.script("fuzzed but fine"))
    supervisor.ready()
    yield supervisor
    supervisor.close()
    shutil.rmtree(directory, ignore_errors=True)


@given(frames=st.lists(FRAMES, min_size=1, max_size=5))
@_SETTINGS
def test_a_worker_answers_bad_frames_with_typed_errors_and_keeps_serving(worker, frames: list[bytes]) -> None:
    for frame in frames:
        worker.send_raw(frame)
    # Replies to the frames come before the answer to a request sent after them; every
    # one decodes (recv fails the test otherwise).
    request_id = f"after-fuzz-{next(_sentinels)}"
    worker.generate(request_id, max_tokens=4)
    finished = worker.until_finished(request_id)
    assert worker.processes[0].poll() is None, worker.stderr()
    assert not any(isinstance(m, RequestFailed) and m.request_id == request_id for m in finished), finished
