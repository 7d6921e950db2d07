"""The supervisor's exception tree: every failure that may reach a client.

    SupervisorError(code, message, retryable)   the root; `code` is what a client sees
    ├── RegistryError              a models registry/config file is invalid
    ├── UnknownModelError          no such model name, and not a GGUF path
    ├── InvalidModelFileError      the file is missing or not a GGUF
    ├── ModelSourceError           a package/chunk could not be located or assembled, or a worker did not load
    ├── ModelConflictError         another model of the same name is loaded or loading
    ├── ModelBusyError             the model is in use and its new settings need a new worker
    ├── InsufficientMemoryError    the model does not fit the memory budget, even after unloading idle ones
    ├── WorkerUnavailableError     a loaded model has no worker to serve a generation, and will not soon
    │   ├── ModelFailedError       it crashed too often; `bastion load` clears the mark
    │   ├── ModelUnloadedError     it was unloaded meanwhile
    │   └── RestartTimeoutError    its restart takes too long
    ├── QueueFullError             the model's worker has its queue full (busy, retry)
    ├── SandboxUnavailableError    the tool sandbox process could not be started
    ├── TemplateError              a chat template failed to render (or tried to escape)
    ├── ContextOverflowError       the pinned messages and the latest turn alone exceed the context
    ├── SessionBusyError           the session is answering another request
    ├── InvalidRequestError        a request that cannot be served as asked (a bad output schema, no messages)
    ├── UnknownToolError           a tool name that is not registered
    ├── ToolRegistrationError      a tool registered twice, or under a name a model could not write
    ├── ToolSchemaError            a tool schema uses what the validator cannot enforce
    ├── TrustFlagError             a tool the run's trust flags leave off, or no workspace for it
    ├── PolicyError                a policy or cases file is unreadable, invalid, or includes itself
    ├── AuditError                 the audit log cannot be written (the tool must not run) or opened
    └── StoreError                 the database could not be read or written (disk full, locked, corrupt, too new)
        ├── InvalidSessionNameError
        ├── UnknownSessionError    no session by that name
        ├── SessionExistsError
        ├── UnknownMessageError
        └── ApprovalError          unknown approval id, already resolved, bad ttl or uses

Each class carries the `ErrorCode` a client sees (and whether retrying may
help), so the control layer turns any of them into a `RequestFailed` without
guessing. Foreign exceptions are translated where they happen, with
`raise ... from ...`; a module's private exceptions (never seen by a client)
stay in that module. `tests/test_errors.py` keeps this drawing and the
classes below in step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from bastion.protocol import ErrorCode


class SupervisorError(Exception):
    code: ErrorCode = ErrorCode.INTERNAL
    retryable: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RegistryError(SupervisorError):
    code = ErrorCode.INVALID_REQUEST


class UnknownModelError(SupervisorError):
    code = ErrorCode.UNKNOWN_MODEL


class InvalidModelFileError(SupervisorError):
    code = ErrorCode.INVALID_MODEL_FILE


class ModelSourceError(SupervisorError):
    code = ErrorCode.MODEL_LOAD_FAILED


class ModelConflictError(SupervisorError):
    code = ErrorCode.INVALID_REQUEST


class ModelBusyError(SupervisorError):
    code = ErrorCode.BUSY
    retryable = True


class InsufficientMemoryError(SupervisorError):
    code = ErrorCode.INSUFFICIENT_MEMORY


class WorkerUnavailableError(SupervisorError):
    retryable = True


class ModelFailedError(WorkerUnavailableError):
    code = ErrorCode.MODEL_FAILED
    retryable = False


class ModelUnloadedError(WorkerUnavailableError):
    code = ErrorCode.MODEL_UNLOADED


class RestartTimeoutError(WorkerUnavailableError):
    code = ErrorCode.WORKER_DIED


class QueueFullError(SupervisorError):
    code = ErrorCode.BUSY
    retryable = True


class SandboxUnavailableError(SupervisorError):
    code = ErrorCode.INTERNAL


class TemplateError(SupervisorError):
    code = ErrorCode.INVALID_REQUEST


class ContextOverflowError(SupervisorError):
    code = ErrorCode.CONTEXT_OVERFLOW


class SessionBusyError(SupervisorError):
    code = ErrorCode.BUSY
    retryable = True


class InvalidRequestError(SupervisorError):
    code = ErrorCode.INVALID_REQUEST


class UnknownToolError(SupervisorError):
    """The message lists the tools that are registered."""

    code = ErrorCode.INVALID_REQUEST


class ToolRegistrationError(SupervisorError):
    pass


class ToolSchemaError(SupervisorError):
    pass


class TrustFlagError(SupervisorError):
    code = ErrorCode.INVALID_REQUEST


class PolicyError(SupervisorError):
    """Its message starts with `file:line` whenever the line is known, because
    the person reading it is about to open that file."""

    code = ErrorCode.INVALID_REQUEST


class AuditError(SupervisorError):
    pass


class StoreError(SupervisorError):
    code = ErrorCode.INTERNAL


class InvalidSessionNameError(StoreError):
    code = ErrorCode.INVALID_REQUEST


class UnknownSessionError(StoreError):
    code = ErrorCode.INVALID_REQUEST


class SessionExistsError(StoreError):
    code = ErrorCode.INVALID_REQUEST


class UnknownMessageError(StoreError):
    code = ErrorCode.INVALID_REQUEST


class ApprovalError(StoreError):
    code = ErrorCode.INVALID_REQUEST


@contextlib.contextmanager
def reading_model_file(path: Path) -> Iterator[None]:
    """Turn the ways opening a model file fails into InvalidModelFileError
    with a message a user can act on."""
    try:
        yield
    except IsADirectoryError as exc:
        raise InvalidModelFileError(f"{path} is a directory, not a GGUF file") from exc
    except FileNotFoundError as exc:
        raise InvalidModelFileError(f"model file not found: {path}") from exc
    except OSError as exc:
        raise InvalidModelFileError(f"cannot read model file {path}: {exc.strerror}") from exc
