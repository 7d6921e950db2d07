"""Searching a reply in time that grows with its length, not with the square of it.

Owns `NextOccurrence` and `Occurrences`, which answer "where is the next
`</tool_call>` at or after here" for positions that mostly move forward,
searching the text once however many regions ask (a reply of ten thousand
unclosed tags would otherwise be searched to its end ten thousand times);
`partial_suffix`, what a streaming reader holds back because it may still
become a marker; and `CodeSpans`, which tells a marker quoted in inline code
(`<tool_call>`) from one in use.
"""

from __future__ import annotations

from collections.abc import Sequence


class NextOccurrence:
    """The next index of `needle` in `text` at or after a position; cheap while positions move forward."""

    def __init__(self, text: str, needle: str) -> None:
        self._text = text
        self._needle = needle
        self._searched_from = len(text) + 1  # nothing searched yet
        self._found = -1  # the first occurrence at or after _searched_from, or -1

    def at_or_after(self, pos: int) -> int:
        """Index of the next occurrence, or -1."""
        stale = pos < self._searched_from or (self._found != -1 and self._found < pos)
        if stale:
            self._searched_from, self._found = pos, self._text.find(self._needle, pos)
        return self._found


class Occurrences:
    """`NextOccurrence` for any number of needles in one text."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._needles: dict[str, NextOccurrence] = {}

    def next(self, needle: str, pos: int) -> int:
        """The next index of `needle` at or after `pos`, or -1."""
        if needle not in self._needles:
            self._needles[needle] = NextOccurrence(self._text, needle)
        return self._needles[needle].at_or_after(pos)

    def earliest(self, needles: Sequence[str], pos: int) -> tuple[int, str]:
        """The earliest of `needles` at or after `pos`, and which; (len(text), "") when none is there."""
        best, which = len(self._text), ""
        for needle in needles:
            found = self.next(needle, pos)
            if 0 <= found < best:
                best, which = found, needle
        return best, which


def partial_suffix(text: str, start: int, needles: Sequence[str]) -> int:
    """The length of the longest end of text[start:] that could still grow into one of `needles`:
    what a streaming reader must hold back until the next piece arrives."""
    longest = 0
    for needle in needles:
        for size in range(min(len(needle) - 1, len(text) - start), longest, -1):
            if text.endswith(needle[:size]):
                longest = size
                break
    return longest


class CodeSpans:
    """Tells a marker quoted in inline code (`<tool_call>`) from one in use: an odd number of
    backticks before it on its line, and one more after it on the same line. Asked about markers
    in reply order, it reads each stretch of the reply once."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._find = Occurrences(text)
        self._counted_to = 0
        self._backticks = 0  # single backticks on the current line before _counted_to

    def quotes(self, start: int, end: int) -> bool:
        if start < self._counted_to:  # asked out of order: count this line afresh
            self._counted_to, self._backticks = self._text.rfind("\n", 0, start) + 1, 0
        stretch = self._text[self._counted_to : start]
        line_break = stretch.rfind("\n")
        if line_break >= 0:
            stretch, self._backticks = stretch[line_break + 1 :], 0
        self._backticks += stretch.replace("```", "").count("`")
        self._counted_to = start
        if self._backticks % 2 == 0:
            return False
        closing, line_end = self._find.next("`", end), self._find.next("\n", end)
        return closing >= 0 and (line_end < 0 or closing < line_end)
