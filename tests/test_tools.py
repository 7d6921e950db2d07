"""The tool registry, the built-in clock and calculator, and how tools are advertised to a model."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.supervisor.errors import (
    SupervisorError,
    ToolRegistrationError,
    ToolSchemaError,
    UnknownToolError,
)
from bastion.supervisor.tools.calls import parse_tool_calls
from bastion.supervisor.tools.registry import ToolRegistry, ToolResult, ToolSpec, advertise

NOON_UTC = datetime(2025, 1, 15, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def registry() -> ToolRegistry:
    return ToolRegistry.builtin(now=lambda: NOON_UTC)


def calculate(registry: ToolRegistry, expression: str) -> ToolResult:
    return registry.execute("calculator", {"expression": expression})


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("1 + 2 * 3", "7"), ("(1 + 2) * 3", "9"), ("7 / 2", "3.5"), ("7 // 2", "3"), ("-7 % 3", "2"),
        ("2 ** 10", "1024"), ("2 ** -1", "0.5"), ("-2 ** 2", "-4"), ("+5", "5"), ("0.1 + 0.2", "0.3"),
        ("sqrt(16)", "4"), ("abs(-3)", "3"), ("round(2.567, 2)", "2.57"), ("round(2.5)", "2"),
        ("min(3, 1, 2)", "1"), ("max(3, 1, 2)", "3"), ("log(e)", "1"), ("log(8, 2)", "3"), ("exp(0)", "1"),
        ("sin(0) + cos(0) + tan(0)", "1"), ("pi", "3.14159265358979"), ("1_000 * 3", "3000"),
        ("2 ** 100", str(2**100)), ("  12  ", "12"),
    ],
)  # fmt: skip
def test_calculator_evaluates_arithmetic(registry: ToolRegistry, expression: str, value: str) -> None:
    assert calculate(registry, expression) == ToolResult(ok=True, content=value)


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("__import__('os')", "unknown function '__import__'"),
        ("().__class__", "Attribute is not allowed"),
        ("(1).__class__.__bases__", "Attribute is not allowed"),
        ("open('/etc/passwd')", "unknown function 'open'"),
        ("x + 1", "unknown name 'x'"),
        ("'a' * 3", "only numbers are allowed"),
        ("[i for i in range(9)]", "ListComp is not allowed"),
        ("lambda: 1", "Lambda is not allowed"),
        ("True + 1", "booleans are not numbers"),
        ("1 if 1 else 2", "IfExp is not allowed"),
        ("2 ^ 3", "use **"),
        ("9**9**9", "result too large"),
        ("10 ** 100000", "result too large"),
        ("(2 ** 4000) * (2 ** 4000)", "result too large"),
        ("round(5, -10**9)", "digits must be an integer"),
        ("sqrt(-1)", "math domain error"),
        ("log(0)", "math domain error"),
        ("(-8) ** 0.5", "complex"),
        ("1e308 * 10", "not a finite number"),
        ("sqrt(*[4])", "not allowed"),
        ("max()", "max"),
        ("1 +", "not a valid arithmetic expression"),
        ("9" * 300, "longer than 256 characters"),
        ("+".join(["1"] * 120), "too complex"),
    ],
)
def test_calculator_refuses_everything_but_arithmetic(
    registry: ToolRegistry, expression: str, reason: str
) -> None:
    started = time.monotonic()
    result = calculate(registry, expression)
    assert time.monotonic() - started < 1.0
    assert not result.ok
    assert reason in result.content


@pytest.mark.parametrize("expression", ["1/0", "1 // 0", "5 % 0", "1.0 / 0.0"])
def test_division_by_zero_is_a_failed_result(registry: ToolRegistry, expression: str) -> None:
    assert calculate(registry, expression) == ToolResult(ok=False, content="division by zero")


def test_calculator_refuses_a_huge_string_quickly(registry: ToolRegistry) -> None:
    started = time.monotonic()
    result = calculate(registry, "1+" * 500_000 + "1")
    assert not result.ok and time.monotonic() - started < 1.0


# ast.parse warns about text like "1e"; the warning is not the calculator's to silence (process-wide state).
@pytest.mark.filterwarnings("ignore::SyntaxWarning")
@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789+-*/%().e ,abcdfgilmnopqrstx_^'\"[]", max_size=40) | st.text(max_size=40))
def test_calculator_never_raises_only_fails(expression: str) -> None:
    result = ToolRegistry.builtin().execute("calculator", {"expression": expression})
    assert isinstance(result, ToolResult) and isinstance(result.content, str)


def test_clock_without_timezone_gives_local_time(registry: ToolRegistry) -> None:
    result = registry.execute("clock", {})
    local = NOON_UTC.astimezone()
    assert result.ok
    assert result.content.startswith(local.isoformat(timespec="seconds"))
    assert "Wednesday" in result.content


def test_clock_with_timezone_converts(registry: ToolRegistry) -> None:
    assert registry.execute("clock", {"timezone": "Asia/Tokyo"}) == ToolResult(
        ok=True, content="2025-01-15T21:00:00+09:00 (Wednesday, Asia/Tokyo)"
    )


@pytest.mark.parametrize(
    "zone", ["Mars/Olympus_Mons", "../../etc/passwd", "/etc/localtime", "America", "a\0b"]
)
def test_clock_with_bad_timezone_fails_clearly(registry: ToolRegistry, zone: str) -> None:
    result = registry.execute("clock", {"timezone": zone})
    assert not result.ok
    assert "unknown time zone" in result.content and "IANA" in result.content


def test_execute_checks_arguments_against_the_schema(registry: ToolRegistry) -> None:
    result = registry.execute("calculator", {"expression": 5})
    assert result == ToolResult(
        ok=False,
        content="invalid arguments for calculator: $.arguments.expression: expected string, got number",
    )
    assert not registry.execute("clock", {"zone": "UTC"}).ok


def test_execute_of_unknown_tool_fails_without_raising(registry: ToolRegistry) -> None:
    result = registry.execute("shell", {"cmd": "ls"})
    assert not result.ok
    assert "no tool named 'shell'" in result.content and "clock, calculator" in result.content


def test_an_executor_that_raises_becomes_a_failed_result() -> None:
    def explode(arguments: Mapping[str, Any]) -> ToolResult:
        raise RuntimeError("disk on fire")

    registry = ToolRegistry()
    registry.register(
        ToolSpec(name="boom", description="d", parameters={"type": "object"}, read_only=True), explode
    )
    assert registry.execute("boom", {}) == ToolResult(
        ok=False, content="boom failed: RuntimeError: disk on fire"
    )


def test_registry_lists_gets_and_selects_in_order(registry: ToolRegistry) -> None:
    assert registry.names() == ["clock", "calculator"]
    assert registry.get("clock").read_only
    assert [spec.name for spec in registry.select(["calculator", "clock", "calculator"])] == [
        "calculator",
        "clock",
    ]
    assert registry.select([]) == []


def test_selecting_an_unknown_tool_lists_the_available_ones(registry: ToolRegistry) -> None:
    with pytest.raises(UnknownToolError) as caught:
        registry.select(["clock", "shell", "web"])
    assert str(caught.value) == "unknown tool(s): shell, web; available tools: clock, calculator"
    assert isinstance(caught.value, SupervisorError)
    with pytest.raises(UnknownToolError, match="available tools: clock, calculator"):
        registry.get("shell")


def test_registering_twice_or_with_an_unenforceable_schema_is_refused(registry: ToolRegistry) -> None:
    spec = registry.get("clock")
    with pytest.raises(ToolRegistrationError, match="already registered"):
        registry.register(spec, lambda arguments: ToolResult(ok=True, content=""))
    loose = ToolSpec(
        name="loose", description="d", parameters={"type": "object", "allOf": []}, read_only=True
    )
    with pytest.raises(ToolSchemaError, match="loose.parameters: unsupported schema keyword"):
        registry.register(loose, lambda arguments: ToolResult(ok=True, content=""))
    badly_named = msgspec.structs.replace(spec, name="two words")
    with pytest.raises(ToolRegistrationError, match="letters, digits"):
        registry.register(badly_named, lambda arguments: ToolResult(ok=True, content=""))


def test_advertise_names_each_tool_with_its_schema_and_the_call_format(registry: ToolRegistry) -> None:
    specs = registry.select(registry.names())
    text = advertise(specs)
    for spec in specs:
        assert spec.name in text and spec.description in text
        assert msgspec.json.encode(spec.parameters).decode() in text
    assert "```tool_call" in text and '"arguments"' in text
    assert len(text) < 1500  # small models have small contexts


def test_the_advertised_call_format_is_one_the_parser_reads(registry: ToolRegistry) -> None:
    text = advertise(registry.select(["calculator"]))
    example = text[text.index("```tool_call") : text.rindex("```") + 3]
    # The example is a real call of the first tool, with its own argument names.
    assert '"name":"calculator"' in example and '"expression"' in example
    reply = example.replace('"<expression>"', json.dumps("6*7"))
    [call] = parse_tool_calls(reply, {"calculator": registry.get("calculator")}).calls
    assert registry.execute(call.name, call.arguments) == ToolResult(ok=True, content="42")


def test_specs_and_results_are_frozen_structs(registry: ToolRegistry) -> None:
    with pytest.raises(AttributeError):
        registry.get("clock").name = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        ToolResult(ok=True, content="x").ok = False  # type: ignore[misc]
