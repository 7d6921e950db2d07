"""Token bytes to streamable text: incremental UTF-8 and stop strings.

A token may end in the middle of a multi-byte character; the incremental
decoder keeps those bytes until the character is complete, so a stream never
shows U+FFFD for a split character. Text that could be the start of a stop
string is held back until it is known not to be one, so a stop string never
reaches the client, not even in part.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    def __init__(self, stop: Sequence[str] = ()) -> None:
        # 'replace' only fires for bytes that can never be valid UTF-8, not for
        # a character that is merely incomplete so far.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(s for s in stop if s)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""

    def push(self, data: bytes) -> tuple[str, bool]:
        """Add one token's bytes. Returns the text that is safe to show now and
        whether a stop string has matched (the text before it is returned, the
        stop string and anything after it are dropped)."""
        self._held += self._decoder.decode(data)
        if not self._stops:
            text, self._held = self._held, ""
            return text, False
        hits = [i for i in (self._held.find(s) for s in self._stops) if i >= 0]
        if hits:
            text, self._held = self._held[: min(hits)], ""
            return text, True
        keep = self._partial_stop_length()
        cut = len(self._held) - keep
        text, self._held = self._held[:cut], self._held[cut:]
        return text, False

    def _partial_stop_length(self) -> int:
        for k in range(min(len(self._held), self._longest - 1), 0, -1):
            tail = self._held[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0

    def flush(self) -> str:
        """Text held back for a stop string that never came. The bytes of an
        unfinished character are dropped rather than shown as U+FFFD."""
        text, self._held = self._held, ""
        return text
