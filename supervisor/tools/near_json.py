"""Reading JSON the way small models write it: strictly first, then repaired.

`decode_values` reads one or more JSON values from a text; when strict parsing
fails it tries a repaired copy (trailing commas, single quotes, raw newlines
and tabs in strings, Python's True/False/None, unquoted keys, missing closing
brackets, a string cut off at the end) and accepts the repair only if that
then parses. Nothing is ever evaluated. `extract_value` finds one value inside
prose, `past_json` skips over one so markers inside strings are not mistaken
for the end of a block. Work per text is bounded.
"""

from __future__ import annotations

import json
import re
from typing import Any

_MAX_REPAIR_CHARS = 16_000
_DECODER = json.JSONDecoder()
_SEPARATORS = " \t\r\n,;"


def decode_values(text: str) -> tuple[list[Any], bool] | str:
    """One or more JSON values separated by whitespace, commas or semicolons, plus whether
    any needed repair; or, when the text is not that, why (the strict parser's complaint)."""
    values: list[Any] = []
    repaired, pos = False, 0
    while True:
        while pos < len(text) and text[pos] in _SEPARATORS:
            pos += 1
        if pos == len(text):
            return (values, repaired) if values else "it is empty"
        if values and text[pos] not in "{[":
            return values, repaired  # trailing chatter after the call
        extent = extract_value(text, pos)
        if extent is None:
            return _json_complaint(text[pos:])
        value, pos, fixed = extent
        values.append(value)
        repaired = repaired or fixed


def extract_value(text: str, start: int, limit: int | None = None) -> tuple[Any, int, bool] | None:
    """The JSON value starting at `start`, where it ends, and whether it needed repair. Valid
    JSON may run past `limit` (the next marker, which was then inside a string); a repair may not."""
    try:
        value, end = _DECODER.raw_decode(text, start)
        return value, end, False
    except (ValueError, RecursionError):
        pass
    text = text if limit is None else text[:limit]
    close = _matching_close(text, start)
    # Unclosed: the model stopped early, or prose follows a value missing its last brace.
    ends = [close] if close is not None else [len(text), *_closers_before(text, start)]
    for candidate in ends:
        value = _parse_repaired(text[start:candidate])
        if value is not _FAILED:
            return value, candidate, True
    return None


def past_json(text: str, pos: int) -> int:
    """Where the valid JSON values from `pos` end (`pos` if there are none), so that a marker
    quoted inside an argument (`"query": "</tool_call>"`) is not taken for the real one."""
    end = pos
    while True:
        start = end
        while start < len(text) and text[start] in _SEPARATORS:
            start += 1
        if start == len(text) or text[start] not in "{[":
            return end
        try:
            _, end = _DECODER.raw_decode(text, start)
        except (ValueError, RecursionError):
            return end


def _closers_before(text: str, start: int, limit: int = 3) -> list[int]:
    """Ends of the last few `}`/`]` after `start`: where a value missing its final brace may stop."""
    found: list[int] = []
    pos = len(text)
    while len(found) < limit:
        pos = max(text.rfind("}", start + 1, pos), text.rfind("]", start + 1, pos))
        if pos < 0:
            break
        found.append(pos + 1)
    return found


_FAILED = object()


def _parse_repaired(text: str) -> Any:
    if not text.strip() or len(text) > _MAX_REPAIR_CHARS:
        return _FAILED
    try:
        return json.loads(_repair(text))
    except (ValueError, RecursionError):
        return _FAILED


def _json_complaint(text: str) -> str:
    try:
        json.loads(text)
    except ValueError as exc:
        return str(exc)
    except RecursionError:
        return "nested too deeply"
    return "unexpected text"


def _matching_close(text: str, start: int) -> int | None:
    """Index just past the bracket closing the one at `start`, skipping quoted strings of
    either quote style; None if it never closes within the length a repair may have."""
    if start >= len(text) or text[start] not in "{[":
        return None
    depth, pos, quote = 0, start, ""
    stop = min(len(text), start + _MAX_REPAIR_CHARS + 1)
    while pos < stop:
        char = text[pos]
        if quote:
            if char == "\\":
                pos += 1
            elif char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return pos + 1
        pos += 1
    return None


_LITERALS = {"True": "true", "False": "false", "None": "null", "true": "true", "false": "false",
             "null": "null", "none": "null"}  # fmt: skip
_WORD = re.compile(r"[A-Za-z_$][\w$-]*")


def _repair(text: str) -> str:
    """Rewrite near-JSON as JSON: single-quoted strings, raw control characters in strings,
    Python literals, unquoted keys, trailing commas, missing closing brackets. Never evaluates."""
    out: list[str] = []
    closers: list[str] = []
    pos = 0
    while pos < len(text):
        char = text[pos]
        if char in "\"'":
            pos = _copy_string(text, pos, out)
        elif char in "{[":
            closers.append("}" if char == "{" else "]")
            out.append(char)
            pos += 1
        elif char in "}]":
            _drop_trailing_comma(out)
            if closers and closers[-1] == char:
                closers.pop()
            out.append(char)
            pos += 1
        elif (word := _WORD.match(text, pos)) is not None:
            token = word.group()
            if token in _LITERALS:
                out.append(_LITERALS[token])
            elif text[word.end() :].lstrip().startswith(":"):
                out.append(json.dumps(token))  # an unquoted key
            else:
                out.append(token)  # left as is: the parse will fail, as it should
            pos = word.end()
        else:
            out.append(char)
            pos += 1
    while closers:
        _drop_trailing_comma(out)
        out.append(closers.pop())
    return "".join(out)


def _copy_string(text: str, start: int, out: list[str]) -> int:
    """Copy the string opening at `start` as a double-quoted JSON string; return where it ends."""
    quote = text[start]
    out.append('"')
    pos = start + 1
    while pos < len(text):
        char = text[pos]
        if char == "\\" and pos + 1 < len(text):
            escaped = text[pos + 1]
            out.append("'" if escaped == "'" else char + escaped)
            pos += 2
            continue
        if char == quote and _closes_string(text, pos + 1):
            out.append('"')
            return pos + 1
        if char == '"':
            out.append('\\"')
        elif ord(char) < 0x20:
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(char, f"\\u{ord(char):04x}"))
        else:
            out.append(char)
        pos += 1
    out.append('"')  # unterminated: the reply was cut off
    return pos


def _closes_string(text: str, after: int) -> bool:
    # A quote followed by more words is an apostrophe or inner quote, not the string's end.
    rest = text[after:].lstrip(" \t\r\n")
    return not rest or rest[0] in ",:}]"


def _drop_trailing_comma(out: list[str]) -> None:
    index = len(out) - 1
    while index >= 0 and out[index].isspace():
        index -= 1
    if index >= 0 and out[index] == ",":
        del out[index]
