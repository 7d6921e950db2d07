"""The conversation a run reads and appends to: a stored session or a one-shot.

The agent loop works on a `Conversation` and never on SQLite directly. A
named session is a `StoredConversation` over the supervisor's `SessionStore`
(every append is committed before the loop moves on, so a crash loses at
most the turn in flight); a run without `--session` gets an
`EphemeralConversation` that lives as long as the run.

Both hand the context planner `ContextMessage`s (seq, message, pinned) and
keep the context window's start: messages before it are out of the prompt,
pinned ones excepted. Summaries of pruned turns are kept apart
(`summaries()`): the loop puts them in the system message, ahead of the
window they stand before.
"""

from __future__ import annotations

from typing import Protocol

from bastion.supervisor.harness.context import ContextMessage
from bastion.supervisor.store.sessions import MessageKind, SessionStore
from bastion.supervisor.templates.formatter import ChatMessage


class Conversation(Protocol):
    name: str
    # Whether a later run may continue it (then its KV state is worth a snapshot).
    continues: bool

    def context_messages(self) -> list[ContextMessage]: ...

    def summaries(self) -> list[str]: ...

    def append(self, message: ChatMessage, *, pinned: bool = False, interrupted: bool = False) -> int: ...

    def window_start(self) -> int: ...

    def set_window_start(self, seq: int) -> None: ...

    def record_summary(self, text: str, through_seq: int) -> None: ...


class StoredConversation:
    continues = True

    def __init__(self, store: SessionStore, name: str) -> None:
        self._store = store
        self.name = name

    def context_messages(self) -> list[ContextMessage]:
        return [
            ContextMessage(
                seq=stored.seq,
                message=ChatMessage(role=stored.role, content=stored.content, tool_name=stored.tool_name,
                                    reasoning=stored.reasoning),
                pinned=stored.pinned,
            )
            for stored in self._store.context_messages(self.name)
            if stored.kind is not MessageKind.SUMMARY
        ]

    def summaries(self) -> list[str]:
        return [m.content for m in self._store.context_messages(self.name) if m.kind is MessageKind.SUMMARY]

    def append(self, message: ChatMessage, *, pinned: bool = False, interrupted: bool = False) -> int:
        return self._store.append_message(
            self.name, message.role, message.content, tool_name=message.tool_name, pinned=pinned,
            interrupted=interrupted, reasoning=message.reasoning,
        )  # fmt: skip

    def window_start(self) -> int:
        return self._store.context_start(self.name)

    def set_window_start(self, seq: int) -> None:
        self._store.set_context_start(self.name, seq)

    def record_summary(self, text: str, through_seq: int) -> None:
        self._store.record_summary(self.name, text, through_seq)


class EphemeralConversation:
    """A one-shot run's conversation: the same behaviour, kept in memory."""

    continues = False

    def __init__(self, name: str) -> None:
        self.name = name
        self._messages: list[ContextMessage] = []
        self._summaries: list[str] = []
        self._window_start = 0

    def context_messages(self) -> list[ContextMessage]:
        return [m for m in self._messages if m.seq >= self._window_start or m.pinned]

    def summaries(self) -> list[str]:
        return list(self._summaries)

    def append(self, message: ChatMessage, *, pinned: bool = False, interrupted: bool = False) -> int:
        seq = (self._messages[-1].seq if self._messages else 0) + 1
        self._messages.append(ContextMessage(seq=seq, message=message, pinned=pinned))
        return seq

    def window_start(self) -> int:
        return self._window_start

    def set_window_start(self, seq: int) -> None:
        self._window_start = seq

    def record_summary(self, text: str, through_seq: int) -> None:
        self._summaries.append(text)
        self._window_start = max(self._window_start, through_seq + 1)

