"""What tools a model may be offered, how they are described to it, and running them.

Owns `ToolSpec` (name, description, JSON-schema parameters, read-only flag),
`ToolResult`, the `ToolRegistry` that maps names to specs and executors, the
two harmless built-ins (`clock`, `calculator`), and `advertise`, the short
system-prompt text that tells a small local model which tools exist and the one
exact way to call them (a fenced `tool_call` block, which `tool_calls.py` parses).

The built-ins run in-process because they touch nothing: no files, no network,
no subprocesses. Real file and shell tools run in `tools_sandbox` processes
(DESIGN §5, later work) and never here; this registry is the seam where that
executor plugs in: a sandboxed tool registers its spec with an executor that
sends the call to a sandbox and turns the answer into a `ToolResult`.

`execute` never raises for a tool's own failure: bad arguments, a bad time
zone, a division by zero all come back as `ok=False` with a message meant for
the model. Programming errors at registration (a duplicate name, a schema we
cannot fully enforce) do raise.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from bastion.supervisor.errors import ToolRegistrationError, UnknownToolError
from bastion.supervisor.tools.schema import check_schema, validate


class ToolSpec(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str
    parameters: dict[str, Any]  # a JSON schema that tool_schema.check_schema accepts
    read_only: bool


class ToolResult(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    content: str


ToolExecutor = Callable[[Mapping[str, Any]], ToolResult]


class ToolRegistry:
    """Specs and executors by name, in registration order."""

    def __init__(self) -> None:
        self._tools: dict[str, tuple[ToolSpec, ToolExecutor]] = {}

    @classmethod
    def builtin(cls, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> ToolRegistry:
        """A registry holding `clock` and `calculator`; `now` is the clock's time source."""
        registry = cls()
        registry.register(CLOCK, lambda arguments: _clock(arguments, now))
        registry.register(CALCULATOR, _calculator)
        return registry

    def register(self, spec: ToolSpec, executor: ToolExecutor) -> None:
        if not spec.name.replace("_", "").replace("-", "").isalnum():
            raise ToolRegistrationError(f"tool name {spec.name!r} must be letters, digits, _ or -")
        if spec.name in self._tools:
            raise ToolRegistrationError(f"tool {spec.name!r} is already registered")
        check_schema(spec.parameters, f"{spec.name}.parameters")
        self._tools[spec.name] = (spec, executor)

    def names(self) -> list[str]:
        return list(self._tools)

    def get(self, name: str) -> ToolSpec:
        if name not in self._tools:
            raise UnknownToolError(f"no tool named {name!r}; available tools: {self._available()}")
        return self._tools[name][0]

    def select(self, names: Sequence[str]) -> list[ToolSpec]:
        """The specs for `names`, in that order, each once; any unknown name is an error."""
        unknown = [name for name in names if name not in self._tools]
        if unknown:
            raise UnknownToolError(
                f"unknown tool(s): {', '.join(unknown)}; available tools: {self._available()}"
            )
        return [self._tools[name][0] for name in dict.fromkeys(names)]

    def execute(self, name: str, arguments: Mapping[str, Any]) -> ToolResult:
        if name not in self._tools:
            return ToolResult(
                ok=False, content=f"no tool named {name!r}; available tools: {self._available()}"
            )
        spec, executor = self._tools[name]
        # The parser validates too; this keeps executors safe from any caller that skipped it.
        errors = validate(arguments, spec.parameters, "$.arguments")
        if errors:
            return ToolResult(ok=False, content=f"invalid arguments for {name}: {'; '.join(errors)}")
        try:
            return executor(arguments)
        except Exception as exc:  # a tool's failure is a result for the model, not a crash
            return ToolResult(ok=False, content=f"{name} failed: {type(exc).__name__}: {exc}")

    def _available(self) -> str:
        return ", ".join(self._tools) or "(none)"


def advertise(specs: Sequence[ToolSpec]) -> str:
    """System-prompt text listing `specs` and the exact call format, kept short for small contexts."""
    lines = ["You can use these tools:"]
    for spec in specs:
        schema = msgspec.json.encode(spec.parameters).decode()
        lines.append(f"- {spec.name}: {spec.description} Arguments (JSON schema): {schema}")
    # Small models copy examples literally, so the example is a real call of
    # the first tool with its own argument names, never a placeholder.
    lines += [
        "",
        "To use a tool, reply with only a block like this, nothing before or after it:",
        "```tool_call",
        msgspec.json.encode({"name": specs[0].name, "arguments": _example_arguments(specs[0])}).decode()
        if specs else '{"name": "clock", "arguments": {}}',
        "```",
        "For several tools, write one block per call. The results come back in the next message; "
        "then answer normally. If no tool is needed, just answer.",
    ]
    return "\n".join(lines)


def _example_arguments(spec: ToolSpec) -> dict[str, Any]:
    properties = spec.parameters.get("properties", {})
    required = spec.parameters.get("required", [])
    example: dict[str, Any] = {}
    for name in required:
        kind = properties.get(name, {}).get("type")
        example[name] = 1 if kind in ("integer", "number") else True if kind == "boolean" else f"<{name}>"
    return example


# --- clock -----------------------------------------------------------------

CLOCK = ToolSpec(
    name="clock",
    description="Current date and time, in the machine's time zone or an IANA one.",
    parameters={
        "type": "object",
        "properties": {"timezone": {"type": "string", "description": "IANA name, e.g. Europe/Paris"}},
        "additionalProperties": False,
    },
    read_only=True,
)


def _clock(arguments: Mapping[str, Any], now: Callable[[], datetime]) -> ToolResult:
    name = arguments.get("timezone")
    zone: tzinfo | None = None
    if name:
        try:
            zone = ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            return ToolResult(
                ok=False, content=f"unknown time zone {name!r}; use an IANA name such as Europe/Paris"
            )
    moment = now().astimezone(zone)
    label = name or moment.tzname() or "local"
    return ToolResult(ok=True, content=f"{moment.isoformat(timespec='seconds')} ({moment:%A}, {label})")


# --- calculator --------------------------------------------------------------

CALCULATOR = ToolSpec(
    name="calculator",
    description="Evaluate an arithmetic expression: + - * / // % **, parentheses, "
    "sqrt sin cos tan log exp abs round min max, pi, e.",
    parameters={
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "e.g. (3 + 4) * sqrt(2)"}},
        "required": ["expression"],
        "additionalProperties": False,
    },
    read_only=True,
)

# Caps that keep one expression cheap: its text, its tree, and any integer it makes.
_MAX_EXPRESSION = 256
_MAX_NODES = 128
_MAX_INT_BITS = 4096

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}  # fmt: skip
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_CONSTANTS = {"pi": math.pi, "e": math.e}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt, "sin": math.sin, "cos": math.cos, "tan": math.tan, "log": math.log,
    "exp": math.exp, "abs": abs, "round": lambda x, digits=0: _round(x, digits), "min": min, "max": max,
}  # fmt: skip


class _Refused(Exception):
    """The expression uses something the calculator does not allow; the message says what."""


def _calculator(arguments: Mapping[str, Any]) -> ToolResult:
    expression = arguments["expression"]
    try:
        value = _evaluate(expression)
    except _Refused as exc:
        return ToolResult(ok=False, content=f"cannot evaluate {expression[:60]!r}: {exc}")
    except ZeroDivisionError:
        return ToolResult(ok=False, content="division by zero")
    except (ArithmeticError, ValueError) as exc:  # overflow, math domain errors
        return ToolResult(ok=False, content=f"cannot evaluate {expression[:60]!r}: {exc}")
    return ToolResult(ok=True, content=_format(value))


def _evaluate(expression: str) -> int | float:
    """The value of a plain arithmetic expression; anything else raises (never runs code)."""
    if len(expression) > _MAX_EXPRESSION:
        raise _Refused(f"expression longer than {_MAX_EXPRESSION} characters")
    if "^" in expression:
        raise _Refused("^ is not a power operator here; use **")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as exc:
        raise _Refused("not a valid arithmetic expression") from exc
    if sum(1 for _ in ast.walk(tree)) > _MAX_NODES:
        raise _Refused("expression too complex")
    return _eval(tree.body)


def _eval(node: ast.expr) -> int | float:
    match node:
        case ast.Constant(value=bool()):
            raise _Refused("booleans are not numbers here")
        case ast.Constant(value=int() | float() as value):
            return _checked(value)
        case ast.Name(id=name) if name in _CONSTANTS:
            return _CONSTANTS[name]
        case ast.UnaryOp(op=op, operand=operand) if type(op) in _UNARY:
            return _UNARY[type(op)](_eval(operand))
        case ast.BinOp(left=left, op=ast.Pow(), right=right):
            return _checked(_power(_eval(left), _eval(right)))
        case ast.BinOp(left=left, op=op, right=right) if type(op) in _BINARY:
            return _checked(_BINARY[type(op)](_eval(left), _eval(right)))
        case ast.Call(func=ast.Name(id=name), args=args, keywords=[]) if name in _FUNCTIONS:
            if any(isinstance(arg, ast.Starred) for arg in args):
                raise _Refused("* arguments are not allowed")
            try:
                return _checked(_FUNCTIONS[name](*[_eval(arg) for arg in args]))
            except TypeError as exc:
                raise _Refused(f"{name}: {exc}") from exc
        case ast.Name(id=name):
            raise _Refused(f"unknown name {name!r}")
        case ast.Call(func=ast.Name(id=name)) if name not in _FUNCTIONS:
            raise _Refused(f"unknown function {name!r}")
        case ast.Constant():
            raise _Refused("only numbers are allowed")
        case _:
            raise _Refused(f"{type(node).__name__} is not allowed")


def _power(base: int | float, exponent: int | float) -> int | float:
    # Estimate the result's size before computing it: 9**9**9 must be refused, not attempted.
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if exponent > _MAX_INT_BITS or exponent * math.log2(abs(base)) > _MAX_INT_BITS:
            raise _Refused(f"result too large (over {_MAX_INT_BITS} bits)")
    return base**exponent


def _round(value: int | float, digits: int | float = 0) -> int | float:
    # round(5, -10**9) would build 10**(10**9) internally.
    if not isinstance(digits, int) or not -308 <= digits <= 308:
        raise _Refused("round: digits must be an integer between -308 and 308")
    return round(value, digits) if digits else round(value)


def _checked(value: Any) -> int | float:
    if isinstance(value, complex):
        raise _Refused("the result is a complex number")
    if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        raise _Refused(f"result too large (over {_MAX_INT_BITS} bits)")
    if isinstance(value, float) and not math.isfinite(value):
        raise _Refused("the result is not a finite number")
    return value


def _format(value: int | float) -> str:
    if isinstance(value, float):
        # 15 significant digits hide binary noise (0.1 + 0.2 -> 0.3) that would confuse a small model.
        return format(value, ".15g")
    return str(value)
