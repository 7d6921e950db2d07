"""What every command does around its request: connect, ask, report failure.

Exit codes live here so every command maps errors the same way:

    0   done
    1   model or runtime error (a worker died, the supervisor is unreachable,
        an agent run stopped at its iteration or repair limit)
    2   usage error (unknown model or session, not a GGUF, bad flag, bad config)
    130 cancelled with Ctrl-C
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import NoReturn, TypeVar

import typer

from bastion.client import render
from bastion.client.connection import ClientError, ControlConnection
from bastion.client.launcher import connect_running, ensure_supervisor
from bastion.protocol import ErrorCode, HomeLayout, RequestFailed
from bastion.protocol.control import ControlEvent, ControlRequest
from bastion.protocol.errors import USAGE_ERROR_CODES

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130
_SCRIPTED = "scripted:"

Expected = TypeVar("Expected")


def new_id() -> str:
    return uuid.uuid4().hex[:12]


def model_argument(model: str | None) -> str | None:
    """Paths are made absolute here: the supervisor's working directory is not ours."""
    if model is not None and model.startswith(_SCRIPTED):
        return _SCRIPTED + str(Path(model[len(_SCRIPTED) :]).expanduser().absolute())
    if model is not None and ("/" in model or model.endswith(".gguf")):
        return str(Path(model).expanduser().absolute())
    return model


def exit_for(code: ErrorCode) -> int:
    return EXIT_USAGE if code in USAGE_ERROR_CODES else EXIT_FAILURE


def fail(error: ClientError | RequestFailed, as_json: bool) -> NoReturn:
    if as_json:
        render.json_object({"type": "error", "code": error.code.value, "message": error.message})
    else:
        render.error(error.message)
    raise typer.Exit(exit_for(error.code))


def connect(as_json: bool, *, start: bool) -> ControlConnection | None:
    """A connection to the supervisor; with `start`, one is started if needed.
    Without it, None when no supervisor runs."""
    layout = HomeLayout.from_env()
    try:
        if start:
            return ensure_supervisor(layout, render.say)
        return connect_running(layout)
    except ClientError as exc:
        fail(exc, as_json)


def expect(connection: ControlConnection, request: ControlRequest, expected: type[Expected],
           as_json: bool) -> Expected:
    """Send a one-answer request; exit with the right code unless the answer is `expected`."""
    try:
        event: ControlEvent = connection.request(request)
    except ClientError as exc:
        fail(exc, as_json)
    if isinstance(event, RequestFailed):
        fail(event, as_json)
    if not isinstance(event, expected):
        fail(ClientError(ErrorCode.INTERNAL, f"unexpected answer {type(event).__name__}"), as_json)
    return event
