"""Walking a reply from left to right, taking out every call in it.

Owns `ReplyScan`: it finds the next marker of any family (native_tags.py,
native_named.py, or a ``` fence), hands the marked region to its reader, and
reads the prose between regions for bare JSON calls; what is left is prose.
Findings come out in reply order. A marker or a JSON call quoted in inline code
amid prose is prose (a reply that is only `{...}` is still a call); a
JSON value in the prose that runs over a marker had it inside a string, so
it was never a marker. Fences are judged here (see calls.py for the rule):
a fence holding nothing but calls is calls, any other fence is a code
sample, kept as prose and not searched. A reply that is only a list of
Python-style calls is Llama 3.2/4's pythonic form.

Work is bounded: bare-JSON attempts and regions are counted per reply (fence
bodies share the count), and every search moves forward.
"""

from __future__ import annotations

import re
from typing import Any

from bastion.protocol.agent_events import CallFormat
from bastion.supervisor.tools import native_named, native_tags
from bastion.supervisor.tools.call_regions import ReadContext, Reader, Region
from bastion.supervisor.tools.call_shapes import (
    Finding,
    Found,
    Shape,
    Trouble,
    json_calls,
    pythonic_calls,
    shape_of,
)
from bastion.supervisor.tools.near_json import decode_values, extract_value, past_json
from bastion.supervisor.tools.text_scan import CodeSpans
from bastion.supervisor.tools.tool_index import ToolIndex

_FENCE_LABEL = re.compile(r"[ \t]*([A-Za-z_][\w.+-]*)?[ \t]*\r?\n?")
_EXPLICIT_FENCES = frozenset({"tool_call", "tool_calls", "tool"})
_JSON_FENCES = frozenset({"", "json", "jsonc", "json5"})
_PYTHONIC_FENCES = frozenset({"", "python", "py"})
# Where a bare JSON value might start: an object opening on a key, or an array of objects.
_JSON_START = re.compile(r"""\{\s*["'\w]|\[\s*\{""")
# Tags that some models wrap a JSON call in (llama.cpp's Hermes parser accepts them): dropped once empty.
_EMPTY_WRAPPERS = re.compile(r"<(tool|tools|response|json|xml)>\s*</\1>", re.IGNORECASE)

_READERS: list[Reader | None] = [
    None,
    *(reader for _, reader in (*native_tags.MARKERS, *native_named.MARKERS)),
]
_PATTERNS = ["```", *(pattern for pattern, _ in (*native_tags.MARKERS, *native_named.MARKERS))]
_MARKER = re.compile("|".join(f"(?P<m{index}>{pattern})" for index, pattern in enumerate(_PATTERNS)))


class Budget:
    """Bounds on the work one reply may cost, shared by the scans of its fence bodies."""

    def __init__(self, bare_attempts: int = 64, regions: int = 2000) -> None:
        self.bare_attempts = bare_attempts
        self.regions = regions


class ReplyScan:
    def __init__(self, text: str, tools: ToolIndex, budget: Budget, *, nested: bool = False) -> None:
        self.text = text
        self.tools = tools
        self.budget = budget
        self.nested = nested  # scanning a fence body: no fences within
        self.ctx = ReadContext(text, tools)
        self.code_spans = CodeSpans(text)
        self.findings: list[Finding] = []
        self.prose: list[str] = []
        self.dropped_tokens = False  # special tokens were taken out of the prose

    def run(self) -> None:
        if not self.nested and (listed := self._pythonic_list()) is not None:
            self.findings = listed
            return
        pos = search_from = 0
        while True:
            marker = _MARKER.search(self.text, search_from) if self.budget.regions > 0 else None
            region = self._read(marker) if marker is not None else None
            if marker is not None and region is None:  # not a call after all: its text stays prose
                search_from = max(marker.end(), marker.start() + 1)
                continue
            limit = marker.start() if marker is not None else len(self.text)
            resume = self._bare(pos, limit)
            if marker is None or region is None:
                return
            if resume > limit:  # a JSON value in the prose ran over the marker: it was inside a string
                pos = search_from = resume
                continue
            self._take(region)
            pos = search_from = region.end

    def _read(self, marker: re.Match[str]) -> Region | None:
        self.budget.regions -= 1
        reader = _READERS[int((marker.lastgroup or "m0")[1:])]
        if reader is None:
            return self._fence(marker)
        if self.code_spans.quotes(marker.start(), marker.end()):
            return None  # `<tool_call>` quoted in inline code: a mention, not a call
        region = reader(self.text, marker, self.ctx)
        return region if region is not None and region.end > marker.start() else None

    def _take(self, region: Region) -> None:
        self.findings += region.findings
        if region.prose:
            self.prose.append(region.prose)
        elif not region.findings:
            self.dropped_tokens = True

    def _fence(self, marker: re.Match[str]) -> Region | None:
        if self.nested:
            return None  # a fence inside a fence body is only text
        text = self.text
        label_match = _FENCE_LABEL.match(text, marker.end())
        assert label_match is not None  # every part of the pattern is optional
        label = (label_match.group(1) or "").lower()
        close = self.ctx.next("```", past_json(text, label_match.end()))
        body_end = close if close >= 0 else len(text)
        end = min(body_end + 3, len(text))
        raw, body = text[marker.start() : end], text[label_match.end() : body_end]
        if label in _EXPLICIT_FENCES:
            return Region(end, tuple(json_calls(body, CallFormat.FENCED, "a ```tool_call block", raw)))
        if label == "tool_code":
            return Region(end, tuple(self._tool_code(body, raw)))
        found = self._implicit(body, CallFormat.FENCED_JSON, raw) if label in _JSON_FENCES else None
        if found is None and label in _PYTHONIC_FENCES:
            found = self._pythonic_known(body, raw)
        if found is None:
            found = self._native_fence(body)
        return Region(end, tuple(found)) if found else Region(end, prose=raw)

    def _tool_code(self, body: str, raw: str) -> list[Finding]:
        """Gemma's ```tool_code fence: the body is calls written like Python, or Trouble."""
        shapes = pythonic_calls(body, self.tools.positional_names)
        if shapes is None:
            return [
                Trouble(
                    CallFormat.TOOL_CODE, "a Gemma ```tool_code block", "it is not a Python-style call", raw
                )
            ]
        return [Found(shape, CallFormat.TOOL_CODE, raw) for shape in shapes]

    def _pythonic_known(self, body: str, raw: str) -> list[Finding] | None:
        """A fence whose whole body is calls of *known* tools written like Python
        (`write_file("a.txt", "hi")`); positional arguments take the schema's required names in
        order. Anything else in such a fence is code, not a call."""
        shapes = pythonic_calls(body, self.tools.positional_names)
        if shapes is None or not all(self.tools.knows(shape.name) for shape in shapes):
            return None
        return [Found(shape, CallFormat.PYTHONIC, raw) for shape in shapes]

    def _native_fence(self, body: str) -> list[Finding] | None:
        """A fence of any label holding only native call markup of available tools (```xml around
        <function=...>, ```json around <function_call>): the calls. Markup naming a tool that does not
        exist, or with other text around it, shows the syntax: a code sample."""
        child = ReplyScan(body, self.tools, self.budget, nested=True)
        child.run()
        if not child.findings or _EMPTY_WRAPPERS.sub("", "".join(child.prose)).strip():
            return None
        named = [f.shape.name if isinstance(f, Found) else f.name for f in child.findings]
        return child.findings if all(self.tools.knows(name) for name in named) else None

    def _pythonic_list(self) -> list[Finding] | None:
        """Llama 3.2 and 4 answer with only `[get_weather(city="Paris"), other()]` when calling."""
        stripped = self.text.strip()
        if not (stripped.startswith("[") and stripped.endswith("]")) or stripped.startswith(("[{", "[[")):
            return None
        shapes = pythonic_calls(stripped, self.tools.positional_names)
        return [Found(shape, CallFormat.PYTHONIC_LIST, stripped) for shape in shapes] if shapes else None

    def _implicit(self, body: str, fmt: CallFormat, raw: str) -> list[Finding] | None:
        """Unmarked JSON: calls if every value in it is call-shaped, else None (it is just text)."""
        decoded = decode_values(body.strip())
        if isinstance(decoded, str):
            return None
        values, repaired = decoded
        findings: list[Finding] = []
        for value in values:
            found = self._interpret(value, fmt, raw, repaired, alone=len(values) == 1)
            if found is None:
                return None
            findings += found
        return findings

    def _bare(self, pos: int, limit: int) -> int:
        """Prose in text[pos:limit]: keep it, lifting out any call-shaped JSON in it. Returns where
        the scan resumes: `limit`, or the end of a valid JSON value that ran past it."""
        text, kept = self.text, pos
        while self.budget.bare_attempts > 0 and (found := _JSON_START.search(text, pos, limit)) is not None:
            self.budget.bare_attempts -= 1
            start = found.start()
            extent = extract_value(text, start, limit)
            if extent is None:
                pos = start + 1
                continue
            value, end, repaired = extent
            alone = not text[:start].strip(" \t\r\n`") and not text[end:].strip(" \t\r\n`")
            if not alone and self.code_spans.quotes(start, end):
                pos = end  # a call quoted in inline code amid prose is shown, not made
                continue
            calls = self._interpret(value, CallFormat.BARE_JSON, text[start:end], repaired, alone=alone)
            if calls is not None:
                self.prose.append(text[kept:start])
                self.findings += calls
                kept = end
            pos = end  # a JSON value that is not a call is text; do not look inside it
        resume = max(pos, limit)
        self.prose.append(text[kept:resume])
        return resume

    def _interpret(
        self, value: Any, fmt: CallFormat, raw: str, repaired: bool, *, alone: bool
    ) -> list[Finding] | None:
        """Unmarked JSON as calls, or None: every element must be call-shaped, and {"name": "x"}
        alone is a call only where the model clearly meant one (the whole reply, naming a tool)."""
        if isinstance(value, dict) and set(value) == {"tool_calls"}:
            value = value["tool_calls"]
        shapes = [shape_of(element) for element in (value if isinstance(value, list) else [value])]
        if not shapes or any(shape is None for shape in shapes):
            return None
        if any(s.bare_name and not (alone and self.tools.knows(s.name)) for s in shapes if s):
            return None
        return [Found(_with_repair(shape, repaired), fmt, raw) for shape in shapes if shape is not None]


def _with_repair(shape: Shape, repaired: bool) -> Shape:
    return Shape(shape.name, shape.arguments, shape.bare_name, True) if repaired else shape


def join_prose(pieces: list[str]) -> str:
    """The prose around removed calls, with the gaps they leave closed up."""
    text = ""
    for piece in pieces:
        if text and piece and not text.endswith("\n") and not piece.startswith("\n"):
            text = text.rstrip(" \t") + " " + piece.lstrip(" \t")
        else:
            text += piece
    text = _EMPTY_WRAPPERS.sub("", text)
    return re.sub(r"\n[ \t]*\n(?:[ \t]*\n)+", "\n\n", text).strip()
