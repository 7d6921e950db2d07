"""Answers to the session requests.

    list_sessions                      → sessions {sessions, each with its state}
    show_session   {name, with_prompt} → session {session, messages, prompt}
    delete_session {name}              → session_changed {deleted}
    fork_session   {name, new_name}    → session_changed {forked}
    clear_session  {name}              → session_changed {cleared}
    pin_message    {name, text}        → session_changed {pinned}   (no text: pin your latest message)

A session's state is `waiting_for_approval` while one of its tool calls waits
for a person, `running` while a run serves it, else `idle`; a session that is
not idle cannot be deleted or cleared (`busy`, retryable). An unknown name is
`invalid_request` naming it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec

from bastion.protocol.sessions import (
    ClearSession,
    DeleteSession,
    ForkSession,
    ListSessions,
    PinMessage,
    SessionAction,
    SessionChanged,
    SessionDetail,
    SessionList,
    SessionState,
    SessionSummary,
    ShowSession,
)
from bastion.supervisor.errors import SessionBusyError, UnknownSessionError
from bastion.supervisor.store.sessions import SessionStore
from bastion.supervisor.trust.gate import ApprovalWaits

SessionRequest = ListSessions | ShowSession | DeleteSession | ForkSession | ClearSession | PinMessage


class SessionRequests:
    def __init__(
        self,
        *,
        store: SessionStore,
        waits: ApprovalWaits,
        busy_sessions: Callable[[], set[str]],
        next_prompt: Callable[[str], Awaitable[str]],
    ) -> None:
        self._store = store
        self._waits = waits
        self._busy_sessions = busy_sessions
        self._next_prompt = next_prompt

    async def answer(self, request: SessionRequest) -> SessionList | SessionDetail | SessionChanged:
        store = self._store
        match request:
            case ListSessions(request_id=request_id):
                return SessionList(request_id=request_id, sessions=[self._with_state(s) for s in store.list_sessions()])
            case ShowSession(request_id=request_id, name=name, with_prompt=with_prompt):
                summary = store.get_session(name)
                if summary is None:
                    raise UnknownSessionError(f"no session named {name!r}")
                prompt = await self._next_prompt(name) if with_prompt else ""
                messages = [m.to_protocol() for m in store.messages(name)]
                return SessionDetail(request_id=request_id, session=self._with_state(summary), messages=messages,
                                     prompt=prompt)
            case DeleteSession(request_id=request_id, name=name):
                self._refuse_if_busy(name, "deleted")
                if not store.delete_session(name):
                    raise UnknownSessionError(f"no session named {name!r}")
                return SessionChanged(request_id=request_id, name=name, action=SessionAction.DELETED)
            case ForkSession(request_id=request_id, name=name, new_name=new_name):
                store.fork_session(name, new_name)
                return SessionChanged(request_id=request_id, name=new_name, action=SessionAction.FORKED)
            case ClearSession(request_id=request_id, name=name):
                self._refuse_if_busy(name, "cleared")
                store.clear_session(name)
                return SessionChanged(request_id=request_id, name=name, action=SessionAction.CLEARED)
            case PinMessage(request_id=request_id, name=name, text=text):
                if text:
                    store.add_note(name, text)
                else:
                    seq = store.last_user_seq(name)
                    if seq is None:
                        raise UnknownSessionError(f"session {name!r} has no message of yours to pin")
                    store.pin_message(name, seq)
                return SessionChanged(request_id=request_id, name=name, action=SessionAction.PINNED)

    def _refuse_if_busy(self, name: str, change: str) -> None:
        """A session a run is serving (or waiting on an approval for) is not changed under it."""
        if name in self._busy_sessions() or name in self._waits.sessions_waiting:
            raise SessionBusyError(f"session {name!r} is answering a request and cannot be {change} now; "
                                   "cancel the run or try again when it ends")

    def _with_state(self, summary: SessionSummary) -> SessionSummary:
        if summary.name in self._waits.sessions_waiting:
            state = SessionState.WAITING_FOR_APPROVAL
        elif summary.name in self._busy_sessions():
            state = SessionState.RUNNING
        else:
            state = SessionState.IDLE
        return msgspec.structs.replace(summary, state=state)
