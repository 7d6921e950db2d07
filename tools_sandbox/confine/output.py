"""A confined call's output: the capped copy kept for the envelope and the
chunks streamed while it runs.

Owns `CappedOutput` (keeps the first and last bytes of everything fed to it,
never more than the cap in memory) and `ChunkStream` (decodes each pipe
incrementally so a UTF-8 character split across reads is not mangled, and
stops streaming once the cap is reached so a flood cannot swamp the socket;
the envelope still carries the tail).
"""

from __future__ import annotations

import codecs
from collections.abc import Callable

from bastion.protocol.sandbox_wire import ToolStream

_MARKER = "\n[bastion: {cut} bytes of output cut here; kept the first {head} and the last {tail}]\n"


class CappedOutput:
    def __init__(self, cap: int) -> None:
        self._head_cap = max(cap // 2, 1)
        self._tail_cap = max(cap - self._head_cap, 1)
        self._head = bytearray()
        self._tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self._head_cap - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if data:
            self._tail += data
            if len(self._tail) > 2 * self._tail_cap:  # trim in batches, not on every read
                del self._tail[: len(self._tail) - self._tail_cap]

    @property
    def truncated(self) -> bool:
        return self.total > len(self._head) + min(len(self._tail), self._tail_cap)

    def raw(self) -> bytes:
        """Everything, when nothing was cut (for ENVELOPE mode)."""
        return bytes(self._head + self._tail)

    def render(self) -> str:
        tail = bytes(self._tail[-self._tail_cap :])
        if not self.truncated:
            return (bytes(self._head) + tail).decode("utf-8", "replace")
        cut = self.total - len(self._head) - len(tail)
        marker = _MARKER.format(cut=cut, head=len(self._head), tail=len(tail))
        # "ignore" drops only the UTF-8 sequence the cut went through.
        return bytes(self._head).decode("utf-8", "ignore") + marker + tail.decode("utf-8", "ignore")


ChunkSink = Callable[[ToolStream, str], None]


class ChunkStream:
    def __init__(self, sink: ChunkSink | None, cap: int) -> None:
        self._sink = sink
        self._budget = cap
        self._decoders = {stream: codecs.getincrementaldecoder("utf-8")("replace") for stream in ToolStream}

    def feed(self, stream: ToolStream, data: bytes) -> None:
        if self._sink is None or self._budget <= 0:
            return
        data = data[: self._budget]
        self._budget -= len(data)
        text = self._decoders[stream].decode(data, final=self._budget <= 0)
        if text:
            self._sink(stream, text)

    def close(self) -> None:
        if self._sink is None or self._budget <= 0:
            return
        for stream, decoder in self._decoders.items():
            text = decoder.decode(b"", final=True)
            if text:
                self._sink(stream, text)
