"""Calls written as XML-ish tags whose argument values are bare text.

Owns the readers of:
    <function=NAME><parameter=K>v</parameter>...</function>    Qwen3-Coder, Seed-OSS, Nemotron 3
    <function=NAME>{json}</function>, <function name="NAME">   Functionary v3.1, Hermes variants
    NAME<arg_key>K</arg_key><arg_value>v</arg_value>...        GLM 4.5+ (inside <tool_call>)
    <invoke name="NAME"><parameter name="K">v</parameter>       MiniMax M2
Each value is typed by the tool's schema (typed_values.py). A parameter left
open is accepted when another parameter or the end of its call follows it
(llama.cpp accepts that too), and is Trouble when the reply just stops inside
it: the value may be cut short, and a cut-short file must not be written.
Every search runs forward only, so the work stays linear in the body.
"""

from __future__ import annotations

import re
from typing import Any

from bastion.protocol.agent_events import CallFormat
from bastion.supervisor.tools.call_shapes import Finding, Found, Shape, Trouble, named_call
from bastion.supervisor.tools.near_json import past_json
from bastion.supervisor.tools.text_scan import NextOccurrence
from bastion.supervisor.tools.tool_index import ToolIndex
from bastion.supervisor.tools.typed_values import value_from_text

QWEN3_CODER = "a Qwen3-Coder <function=...><parameter=...> call"
FUNCTION_TAG = "a <function=NAME> call"
GLM = "a GLM <tool_call>NAME<arg_key>...</arg_key> call"
MINIMAX = "a MiniMax <invoke name=...> call"

FUNCTION_OPEN = re.compile(r"""<function(?:=[ \t]*([^>\s]+)[ \t]*|\s+name\s*=\s*["']([^"'>]+)["']\s*)>""")
_PARAMETER_OPEN = re.compile(r"""<parameter(?:=[ \t]*([^>\s]+)[ \t]*|\s+name\s*=\s*["']([^"'>]+)["']\s*)>""")
_INVOKE_OPEN = re.compile(r"""<invoke\s+name\s*=\s*["']([^"'>]+)["']\s*>""")
_GLM_NAME = re.compile(r"\s*([\w.:-]+)[ \t]*(?:\r?\n|(?=<arg_key>)|\Z)")


def function_blocks(
    body: str, raw: str, tools: ToolIndex, *, closed: bool, what: str = QWEN3_CODER
) -> list[Finding]:
    """Every <function=NAME>...</function> in `body`, the inside of a <tool_call> or <seed:tool_call>."""
    findings: list[Finding] = []
    closes = NextOccurrence(body, "</function>")
    pos = 0
    while (opener := FUNCTION_OPEN.search(body, pos)) is not None:
        name = (opener.group(1) or opener.group(2) or "").strip()
        start = opener.end()
        after_json = past_json(body, start)  # a tag quoted in an argument is not the end
        close = closes.at_or_after(after_json)
        following = FUNCTION_OPEN.search(body, after_json)
        end = min(close if close >= 0 else len(body), following.start() if following else len(body))
        ends_closed = end == close or following is not None or closed
        findings.append(
            read_function(name, body[start:end], raw, tools, closed=ends_closed, what=what, bare=False)
        )
        pos = end + (len("</function>") if end == close else 0)
    return findings


def read_function(
    name: str, inner: str, raw: str, tools: ToolIndex, *, closed: bool, what: str, bare: bool
) -> Finding:
    """The inside of one <function=NAME> block: <parameter> blocks (problems named as `what`), JSON,
    or nothing (no arguments; outside a <tool_call>, `bare`, that reads as Functionary's JSON form)."""
    stripped = inner.strip()
    if stripped.startswith("<parameter"):
        return _parameters(name, inner, CallFormat.QWEN3_CODER, what, raw, tools, closed=closed)
    if not stripped and not bare:
        return Found(Shape(name, {}), CallFormat.QWEN3_CODER, raw)
    return named_call(name, inner, CallFormat.FUNCTION_TAG, FUNCTION_TAG, raw)


def _parameters(
    name: str, inner: str, fmt: CallFormat, what: str, raw: str, tools: ToolIndex, *, closed: bool
) -> Finding:
    """The <parameter=K>v</parameter> blocks of one call, each value typed by the tool's schema."""
    arguments: dict[str, Any] = {}
    closes = NextOccurrence(inner, "</parameter>")
    pos = _past_space(inner, 0)
    while pos < len(inner):
        block = _parameter_at(inner, pos, closes, closed=closed)
        if isinstance(block, str):
            return Trouble(fmt, what, block, raw, name)
        key, value, pos = block
        arguments[key] = value_from_text(value, tools.parameter_schema(name, key))
        pos = _past_space(inner, pos)
    return Found(Shape(name, arguments), fmt, raw)


def _parameter_at(
    inner: str, pos: int, closes: NextOccurrence, *, closed: bool
) -> tuple[str, str, int] | str:
    """(key, value text, where the next block may start) of the block at `pos`, or what is wrong."""
    match = _PARAMETER_OPEN.match(inner, pos)
    if match is None:
        return f"{inner[pos : pos + 40].strip()!r} stands outside any <parameter> block"
    key = (match.group(1) or match.group(2) or "").strip()
    close = closes.at_or_after(match.end())
    following = _PARAMETER_OPEN.search(inner, match.end())
    if close >= 0 and (following is None or close < following.start()):
        return key, inner[match.end() : close], close + len("</parameter>")
    if following is None and not closed:
        return f"the <parameter={key}> block is not closed"
    end = following.start() if following is not None else len(inner)
    return key, inner[match.end() : end], end


def glm_call(body: str, raw: str, tools: ToolIndex, *, closed: bool) -> Finding:
    """GLM 4.5+: the tool name, then <arg_key>/<arg_value> pairs (newlines between them optional)."""
    head = _GLM_NAME.match(body)
    if head is None:
        return Trouble(CallFormat.GLM, GLM, "no tool name comes before the first <arg_key>", raw)
    name, pos = head.group(1), _past_space(body, head.end())
    arguments: dict[str, Any] = {}
    values_end = NextOccurrence(body, "</arg_value>")
    while pos < len(body):
        pair = _glm_pair_at(body, pos, values_end, closed=closed)
        if isinstance(pair, str):
            return Trouble(CallFormat.GLM, GLM, pair, raw, name)
        key, value, pos = pair
        arguments[key] = value_from_text(value, tools.parameter_schema(name, key))
        pos = _past_space(body, pos)
    return Found(Shape(name, arguments), CallFormat.GLM, raw)


def _glm_pair_at(
    body: str, pos: int, values_end: NextOccurrence, *, closed: bool
) -> tuple[str, str, int] | str:
    """(key, value text, where the next pair may start) of the pair at `pos`, or what is wrong."""
    if not body.startswith("<arg_key>", pos):
        return f"{body[pos : pos + 40].strip()!r} stands outside the <arg_key>/<arg_value> pairs"
    key_end = body.find("</arg_key>", pos, pos + 200)
    if key_end < 0:
        return "an <arg_key> is not closed"
    key = body[pos + len("<arg_key>") : key_end].strip()
    pos = _past_space(body, key_end + len("</arg_key>"))
    if not body.startswith("<arg_value>", pos):
        return f"<arg_key>{key}</arg_key> has no <arg_value>"
    start = pos + len("<arg_value>")
    close, following = values_end.at_or_after(start), body.find("<arg_key>", start)
    if close >= 0 and (following < 0 or close < following):
        return key, body[start:close], close + len("</arg_value>")
    if following < 0 and not closed:
        return f"the <arg_value> of {key} is not closed"
    # GLM 4.7 sometimes omits </arg_value> before the next key.
    end = following if following >= 0 else len(body)
    return key, body[start:end], end


def _past_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def looks_like_glm(body: str) -> bool:
    """A <tool_call> body that starts with a bare tool name, then <arg_key> pairs or nothing."""
    head = _GLM_NAME.match(body)
    if head is None:
        return False
    rest = body[head.end() :].lstrip()
    return not rest or rest.startswith("<arg_key>")


def minimax_calls(body: str, raw: str, tools: ToolIndex, *, closed: bool) -> list[Finding]:
    """MiniMax M2: <invoke name="NAME"> blocks of <parameter name="K">v</parameter>."""
    findings: list[Finding] = []
    closes = NextOccurrence(body, "</invoke>")
    pos = 0
    while (opener := _INVOKE_OPEN.search(body, pos)) is not None:
        close = closes.at_or_after(opener.end())
        following = _INVOKE_OPEN.search(body, opener.end())
        end = min(close if close >= 0 else len(body), following.start() if following else len(body))
        inner = body[opener.end() : end]
        ends_closed = end == close or following is not None or closed
        name = opener.group(1).strip()
        findings.append(_parameters(name, inner, CallFormat.MINIMAX, MINIMAX, raw, tools, closed=ends_closed))
        pos = end + (len("</invoke>") if end == close else 0)
    if not findings:
        findings.append(Trouble(CallFormat.MINIMAX, MINIMAX, 'it holds no <invoke name="..."> block', raw))
    return findings
