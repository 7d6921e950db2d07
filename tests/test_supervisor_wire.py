"""The supervisor's control socket under bad input: it answers with typed
errors and keeps serving. Driven with a raw ZeroMQ DEALER, not the CLI."""

from __future__ import annotations

from collections.abc import Iterator

import msgspec
import pytest
import zmq

from bastion.protocol import (
    PROTOCOL_VERSION,
    ErrorCode,
    Hello,
    HelloAccepted,
    HomeLayout,
    RequestFailed,
    Role,
    TokenDelta,
    client_codec,
)
from bastion.protocol.control import GetStatus, ListModels, ModelList, StatusReport
from tests.e2e_support import Bastion

pytestmark = pytest.mark.e2e


@pytest.fixture
def raw_socket(bastion: Bastion) -> Iterator[zmq.Socket]:
    assert bastion("up").returncode == 0
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(HomeLayout(bastion.home).control_endpoint)
    yield socket
    socket.close()
    context.term()


def receive(socket: zmq.Socket) -> object:
    assert socket.poll(10_000), "the supervisor did not answer"
    return client_codec().decode(socket.recv())


def hello(version: int = PROTOCOL_VERSION, role: Role = Role.CLIENT) -> bytes:
    return msgspec.msgpack.encode(Hello(protocol_version=version, role=role))


def test_requests_before_hello_are_refused(raw_socket: zmq.Socket) -> None:
    raw_socket.send(client_codec().encode(GetStatus(request_id="early")))
    answer = receive(raw_socket)
    assert isinstance(answer, RequestFailed) and answer.code is ErrorCode.HELLO_REQUIRED
    assert answer.request_id == "early"


def test_wrong_protocol_version_is_a_typed_error(raw_socket: zmq.Socket) -> None:
    raw_socket.send(hello(version=PROTOCOL_VERSION + 41))
    answer = receive(raw_socket)
    assert isinstance(answer, RequestFailed) and answer.code is ErrorCode.PROTOCOL_MISMATCH
    assert str(PROTOCOL_VERSION) in answer.message


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([b"\xc1\xff garbage"], ErrorCode.MALFORMED_MESSAGE),
        ([msgspec.msgpack.encode(GetStatus(request_id="t"))[:-2]], ErrorCode.MALFORMED_MESSAGE),
        ([msgspec.msgpack.encode({"type": "teleport", "request_id": "x"})], ErrorCode.UNKNOWN_MESSAGE),
        ([msgspec.msgpack.encode(TokenDelta(request_id="x", text="hi", n=1, tokens_per_s=1.0))],
         ErrorCode.WRONG_DIRECTION),
        ([b"one", b"two"], ErrorCode.MALFORMED_MESSAGE),
        ([b"\x82\xa4type\xa6cancel\xaarequest_id\xa2\xff\xfe"], ErrorCode.MALFORMED_MESSAGE),  # bad UTF-8
        ([b"\x91" * 100_000 + b"\x00"], ErrorCode.MALFORMED_MESSAGE),  # absurdly deep nesting
        ([b"x" * (17 * 2**20)], None),  # over the frame size limit: dropped by ZeroMQ
    ],
    ids=["garbage", "truncated", "unknown_tag", "wrong_direction", "two_frames", "invalid_utf8", "deep_nesting",
         "oversized"],
)
def test_bad_frames_get_typed_errors_and_the_supervisor_keeps_serving(
    raw_socket: zmq.Socket, frames: list[bytes], code: ErrorCode | None
) -> None:
    raw_socket.send(hello())
    assert isinstance(receive(raw_socket), HelloAccepted)
    raw_socket.send_multipart(frames)
    if code is not None:
        answer = receive(raw_socket)
        assert isinstance(answer, RequestFailed) and answer.code is code, answer
    # Still serving: on this connection (or a new one, if ZeroMQ dropped it for the oversized frame).
    raw_socket.send(hello())
    raw_socket.send(client_codec().encode(ListModels(request_id="after")))
    answers = [receive(raw_socket), receive(raw_socket)]
    assert any(isinstance(a, ModelList) and a.request_id == "after" for a in answers), answers


def test_a_worker_role_cannot_connect_as_a_client(raw_socket: zmq.Socket) -> None:
    raw_socket.send(hello(role=Role.WORKER))
    answer = receive(raw_socket)
    assert isinstance(answer, RequestFailed) and answer.code is ErrorCode.PROTOCOL_MISMATCH
    raw_socket.send(hello())
    assert isinstance(receive(raw_socket), HelloAccepted)
    raw_socket.send(client_codec().encode(GetStatus(request_id="s")))
    assert isinstance(receive(raw_socket), StatusReport)
