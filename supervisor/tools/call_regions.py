"""The contract between the reply scanner and the readers of marked regions.

A reader is handed the reply and the match of its marker (`<tool_call>`,
`[TOOL_CALLS]`, `<|channel|>`...) and returns the `Region` it took: where it
ends, the findings in it, and any of it that stays prose. It returns None to
decline, when the marker turns out not to start a call (`>>>` in prose); the
scanner then keeps the marker's text as prose. A region with neither findings
nor prose is a special token that is dropped (`<|end|>`, `<｜tool▁calls▁end｜>`).
Readers never change the scanner; `ReadContext` gives them the tools and a
forward-only search that keeps the whole scan linear in the reply's length.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bastion.supervisor.tools.call_shapes import Finding
from bastion.supervisor.tools.text_scan import Occurrences
from bastion.supervisor.tools.tool_index import ToolIndex


@dataclass(frozen=True)
class Region:
    end: int
    findings: tuple[Finding, ...] = ()
    prose: str = ""  # text of the region that stays prose (a code sample)


class ReadContext:
    def __init__(self, text: str, tools: ToolIndex) -> None:
        self.text = text
        self.tools = tools
        self._occurrences = Occurrences(text)

    def next(self, needle: str, pos: int) -> int:
        """The next index of `needle` at or after `pos`, or -1."""
        return self._occurrences.next(needle, pos)

    def first(self, needles: Sequence[str], pos: int) -> tuple[int, str]:
        """The earliest of `needles` at or after `pos`, and which; (len(text), "") when none is there."""
        return self._occurrences.earliest(needles, pos)


Reader = Callable[[str, re.Match[str], ReadContext], Region | None]
