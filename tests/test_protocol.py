"""Wire protocol: every message round-trips; bad frames are typed errors."""

from __future__ import annotations

import typing

import msgspec
import pytest

from bastion.protocol import (
    Cancel,
    ErrorCode,
    ProtocolError,
    TokenDelta,
    client_codec,
    supervisor_control_codec,
    supervisor_worker_codec,
    worker_codec,
)
from bastion.protocol.codec import all_tags, sandbox_codec, supervisor_sandbox_codec
from bastion.protocol.control import (
    ControlEvent,
    ControlRequest,
    Run,
)
from bastion.protocol.sandbox_wire import (
    FromSandbox,
    ToSandbox,
)
from bastion.protocol.worker_wire import (
    FromWorker,
    ToWorker,
)
from tests.protocol_samples import SAMPLES

DIRECTIONS = [
    ("to_worker", ToWorker, supervisor_worker_codec, worker_codec),
    ("from_worker", FromWorker, worker_codec, supervisor_worker_codec),
    ("control_request", ControlRequest, client_codec, supervisor_control_codec),
    ("control_event", ControlEvent, supervisor_control_codec, client_codec),
    ("to_sandbox", ToSandbox, supervisor_sandbox_codec, sandbox_codec),
    ("from_sandbox", FromSandbox, sandbox_codec, supervisor_sandbox_codec),
]


def members(union: object) -> set[type]:
    return set(typing.get_args(union))


def test_samples_cover_every_message_of_every_direction() -> None:
    covered = {type(sample) for sample in SAMPLES}
    for _, union, _, _ in DIRECTIONS:
        assert members(union) <= covered


def test_every_tag_names_exactly_one_struct() -> None:
    structs = set().union(*(members(union) for _, union, _, _ in DIRECTIONS))
    tags = [msgspec.inspect.type_info(cls).tag for cls in structs]
    assert len(tags) == len(set(tags)) == len(all_tags())


@pytest.mark.parametrize(("name", "union", "sender", "receiver"), DIRECTIONS, ids=[d[0] for d in DIRECTIONS])
def test_every_message_round_trips(name, union, sender, receiver) -> None:
    send, receive = sender(), receiver()
    for sample in SAMPLES:
        if type(sample) in members(union):
            assert receive.decode(send.encode(sample)) == sample


@pytest.mark.parametrize(("name", "union", "sender", "receiver"), DIRECTIONS, ids=[d[0] for d in DIRECTIONS])
def test_message_of_another_direction_is_rejected_on_both_edges(name, union, sender, receiver) -> None:
    send, receive = sender(), receiver()
    raw = msgspec.msgpack.Encoder()
    foreign = [s for s in SAMPLES if type(s) not in members(union)]
    assert foreign
    for sample in foreign:
        with pytest.raises(ProtocolError) as sent:
            send.encode(sample)
        assert sent.value.code is ErrorCode.WRONG_DIRECTION
        with pytest.raises(ProtocolError) as received:
            receive.decode(raw.encode(sample))
        assert received.value.code is ErrorCode.WRONG_DIRECTION, sample


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\xc1garbage", ErrorCode.MALFORMED_MESSAGE),
        (b"", ErrorCode.MALFORMED_MESSAGE),
        (msgspec.msgpack.encode(Run(request_id="r", prompt="hello"))[:-3], ErrorCode.MALFORMED_MESSAGE),
        (msgspec.msgpack.encode({"type": "teleport", "request_id": "r"}), ErrorCode.UNKNOWN_MESSAGE),
        (msgspec.msgpack.encode({"type": "run", "request_id": 5, "prompt": "x"}), ErrorCode.MALFORMED_MESSAGE),
        (msgspec.msgpack.encode([1, 2, 3]), ErrorCode.MALFORMED_MESSAGE),
        (msgspec.msgpack.encode({"no_type": 1}), ErrorCode.MALFORMED_MESSAGE),
    ],
    ids=["garbage", "empty", "truncated", "unknown_tag", "wrong_field_type", "not_a_map", "untagged"],
)
def test_bad_frames_are_typed_errors(frame: bytes, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as caught:
        supervisor_control_codec().decode(frame)
    assert caught.value.code is code


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    frame = msgspec.msgpack.encode({"type": "cancel", "request_id": "r", "added_in_v2": True})
    assert supervisor_control_codec().decode(frame) == Cancel(request_id="r")


def test_json_events_carry_their_type() -> None:
    line = msgspec.json.encode(TokenDelta(request_id="r", text="a", n=1, tokens_per_s=2.0))
    assert msgspec.json.decode(line) == {"type": "token", "request_id": "r", "text": "a", "n": 1, "tokens_per_s": 2.0}
