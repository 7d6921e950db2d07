"""Streaming a reply's prose to an API client without ever streaming a tool call.

A client that offered tools expects the calls as structured `tool_calls`, not
as text in the answer. Calls can only be parsed once the reply is whole, so
`CallHold` streams the text that cannot be part of a call and holds back the
rest: from the first place a call could begin (any family's opening marker
starts with one of `<`, `[`, `{`, a ``` fence, `>>>` or `functools[`; a reply
whose first line is a bare name may be Functionary's `NAME\\n{json}`), nothing
more is released. After parsing, the caller sends whatever prose is left beyond
what was streamed (`remainder`). Holding early costs a late answer at worst;
streaming a call as text would be wrong.
"""

from __future__ import annotations

import enum
import re

from bastion.supervisor.tools.text_scan import partial_suffix

# Where a call in any format can begin (calls.py lists the formats).
_OPENERS = ("<", "[", "{", "```", ">>>", "functools[")
_BARE_NAME_LINE = re.compile(r"\s*[A-Za-z_][\w.\-]*[ \t]*(?:\r?\n|\Z)")


class _Start(enum.Enum):
    UNDECIDED = "undecided"  # too little text yet to tell
    CALL = "call"  # the reply may open with a call written without an opener
    PROSE = "prose"


def _start_of(text: str, tool_names: frozenset[str]) -> _Start:
    """Whether a reply starting so may be a call written without an opener: Functionary's first
    line is a bare name followed by JSON, or a tool's name followed by its code (`python\\n...`);
    a harmony reply may begin at its header (` to=functions.NAME`)."""
    stripped = text.lstrip()
    if stripped.startswith("to="):
        return _Start.CALL
    if "to=".startswith(stripped):
        return _Start.UNDECIDED
    name_line = _BARE_NAME_LINE.match(text)
    if name_line is None:
        return _Start.PROSE
    rest = text[name_line.end() :].lstrip()
    if not name_line.group().endswith("\n") or not rest:
        return _Start.UNDECIDED
    named_tool = name_line.group().strip() in tool_names
    return _Start.CALL if rest.startswith("{") or named_tool else _Start.PROSE


class CallHold:
    """Feed the reply's content as it streams; each call returns the text safe to show now."""

    def __init__(self, tool_names: frozenset[str] = frozenset()) -> None:
        self._tool_names = tool_names  # the offered tools: a first line naming one opens a call
        self._text = ""
        self._released = 0
        self._holding = False  # a possible call began: nothing more is released

    @property
    def streamed(self) -> str:
        """What has been released so far."""
        return self._text[: self._released]

    def feed(self, delta: str) -> str:
        self._text += delta
        if self._holding:
            return ""
        text, start = self._text, self._released
        if start == 0 and (beginning := _start_of(text, self._tool_names)) is not _Start.PROSE:
            self._holding = beginning is _Start.CALL
            return ""
        opener = min((found for token in _OPENERS if (found := text.find(token, start)) >= 0), default=-1)
        if opener >= 0:
            self._holding = True
            end = opener
        else:
            end = len(text) - partial_suffix(text, start, _OPENERS)
        released, self._released = text[start:end], end
        return released

    def remainder(self, prose: str) -> str:
        """What to send after the stream, once parsing says the answer's prose is `prose`."""
        return remainder_after(self.streamed, prose)


def remainder_after(streamed: str, prose: str) -> str:
    """The prose not streamed yet: nothing when parsing rewrote what was already shown."""
    return prose[len(streamed) :] if prose.startswith(streamed) else ""
