"""Encoding and decoding for each socket direction.

A `Codec` knows what its side may send and what it may receive. Encoding a
message that does not belong to the sending union is a bug and raises;
decoding anything that is not a valid message of the receiving union raises
`ProtocolError` with a code that says why (malformed, unknown tag, a message of
the other direction). Receiving loops catch it, reply or log, and keep serving.

msgpack only; never pickle.
"""

from __future__ import annotations

import typing
from typing import Any, Generic, TypeVar

import msgspec

from bastion.protocol import common
from bastion.protocol.control import ControlEvent, ControlRequest
from bastion.protocol.errors import ErrorCode, ProtocolError
from bastion.protocol.sandbox_wire import FromSandbox, ToSandbox
from bastion.protocol.worker_wire import FromWorker, ToWorker

Incoming = TypeVar("Incoming")


class _TagOnly(msgspec.Struct):
    type: Any = None


def _members(union: Any) -> tuple[type, ...]:
    return tuple(typing.get_args(union)) or (union,)


def _tag_of(cls: type) -> str:
    # Read from the struct's own config: msgspec.inspect.type_info walks every field's
    # type, which for the ~120 message types took 40 ms of each CLI call.
    return str(cls.__struct_config__.tag)  # type: ignore[attr-defined]


def all_tags() -> frozenset[str]:
    unions = (ToWorker, FromWorker, ControlRequest, ControlEvent, ToSandbox, FromSandbox)
    return frozenset(_tag_of(cls) for union in unions for cls in _members(union))


class Codec(Generic[Incoming]):
    def __init__(self, *, sends: Any, receives: Any) -> None:
        self._sendable = _members(sends)
        self._receivable_tags = frozenset(_tag_of(cls) for cls in _members(receives))
        self._known_tags = all_tags()
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder: msgspec.msgpack.Decoder[Incoming] = msgspec.msgpack.Decoder(receives)
        self._tag_decoder = msgspec.msgpack.Decoder(_TagOnly)

    def encode(self, message: common.Message) -> bytes:
        if not isinstance(message, self._sendable):
            raise ProtocolError(
                ErrorCode.WRONG_DIRECTION,
                f"{type(message).__name__} is not sent in this direction",
            )
        return self._encoder.encode(message)

    def decode(self, frame: bytes | memoryview) -> Incoming:
        try:
            return self._decoder.decode(frame)
        except msgspec.ValidationError as exc:
            raise self._classify(frame, exc) from exc
        except msgspec.DecodeError as exc:
            raise ProtocolError(ErrorCode.MALFORMED_MESSAGE, f"undecodable frame: {exc}") from exc
        except (ValueError, RecursionError) as exc:
            # Invalid UTF-8 in a string, absurd nesting: still just a bad frame.
            raise ProtocolError(ErrorCode.MALFORMED_MESSAGE, f"undecodable frame: {type(exc).__name__}") from exc

    def _classify(self, frame: bytes | memoryview, exc: msgspec.ValidationError) -> ProtocolError:
        try:
            tag = self._tag_decoder.decode(frame).type
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError, RecursionError):
            tag = None
        if isinstance(tag, str) and tag in self._known_tags and tag not in self._receivable_tags:
            return ProtocolError(ErrorCode.WRONG_DIRECTION, f"'{tag}' is not accepted in this direction")
        if isinstance(tag, str) and tag not in self._known_tags:
            return ProtocolError(ErrorCode.UNKNOWN_MESSAGE, f"unknown message type '{tag}'")
        return ProtocolError(ErrorCode.MALFORMED_MESSAGE, f"invalid message: {exc}")


def worker_codec() -> Codec[ToWorker]:
    """The worker's side of the worker link."""
    return Codec(sends=FromWorker, receives=ToWorker)


def supervisor_worker_codec() -> Codec[FromWorker]:
    """The supervisor's side of the worker link."""
    return Codec(sends=ToWorker, receives=FromWorker)


def supervisor_control_codec() -> Codec[ControlRequest]:
    """The supervisor's side of the control link."""
    return Codec(sends=ControlEvent, receives=ControlRequest)


def client_codec() -> Codec[ControlEvent]:
    """A client's side of the control link."""
    return Codec(sends=ControlRequest, receives=ControlEvent)


def sandbox_codec() -> Codec[ToSandbox]:
    """The sandbox's side of the tools link."""
    return Codec(sends=FromSandbox, receives=ToSandbox)


def supervisor_sandbox_codec() -> Codec[FromSandbox]:
    """The supervisor's side of the tools link."""
    return Codec(sends=ToSandbox, receives=FromSandbox)
