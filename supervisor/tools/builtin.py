"""The two built-in tools, which run in the supervisor itself: `clock` and `calculator`.

They run in-process because they touch nothing: no files, no network, no
subprocesses. Every tool that can touch anything runs in the sandbox
(sandboxed.py describes those). Each returns a `ToolResult` and never raises
for its own failure: a bad time zone or a division by zero is a result the
model reads. The calculator evaluates arithmetic by walking Python's `ast`
with size caps; it never calls `eval`.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping
from datetime import datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from bastion.supervisor.tools.registry import ToolResult, ToolSpec

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


def clock(arguments: Mapping[str, Any], now: Callable[[], datetime]) -> ToolResult:
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


def calculator(arguments: Mapping[str, Any]) -> ToolResult:
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
