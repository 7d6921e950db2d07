"""Capping a tool's output at `ToolLimits.max_output_bytes`, keeping head and tail.

Owns `HeadTail`, an accumulator fed piece by piece (lines of a file, grep hits,
directory entries) that holds at most the cap in memory however much flows
through it, and renders the head, a marker saying how much was left out, and
the tail. The rendered text, marker included, never exceeds the cap by more
than a few bytes of a cut UTF-8 character (which is dropped, not split).
"""

from __future__ import annotations

from collections import deque

_MARKER = "\n[… {omitted} bytes omitted …]\n"
_MARKER_ROOM = len(_MARKER.format(omitted=10**12))


class HeadTail:
    """Keeps the first and the last bytes of everything written to it."""

    def __init__(self, cap: int) -> None:
        room = max(cap - _MARKER_ROOM, 2)
        self._head_cap = room // 2
        self._tail_cap = room - self._head_cap
        self._cap = cap
        # Enough tail to show everything when the total stays within the cap.
        self._keep = max(cap - self._head_cap, self._tail_cap)
        self._head = bytearray()
        self._tail: deque[bytes] = deque()
        self._tail_len = 0
        self.total = 0

    def write(self, text: str) -> None:
        data = text.encode("utf-8", "surrogateescape")
        self.total += len(data)
        take = min(len(data), self._head_cap - len(self._head))
        if take > 0:
            self._head += data[:take]
            data = data[take:]
        if data:
            self._tail.append(data)
            self._tail_len += len(data)
            while self._tail and self._tail_len - len(self._tail[0]) >= self._keep:
                self._tail_len -= len(self._tail.popleft())

    @property
    def truncated(self) -> bool:
        return self.total > self._cap

    def render(self) -> str:
        tail = b"".join(self._tail)
        if not self.truncated:
            return (bytes(self._head) + tail).decode("utf-8", "replace")
        tail = tail[len(tail) - self._tail_cap :]
        omitted = self.total - len(self._head) - len(tail)
        # "ignore" drops only the UTF-8 sequence the cut went through.
        head_text = bytes(self._head).decode("utf-8", "ignore")
        tail_text = tail.decode("utf-8", "ignore")
        return head_text + _MARKER.format(omitted=omitted) + tail_text
