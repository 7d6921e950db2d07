"""Error codes that cross process boundaries, and the exception for bad frames.

Inside a process failures are exceptions; on the wire they are data: a
`RequestFailed` message carrying an `ErrorCode`, a human message and whether
retrying can help. `ProtocolError` is what a codec raises for a frame it cannot
accept; the receiving loop turns it into a `RequestFailed` reply or a logged
drop and keeps serving.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    # The frame itself is wrong.
    PROTOCOL_MISMATCH = "protocol_mismatch"
    MALFORMED_MESSAGE = "malformed_message"
    UNKNOWN_MESSAGE = "unknown_message"
    WRONG_DIRECTION = "wrong_direction"
    HELLO_REQUIRED = "hello_required"
    # The request is well formed but cannot be served as asked.
    INVALID_REQUEST = "invalid_request"
    DUPLICATE_REQUEST = "duplicate_request"
    UNKNOWN_REQUEST = "unknown_request"
    UNKNOWN_MODEL = "unknown_model"
    INVALID_MODEL_FILE = "invalid_model_file"
    CONTEXT_OVERFLOW = "context_overflow"
    BUSY = "busy"
    # Something failed while serving it.
    MODEL_LOAD_FAILED = "model_load_failed"
    WORKER_DIED = "worker_died"
    WORKER_UNRESPONSIVE = "worker_unresponsive"
    SHUTTING_DOWN = "shutting_down"
    MODEL_UNLOADED = "model_unloaded"
    MODEL_FAILED = "model_failed"  # crashed repeatedly; `bastion load` clears it
    INSUFFICIENT_MEMORY = "insufficient_memory"
    SUPERVISOR_UNAVAILABLE = "supervisor_unavailable"
    # A remote engine (protocol/remote.py) could not be reached: no connection,
    # a refused one, TLS or name resolution failed. Nothing was generated.
    REMOTE_UNREACHABLE = "remote_unreachable"
    # The remote engine answered with an error (an HTTP error status, an error
    # object in the stream, a body that is not its protocol).
    REMOTE_ERROR = "remote_error"
    # The remote's reply stopped partway (connection cut, silent past the idle
    # timeout, no end marker): what came before is kept.
    REMOTE_INTERRUPTED = "remote_interrupted"
    INTERNAL = "internal"


# Codes that mean "the user asked for something that cannot exist", as opposed
# to a runtime failure. The CLI maps them to exit code 2.
USAGE_ERROR_CODES = frozenset(
    {
        ErrorCode.INVALID_REQUEST,
        ErrorCode.UNKNOWN_MODEL,
        ErrorCode.INVALID_MODEL_FILE,
    }
)


class ProtocolError(Exception):
    """A frame could not be encoded or decoded for this socket direction."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
