"""Streaming one `Run` to the terminal, and what Ctrl-C means during it.

Ctrl-C does not just abandon the socket: it sends `Cancel` so the worker stops
generating between two tokens, waits (briefly) for the run's end, and exits
130. A second Ctrl-C exits at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bastion.client import render
from bastion.client.command_io import EXIT_CANCELLED, EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from bastion.client.connection import ClientError, ControlConnection
from bastion.protocol import Cancel, ErrorCode, RequestFailed, StopReason
from bastion.protocol.agent_events import ReasoningDelta
from bastion.protocol.control import ControlEvent, Run, RunFinished
from bastion.protocol.errors import USAGE_ERROR_CODES
from bastion.protocol.trust import ApprovalRequired, ResolveApproval

_CANCEL_WAIT_S = 10.0


def stream_run(connection: ControlConnection, request: Run, *, as_json: bool, verbose: bool = False,
               ask: Callable[[ApprovalRequired], bool] | None = None, hide_reasoning: bool = False) -> int:
    """Stream one run; with `ask`, approval requests are answered inline (chat)."""
    text = None if as_json else render.TextRenderer(verbose=verbose, hide_reasoning=hide_reasoning)
    show: Callable[[ControlEvent], None]
    if text is not None:
        show = text
    else:
        show = _without_reasoning(render.json_line) if hide_reasoning else render.json_line
    state = _RunState()
    connection.send(request)
    try:
        _consume(connection.events(request.request_id), show, state, connection, ask)
    except KeyboardInterrupt:
        connection.send(Cancel(request_id=request.request_id))
        state.cancelled_by_user = True
        try:
            _drain_after_cancel(connection, request.request_id, show, state)
        except KeyboardInterrupt:
            pass
    except ClientError as exc:
        _show_client_error(exc, show, as_json)
        state.error_code = exc.code
    if text is not None:
        text.finish()
    return state.exit_code()


class _RunState:
    def __init__(self) -> None:
        self.stop_reason: StopReason | None = None
        self.error_code: ErrorCode | None = None
        self.cancelled_by_user = False

    def exit_code(self) -> int:
        if self.cancelled_by_user or self.stop_reason is StopReason.CANCELLED:
            return EXIT_CANCELLED
        if self.error_code is not None or self.stop_reason is StopReason.ERROR or self.stop_reason is None:
            return EXIT_USAGE if self.error_code in USAGE_ERROR_CODES else EXIT_FAILURE
        if self.stop_reason in (StopReason.MAX_ITERATIONS, StopReason.REPAIR_LIMIT):
            return EXIT_FAILURE  # the agent gave up before answering
        return EXIT_OK


def _consume(events, show, state: _RunState, connection: ControlConnection,
             ask: Callable[[ApprovalRequired], bool] | None) -> None:
    for event in events:
        if ask is not None and isinstance(event, ApprovalRequired):
            approved = ask(event)
            connection.send(ResolveApproval(request_id=f"{event.request_id}-{event.approval_id}",
                                            approval_id=event.approval_id, approve=approved))
            continue
        show(event)
        if _record(event, state):
            return


def _record(event: ControlEvent, state: _RunState) -> bool:
    """Note what the event means for the exit code; True when the run is over."""
    match event:
        case RequestFailed(code=code):
            state.error_code = code
            # A failure without a request id (e.g. a protocol error) ends nothing else.
            return event.request_id == ""
        case RunFinished(stop_reason=reason):
            state.stop_reason = reason
            return True
    return False


def _drain_after_cancel(connection: ControlConnection, request_id: str, show, state: _RunState) -> None:
    deadline = time.monotonic() + _CANCEL_WAIT_S
    while time.monotonic() < deadline:
        event = connection.receive(0.5)
        if event is None or getattr(event, "request_id", None) != request_id:
            continue
        show(event)
        if _record(event, state):
            return


def _show_client_error(exc: ClientError, show, as_json: bool) -> None:
    if as_json:
        render.json_object({"type": "error", "code": exc.code.value, "message": exc.message})
        render.json_object({"type": "run_end", "stop_reason": StopReason.ERROR.value})
    else:
        render.error(exc.message)


def _without_reasoning(show: Callable[[ControlEvent], None]) -> Callable[[ControlEvent], None]:
    def shown(event: ControlEvent) -> None:
        if not isinstance(event, ReasoningDelta):
            show(event)

    return shown
