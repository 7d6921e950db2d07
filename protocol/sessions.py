"""Session requests and their answers (client ↔ supervisor).

A session is a named, persistent conversation owned by the supervisor
(SQLite). `bastion run --session NAME` and `bastion chat` append to one;
these messages list, show, pin, clear, fork and remove them.
"""

from __future__ import annotations

import enum

import msgspec

from bastion.protocol.common import Message


class ChatRole(enum.Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class SessionAction(enum.Enum):
    DELETED = "deleted"
    FORKED = "forked"
    CLEARED = "cleared"
    PINNED = "pinned"


class SessionState(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    WAITING_FOR_APPROVAL = "waiting_for_approval"  # a tool call asked; any client may answer


class RunStatus(enum.Enum):
    RUNNING = "running"
    FINISHED = "finished"
    INTERRUPTED = "interrupted"  # still open when its supervisor died mid-turn


class SessionSummary(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    model: str
    created_at: float  # unix seconds
    updated_at: float
    messages: int
    runs: int
    state: SessionState = SessionState.IDLE
    last_run: RunStatus | None = None  # None before the first run


class SessionMessage(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    role: ChatRole
    content: str
    tool_name: str = ""
    pinned: bool = False
    interrupted: bool = False  # a partial reply kept after a cancel or a crash
    created_at: float = 0.0
    reasoning: str = ""  # an assistant turn's reasoning, kept apart from its content


class ListSessions(Message, frozen=True, tag="list_sessions"):
    request_id: str


class ShowSession(Message, frozen=True, tag="show_session"):
    request_id: str
    name: str
    # Also render the exact prompt the model would receive next.
    with_prompt: bool = False


class DeleteSession(Message, frozen=True, tag="delete_session"):
    request_id: str
    name: str


class ForkSession(Message, frozen=True, tag="fork_session"):
    request_id: str
    name: str
    new_name: str


class ClearSession(Message, frozen=True, tag="clear_session"):
    """Forget the conversation but keep the session (and its pins)."""

    request_id: str
    name: str


class PinMessage(Message, frozen=True, tag="pin_message"):
    """Pin `text` as a note that survives pruning, or, with no text, the last user message."""

    request_id: str
    name: str
    text: str | None = None


class SessionList(Message, frozen=True, tag="sessions"):
    request_id: str
    sessions: list[SessionSummary]


class SessionDetail(Message, frozen=True, tag="session"):
    request_id: str
    session: SessionSummary
    messages: list[SessionMessage]
    prompt: str = ""  # with_prompt: the exact next prompt


class SessionChanged(Message, frozen=True, tag="session_changed"):
    """The answer to delete, fork, clear and pin."""

    request_id: str
    name: str
    action: SessionAction
