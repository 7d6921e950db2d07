"""What a tool call looks like once its text has been isolated from the reply.

Owns the findings every call reader produces — `Found` (a tool name and its
arguments, not yet checked against the tools) and `Trouble` (text marked as a
call that cannot be read, with what it resembled and why) — and the readers of
call bodies shared by every format: JSON call shapes (`shape_of`), arguments
written as an object or as a JSON string (`arguments_of`), the arguments of a
call whose name sits outside the JSON (`named_call`), and Python-style calls
(`pythonic_calls`), read with `ast` and `ast.literal_eval`, never evaluated.

JSON call shapes: {"name", "arguments"|"parameters"|"args"|"input"},
{"function": {"name", "arguments"}} (arguments possibly a JSON string),
{"tool"|"tool_name"|"function": name, ...}, and, only where a format says so
(Apertus), {"NAME": {arguments}}.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from typing import Any

import msgspec

from bastion.protocol.agent_events import CallFormat
from bastion.supervisor.tools.near_json import decode_values


class Shape(msgspec.Struct, frozen=True):
    name: str
    arguments: dict[str, Any]
    bare_name: bool = False  # nothing but a name: {"name": "clock"}
    repaired: bool = False  # the JSON only parsed after near-JSON repair


class Found(msgspec.Struct, frozen=True):
    shape: Shape
    format: CallFormat
    raw: str  # the reply text the call was read from


class Trouble(msgspec.Struct, frozen=True):
    """Text clearly marked as a call that cannot be read as one."""

    format: CallFormat
    what: str  # what it looked like: "a Qwen3-Coder <function=...> call"
    reason: str  # what is wrong with it: "the <parameter=path> block is not closed"
    raw: str
    name: str = ""  # the tool it named, when it got that far


Finding = Found | Trouble

_NAME_KEYS = ("name", "tool", "tool_name", "function")
_ARGUMENT_KEYS = ("arguments", "parameters", "args", "input")
_ID_KEYS = frozenset({"id", "type", "call_id", "index", "tool_call_id"})
_FENCE_OPEN = re.compile(r"```[ \t]*[A-Za-z_][\w.+-]*[ \t]*\r?\n?|```")
# A body longer than this is not read as Python (ast's cost grows with it).
_MAX_PYTHONIC_CHARS = 32_000


def shape_of(value: Any) -> Shape | None:
    """The tool call `value` is, in any JSON shape models write one, or None."""
    if not isinstance(value, dict):
        return None
    function = value.get("function")
    if isinstance(function, dict):
        return shape_of(function) if isinstance(function.get("name"), str) else None
    name_key = next((key for key in _NAME_KEYS if isinstance(value.get(key), str) and value[key]), None)
    if name_key is None:
        return None
    args_key = next((key for key in _ARGUMENT_KEYS if key in value), None)
    if args_key is None:
        if set(value) - _ID_KEYS - {name_key}:
            return None
        return Shape(value[name_key], {}, bare_name=True)
    arguments = arguments_of(value[args_key])
    if arguments is None:
        return None
    return Shape(value[name_key], arguments[0], repaired=arguments[1])


def single_key_shape(value: Any) -> Shape | None:
    """Apertus writes {"NAME": {arguments}}: one key, the tool's name."""
    if not isinstance(value, dict) or len(value) != 1:
        return None
    [(name, raw_arguments)] = value.items()
    arguments = arguments_of(raw_arguments)
    if not name or arguments is None:
        return None
    return Shape(name, arguments[0], repaired=arguments[1])


def arguments_of(value: Any) -> tuple[dict[str, Any], bool] | None:
    """Arguments as a dict, and whether they needed repair; None if they are not an object."""
    if value is None:
        return {}, False
    if not isinstance(value, str):
        return (value, False) if isinstance(value, dict) else None
    # OpenAI- and Granite-style arguments arrive as a JSON string, sometimes near-JSON too.
    if not value.strip():
        return {}, False
    decoded = decode_values(value.strip())
    if isinstance(decoded, str) or len(decoded[0]) != 1 or not isinstance(decoded[0][0], dict):
        return None
    return decoded[0][0], decoded[1]


def unfence(body: str) -> str:
    """A fence inside a marked region (<tool_call>```json ...```</tool_call>) is only wrapping."""
    body = body.strip()
    if body.startswith("```"):
        opener = _FENCE_OPEN.match(body)
        body = body[opener.end() if opener else 3 :]
        body = body[: body.rfind("```")] if "```" in body else body
    return body.strip()


def json_calls(
    body: str, fmt: CallFormat, what: str, raw: str, read: Callable[[Any], Shape | None] = shape_of
) -> list[Finding]:
    """A region the model marked as holding JSON calls: each value is a call, or the region is Trouble."""
    decoded = decode_values(unfence(body))
    if isinstance(decoded, str):
        return [Trouble(fmt, what, f"it is not valid JSON, even after repair ({decoded})", raw)]
    values, repaired = decoded
    findings: list[Finding] = []
    for value in values:
        elements = value if isinstance(value, list) else [value]
        if isinstance(value, dict) and set(value) == {"tool_calls"} and isinstance(value["tool_calls"], list):
            elements = value["tool_calls"]
        shapes = [read(element) for element in elements]
        if not shapes:
            findings.append(Trouble(fmt, what, "its list of calls is empty", raw))
        for shape in shapes:
            if shape is None:
                findings.append(Trouble(fmt, what, "it holds no tool call (a name and its arguments)", raw))
            else:
                findings.append(Found(_repaired(shape, repaired), fmt, raw))
    return findings


def named_call(name: str, body: str, fmt: CallFormat, what: str, raw: str) -> Finding:
    """A call whose tool name sits outside the JSON (`name[ARGS]{...}`): the body is the arguments."""
    text = unfence(body)
    if not text:
        return Found(Shape(name, {}), fmt, raw)
    decoded = decode_values(text)
    if isinstance(decoded, str):
        return Trouble(fmt, what, f"the arguments of {name} are not JSON ({decoded})", raw, name)
    arguments = arguments_of(decoded[0][0])
    if arguments is None:
        return Trouble(fmt, what, f"the arguments of {name} are not a JSON object", raw, name)
    return Found(Shape(name, arguments[0], repaired=decoded[1] or arguments[1]), fmt, raw)


def _repaired(shape: Shape, repaired: bool) -> Shape:
    return (
        Shape(shape.name, shape.arguments, shape.bare_name, shape.repaired or repaired) if repaired else shape
    )


def pythonic_calls(body: str, positional: Callable[[str], list[str]] | None = None) -> list[Shape] | None:
    """Calls written like Python — `brave_search.call(query="x")`, `f(a=1)`, `[f(a=1), g()]` — read
    without running anything; None unless the whole body is such calls. Positional arguments take
    the names `positional` gives for the tool, and are refused without it."""
    if len(body) > _MAX_PYTHONIC_CHARS:
        return None
    try:
        tree = ast.parse(body.strip(), mode="exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    calls: list[ast.expr] = []
    for statement in tree.body:
        if not isinstance(statement, ast.Expr):
            return None
        node = statement.value
        calls += node.elts if isinstance(node, ast.List) else [node]
    shapes = [shape for call in calls if (shape := _pythonic_call(call, positional)) is not None]
    return shapes if shapes and len(shapes) == len(calls) else None


def _pythonic_call(node: ast.expr, positional: Callable[[str], list[str]] | None) -> Shape | None:
    if not isinstance(node, ast.Call) or (node.args and positional is None):
        return None
    match node.func:
        case ast.Attribute(value=ast.Name(id=name), attr="call") | ast.Name(id=name):
            pass
        case _:
            return None
    names = positional(name) if positional is not None and node.args else []
    if len(node.args) > len(names):
        return None
    pairs = [*zip(names, node.args, strict=False), *((k.arg, k.value) for k in node.keywords)]
    arguments: dict[str, Any] = {}
    for key, value in pairs:
        if key is None or key in arguments:
            return None
        try:
            # Round-trip through JSON so tuples, sets and the like become what a JSON call would hold.
            arguments[key] = msgspec.json.decode(msgspec.json.encode(ast.literal_eval(value)))
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError, msgspec.MsgspecError):
            return None
    return Shape(name, arguments)
