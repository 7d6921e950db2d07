"""The supervisor's exception tree.

    SupervisorError(code, message)       every failure that may reach a client
    ├── RegistryError                    a models registry/config file is invalid
    ├── UnknownModelError                no such model name, and not a GGUF path
    ├── InvalidModelFileError            the file is missing or not a GGUF
    ├── ModelSourceError                 a package/chunk could not be located or assembled
    └── TemplateError                    a chat template failed to render (or tried to escape)

Each carries the `ErrorCode` a client sees, so the daemon turns any of them into
a `RequestFailed` without guessing. Foreign exceptions are translated where they
happen, with `raise ... from ...`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from bastion.protocol import ErrorCode


class SupervisorError(Exception):
    code: ErrorCode = ErrorCode.INTERNAL

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


class TemplateError(SupervisorError):
    code = ErrorCode.INVALID_REQUEST


class StoreError(SupervisorError):
    """The session database could not be read or written (disk full, locked, corrupt, too new)."""

    code = ErrorCode.INTERNAL


class ContextOverflowError(SupervisorError):
    code = ErrorCode.CONTEXT_OVERFLOW


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
