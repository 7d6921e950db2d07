"""The wire protocol of bastion: the only code the processes share.

Owns the message types for every socket direction, their codecs, error codes,
the protocol version and where a bastion home keeps its sockets. It imports
nothing of the project, so the supervisor, workers, sandboxes and the CLI can
all depend on it without depending on each other.

Directions and their unions:

    client  -> supervisor   ControlRequest      (control.py)
    supervisor -> client    ControlEvent        (control.py)
    supervisor -> worker    ToWorker            (worker_wire.py)
    worker  -> supervisor   FromWorker          (worker_wire.py)

Shared building blocks (handshake, heartbeats, errors, stats) live in common.py.
"""

from bastion.protocol.codec import (
    Codec,
    client_codec,
    supervisor_control_codec,
    supervisor_worker_codec,
    worker_codec,
)
from bastion.protocol.common import (
    MAX_PARALLEL,
    CacheSource,
    Cancel,
    GenerationStats,
    Heartbeat,
    Hello,
    HelloAccepted,
    KvCacheType,
    RequestFailed,
    Role,
    SamplingParams,
    Shutdown,
    StopReason,
    TokenChoice,
    TokenDelta,
    TokenLogprobs,
    WorkerState,
)
from bastion.protocol.errors import ErrorCode, ProtocolError
from bastion.protocol.home import HomeLayout
from bastion.protocol.version import PROTOCOL_VERSION

__all__ = [
    "PROTOCOL_VERSION",
    "Cancel",
    "Codec",
    "ErrorCode",
    "GenerationStats",
    "Heartbeat",
    "Hello",
    "HelloAccepted",
    "HomeLayout",
    "ProtocolError",
    "RequestFailed",
    "Role",
    "SamplingParams",
    "Shutdown",
    "StopReason",
    "MAX_PARALLEL",
    "KvCacheType",
    "TokenChoice",
    "TokenDelta",
    "TokenLogprobs",
    "WorkerState",
    "CacheSource",
    "client_codec",
    "supervisor_control_codec",
    "supervisor_worker_codec",
    "worker_codec",
]
