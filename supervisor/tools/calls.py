"""Finding tool calls in a model's reply, however a small local model chose to write them.

Owns `parse_tool_calls`, which turns reply text into the calls it holds (in reply
order), the problems worth telling the model about, and the prose left once the
call text is removed; and `repair_hint`, the one short message fed back to the
model as the tool result when its calls could not be run.

Where calls are looked for (first match wins, left to right):
    ```tool_call / ```tool fence      explicit: unparseable -> MALFORMED
    <tool_call>...</tool_call>        Hermes, Qwen; explicit
    <|python_tag|>...                 Llama 3.1 (JSON, or `name.call(arg=...)`); explicit
    [TOOL_CALLS]...                   Mistral (JSON array, or `name[ARGS]{...}`); explicit
    ```json / unlabelled fence        a call only if the body is call-shaped
    bare JSON object or array         anywhere in the prose, a call only if call-shaped
Fences with any other label (```python ...) are prose and are not searched.

A call is "call-shaped" when it names a tool and carries arguments, in any of the
shapes models produce: {"name", "arguments"|"parameters"|"args"|"input"},
{"function": {"name", "arguments"}} (arguments possibly a JSON string),
{"tool"|"tool_name"|"function": name, ...}, or {"tool_calls": [...]}. Outside
explicit markers, anything else is just text: prose that mentions JSON yields no
calls and no problems.

Also forgiven: a tool name in another case or namespaced (`functions.clock`),
`null` for an optional argument (dropped), a marker quoted inside an argument
string (not taken for a marker). Near-JSON is repaired (`_repair`) only after
strict parsing fails, and the repair is kept only if the result then parses.
Work per reply is bounded, so a degenerate reply cannot make parsing slow. The module never evaluates model text:
Python-style calls are read with `ast` and `ast.literal_eval`. It does not run
tools, gate them or count retries; the agent loop does.
"""

from __future__ import annotations

import ast
import difflib
import enum
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec

from bastion.protocol.agent_events import CallFormat
from bastion.supervisor.tools.near_json import decode_values, extract_value, past_json
from bastion.supervisor.tools.registry import ToolSpec
from bastion.supervisor.tools.schema import validate


class ProblemKind(enum.Enum):
    MALFORMED = "malformed"  # explicitly marked as a call but unreadable
    UNKNOWN_TOOL = "unknown_tool"
    INVALID_ARGUMENTS = "invalid_arguments"


class ParsedCall(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    arguments: dict[str, Any]
    format: CallFormat
    raw: str  # the reply text the call was read from
    repaired: bool = False  # the JSON only parsed after near-JSON repair


class CallProblem(msgspec.Struct, frozen=True, kw_only=True):
    kind: ProblemKind
    name: str  # "" when the call was too malformed to name a tool
    message: str
    hint: str
    raw: str


class ParseOutcome(msgspec.Struct, frozen=True, kw_only=True):
    calls: tuple[ParsedCall, ...] = ()
    problems: tuple[CallProblem, ...] = ()
    prose: str = ""


def parse_tool_calls(reply: str, tools: Mapping[str, ToolSpec]) -> ParseOutcome:
    """The calls, problems and remaining prose in `reply`; no tools means nothing is parsed."""
    if not tools:
        return ParseOutcome(prose=reply.strip())
    scan = _Scan(reply, tools)
    scan.run()
    calls = tuple(item for item in scan.items if isinstance(item, ParsedCall))
    problems = tuple(item for item in scan.items if isinstance(item, CallProblem))
    if not scan.items:
        return ParseOutcome(prose=reply.strip())
    return ParseOutcome(calls=calls, problems=problems, prose=_join_prose(scan.prose))


def repair_hint(problems: Sequence[CallProblem]) -> str:
    """One short message telling the model what was wrong with its calls and how to fix them."""
    if not problems:
        return ""
    lines = ["Your tool call was not run." if len(problems) == 1 else "Your tool calls were not run."]
    lines += [f"- {problem.message}. {problem.hint}" for problem in problems[:3]]
    lines.append("Reply with a corrected ```tool_call``` block, or answer without a tool.")
    return "\n".join(lines)


# --- scanning the reply ---------------------------------------------------------

_MARKER = re.compile(r"```|<tool_call>|<\|python_tag\|>|\[TOOL_CALLS\]")
_FENCE_LABEL = re.compile(r"[ \t]*([A-Za-z_][\w.+-]*)?[ \t]*\r?\n?")
_EXPLICIT_FENCES = frozenset({"tool_call", "tool_calls", "tool"})
_JSON_FENCES = frozenset({"", "json", "jsonc", "json5"})
_PYTHONIC_FENCES = frozenset({"", "python", "py"})
# Where a bare JSON value might start: an object opening on a key, or an array of objects.
_JSON_START = re.compile(r"""\{\s*["'\w]|\[\s*\{""")
# Tag-style markers: the call format, the tokens closing the body (consumed with it), and the
# tokens that end the body without belonging to it (the next call's marker).
_TAGS = {
    "<tool_call>": (CallFormat.TAGGED, ("</tool_call>",), ("<tool_call>",)),
    "<|python_tag|>": (CallFormat.PYTHON_TAG, ("<|eom_id|>", "<|eot_id|>"), ()),
    "[TOOL_CALLS]": (CallFormat.MISTRAL, ("</s>",), ("[TOOL_CALLS]",)),
}
_MISTRAL_NAMED = re.compile(r"\s*([\w.-]+)(?:\[CALL_ID\]\w+)?\[ARGS\]")
# Bounds on work per reply: a hostile or degenerate reply must not make parsing slow.
_MAX_BARE_ATTEMPTS = 64

_Item = ParsedCall | CallProblem


class _Scan:
    def __init__(self, reply: str, tools: Mapping[str, ToolSpec]) -> None:
        self.reply = reply
        self.tools = tools
        self.items: list[_Item] = []
        self.prose: list[str] = []

    def run(self) -> None:
        pos = 0
        while True:
            marker = _MARKER.search(self.reply, pos)
            limit = marker.start() if marker else len(self.reply)
            resume = self._bare(pos, limit)
            if marker is None:
                return
            # A JSON value ran over the marker: it was inside a string, not a marker at all.
            pos = resume if resume > limit else self._region(marker)

    def _region(self, marker: re.Match[str]) -> int:
        """Handle the marked region starting at `marker`; return where the scan resumes."""
        text, start, token = self.reply, marker.start(), marker.group()
        if token != "```":
            fmt, closers, stops = _TAGS[token]
            after_json = past_json(text, marker.end())
            body_end = min(_find(text, needle, after_json) for needle in (*closers, *stops))
            end = body_end + len(next((c for c in closers if text.startswith(c, body_end)), ""))
            self.items += self._explicit(text[marker.end() : body_end], fmt, text[start:end])
            return end
        label_match = _FENCE_LABEL.match(text, marker.end())
        assert label_match is not None  # every part of the pattern is optional
        label = (label_match.group(1) or "").lower()
        body_end = _find(text, "```", past_json(text, label_match.end()))
        end = min(body_end + 3, len(text))
        raw, body = text[start:end], text[label_match.end() : body_end]
        if label in _EXPLICIT_FENCES:
            self.items += self._explicit(body, CallFormat.FENCED, raw)
        elif label in _JSON_FENCES and (found := self._implicit(body, CallFormat.FENCED_JSON, raw)):
            self.items += found
        elif label in _PYTHONIC_FENCES and (found := self._pythonic_known(body, raw)):
            self.items += found
        else:
            self.prose.append(raw)  # a code sample: prose, and not searched for calls
        return end

    def _explicit(self, body: str, fmt: CallFormat, raw: str) -> list[_Item]:
        """A region the model marked as a call: whatever it holds is a call or a problem."""
        body = _unfence(body.strip())
        if fmt is CallFormat.MISTRAL and (named := _MISTRAL_NAMED.match(body)):
            arguments = _arguments(body[named.end() :].strip())
            if arguments is None:
                return [
                    self._malformed(f"the arguments after {named.group(1)}[ARGS] are not a JSON object", raw)
                ]
            shape = _Shape(named.group(1), arguments[0], bare_name=False, repaired=arguments[1])
            return [self._resolve(shape, fmt, raw, repaired=False)]
        decoded = decode_values(body)
        if isinstance(decoded, str) and fmt is CallFormat.PYTHON_TAG:
            shapes = _pythonic_calls(body)
            if shapes is not None:
                return [self._resolve(shape, fmt, raw, repaired=False) for shape in shapes]
        if isinstance(decoded, str):
            return [self._malformed(f"{_WHAT[fmt]} is not valid JSON, even after repair ({decoded})", raw)]
        values, repaired = decoded
        items: list[_Item] = []
        for value in values:
            found = self._interpret(value, fmt, raw, repaired, explicit=True)
            items += (
                found if found is not None else [self._malformed(f"{_WHAT[fmt]} holds no tool call", raw)]
            )
        return items

    def _pythonic_known(self, body: str, raw: str) -> list[_Item] | None:
        """A fence whose whole body is calls of *known* tools written like Python
        (`write_file("a.txt", "hi")`); positional arguments take the schema's
        required names in order. Anything else in such a fence is code, not a call."""
        shapes = _pythonic_calls(body.strip(), self._positional_names)
        if shapes is None or not all(self._lookup(shape.name) for shape in shapes):
            return None
        return [self._resolve(shape, CallFormat.PYTHONIC, raw, repaired=False) for shape in shapes]

    def _positional_names(self, name: str) -> list[str]:
        spec = self._lookup(name)
        if spec is None:
            return []
        properties = list(spec.parameters.get("properties", {}))
        required = [p for p in spec.parameters.get("required", []) if p in properties]
        return required + [p for p in properties if p not in required]

    def _implicit(self, body: str, fmt: CallFormat, raw: str) -> list[_Item] | None:
        """Unmarked JSON: calls if every value in it is call-shaped, else None (it is just text)."""
        decoded = decode_values(body.strip())
        if isinstance(decoded, str):
            return None
        values, repaired = decoded
        items: list[_Item] = []
        for value in values:
            found = self._interpret(value, fmt, raw, repaired, explicit=False, alone=len(values) == 1)
            if found is None:
                return None
            items += found
        return items

    def _bare(self, pos: int, limit: int) -> int:
        """Prose in reply[pos:limit]: keep it, lifting out any call-shaped JSON in it. Returns where
        the scan resumes: `limit`, or the end of a valid JSON value that ran past it."""
        text, kept, attempts = self.reply, pos, 0
        while attempts < _MAX_BARE_ATTEMPTS and (found := _JSON_START.search(text, pos, limit)) is not None:
            attempts += 1
            start = found.start()
            extent = extract_value(text, start, limit)
            if extent is None:
                pos = start + 1
                continue
            value, end, repaired = extent
            alone = not text[:start].strip() and not text[end:].strip()
            raw = text[start:end]
            calls = self._interpret(value, CallFormat.BARE_JSON, raw, repaired, explicit=False, alone=alone)
            if calls is not None:
                self.prose.append(text[kept:start])
                self.items += calls
                kept = end
            pos = end  # a JSON value that is not a call is text; do not look inside it
        resume = max(pos, limit)
        self.prose.append(text[kept:resume])
        return resume

    def _interpret(
        self, value: Any, fmt: CallFormat, raw: str, repaired: bool, *, explicit: bool, alone: bool = False
    ) -> list[_Item] | None:
        if isinstance(value, dict) and set(value) == {"tool_calls"}:
            value = value["tool_calls"]
        shapes = [_shape(element) for element in (value if isinstance(value, list) else [value])]
        if not shapes or any(shape is None for shape in shapes):
            return None
        # {"name": "x"} alone is a call only where the model clearly meant one.
        if not explicit and any(s.bare_name and not (alone and self._lookup(s.name)) for s in shapes if s):
            return None
        return [self._resolve(shape, fmt, raw, repaired) for shape in shapes if shape is not None]

    def _resolve(self, shape: _Shape, fmt: CallFormat, raw: str, repaired: bool) -> _Item:
        spec = self._lookup(shape.name)
        if spec is None:
            return CallProblem(
                kind=ProblemKind.UNKNOWN_TOOL, name=shape.name, message=f"there is no tool named {shape.name!r}",
                hint=self._available(shape.name), raw=raw,
            )  # fmt: skip
        arguments = _without_null_optionals(shape.arguments, spec.parameters)
        errors = validate(arguments, spec.parameters, "$.arguments")
        if errors:
            return CallProblem(
                kind=ProblemKind.INVALID_ARGUMENTS, name=spec.name, message=f"{spec.name}: {'; '.join(errors[:3])}",
                hint=_describe_arguments(spec), raw=raw,
            )  # fmt: skip
        return ParsedCall(
            name=spec.name, arguments=arguments, format=fmt, raw=raw, repaired=repaired or shape.repaired
        )

    def _lookup(self, name: str) -> ToolSpec | None:
        if name in self.tools:
            return self.tools[name]
        # "functions.clock" (OpenAI-style namespacing) and "Clock" both mean clock.
        bare = name.rsplit(".", 1)[-1].lower()
        matches = [spec for key, spec in self.tools.items() if key.lower() == bare]
        return matches[0] if len(matches) == 1 else None

    def _available(self, name: str) -> str:
        names = list(self.tools)
        close = difflib.get_close_matches(name, names, n=1)
        guess = f"Did you mean {close[0]}? " if close else ""
        return f"{guess}Available tools: {', '.join(names)}."

    def _malformed(self, message: str, raw: str) -> CallProblem:
        example = '```tool_call\n{"name": "TOOL_NAME", "arguments": {...}}\n```'
        hint = (f"Write exactly {example} with valid JSON (double quotes, no trailing commas). "
                f"Available tools: {', '.join(self.tools)}.")  # fmt: skip
        return CallProblem(kind=ProblemKind.MALFORMED, name="", message=message, hint=hint, raw=raw)


_WHAT = {
    CallFormat.FENCED: "the tool_call block",
    CallFormat.TAGGED: "the <tool_call> tag",
    CallFormat.PYTHON_TAG: "the <|python_tag|> call",
    CallFormat.MISTRAL: "the [TOOL_CALLS] list",
}


def _find(text: str, needle: str, start: int) -> int:
    found = text.find(needle, start)
    return len(text) if found < 0 else found


def _unfence(body: str) -> str:
    """A fence inside a marked region (<tool_call>```json ...```</tool_call>) is only wrapping."""
    if body.startswith("```"):
        label = _FENCE_LABEL.match(body, 3)
        body = body[label.end() if label else 3 :]
        body = body[: body.rfind("```")] if "```" in body else body
    return body.strip()


def _without_null_optionals(arguments: dict[str, Any], schema: Mapping[str, Any]) -> dict[str, Any]:
    """Small models write `"unit": null` for an optional argument they mean to leave out."""
    properties, required = schema.get("properties", {}), set(schema.get("required", ()))
    return {
        key: value for key, value in arguments.items()
        if not (value is None and key in properties and key not in required and validate(None, properties[key]))
    }  # fmt: skip


def _join_prose(pieces: list[str]) -> str:
    """The prose around removed calls, with the gaps they leave closed up."""
    text = ""
    for piece in pieces:
        if text and piece and not text.endswith("\n") and not piece.startswith("\n"):
            text = text.rstrip(" \t") + " " + piece.lstrip(" \t")
        else:
            text += piece
    return re.sub(r"\n[ \t]*\n(?:[ \t]*\n)+", "\n\n", text).strip()


def _describe_arguments(spec: ToolSpec) -> str:
    properties = spec.parameters.get("properties", {})
    required = set(spec.parameters.get("required", ()))
    if not properties:
        return f'{spec.name} takes no arguments: use "arguments": {{}}.'
    fields = []
    for name, schema in properties.items():
        kind = schema.get("type", "any")
        kind = " or ".join(kind) if isinstance(kind, list) else kind
        if "enum" in schema:
            kind = "one of " + ", ".join(json.dumps(option) for option in schema["enum"])
        fields.append(f'"{name}": {kind}' + (" (required)" if name in required else ""))
    return f"{spec.name} takes {{{', '.join(fields)}}}."


# --- call shapes ------------------------------------------------------------------


class _Shape(msgspec.Struct, frozen=True):
    name: str
    arguments: dict[str, Any]
    bare_name: bool  # nothing but a name: {"name": "clock"}
    repaired: bool = False  # its arguments were a near-JSON string


_NAME_KEYS = ("name", "tool", "tool_name", "function")
_ARGUMENT_KEYS = ("arguments", "parameters", "args", "input")
_ID_KEYS = frozenset({"id", "type", "call_id", "index"})


def _shape(value: Any) -> _Shape | None:
    """The tool call `value` is, in any shape models write one, or None."""
    if not isinstance(value, dict):
        return None
    function = value.get("function")
    if isinstance(function, dict):
        return _shape(function) if isinstance(function.get("name"), str) else None
    name_key = next((key for key in _NAME_KEYS if isinstance(value.get(key), str) and value[key]), None)
    if name_key is None:
        return None
    args_key = next((key for key in _ARGUMENT_KEYS if key in value), None)
    if args_key is None:
        if set(value) - _ID_KEYS - {name_key}:
            return None
        return _Shape(value[name_key], {}, bare_name=True)
    arguments = _arguments(value[args_key])
    if arguments is None:
        return None
    return _Shape(value[name_key], arguments[0], bare_name=False, repaired=arguments[1])


def _arguments(value: Any) -> tuple[dict[str, Any], bool] | None:
    """Arguments as a dict, and whether they needed repair; None if they are not an object."""
    if value is None:
        return {}, False
    if not isinstance(value, str):
        return (value, False) if isinstance(value, dict) else None
    # OpenAI-style arguments arrive as a JSON string, sometimes near-JSON too.
    if not value.strip():
        return {}, False
    decoded = decode_values(value.strip())
    if isinstance(decoded, str) or len(decoded[0]) != 1 or not isinstance(decoded[0][0], dict):
        return None
    return decoded[0][0], decoded[1]


def _pythonic_calls(body: str, positional: Callable[[str], list[str]] | None = None) -> list[_Shape] | None:
    """Llama's `brave_search.call(query="x")` (or `f(a=1)`, `[f(a=1), g()]`), read without running it."""
    try:
        tree = ast.parse(body, mode="exec")
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


def _pythonic_call(node: ast.expr, positional: Callable[[str], list[str]] | None = None) -> _Shape | None:
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
    return _Shape(name, arguments, bare_name=False)
