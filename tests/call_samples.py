"""The tools the call-format tests call, after the ones llama.cpp's and vLLM's parser tests use.

`special_function(arg1: integer)`, `special_function_with_opt`, `python(code)` and
`complex_function` are llama.cpp's tests/test-chat.cpp tools; `get_weather` and
`register_user` are vLLM's tests/entrypoints/openai/tool_parsers tools.
"""

from __future__ import annotations

from typing import Any

from bastion.supervisor.tools.calls import ParseOutcome, parse_tool_calls
from bastion.supervisor.tools.registry import ToolSpec


def tool(name: str, properties: dict[str, Any], required: tuple[str, ...] = ()) -> ToolSpec:
    schema = {"type": "object", "properties": properties, "required": list(required)}
    return ToolSpec(name=name, description=f"{name} (test)", parameters=schema, read_only=True)


INTEGER = {"type": "integer"}
STRING = {"type": "string"}
TOOLS = {spec.name: spec for spec in [
    tool("special_function", {"arg1": INTEGER}, ("arg1",)),
    tool("special_function_with_opt", {"arg1": INTEGER, "arg2": INTEGER}, ("arg1",)),
    tool("python", {"code": STRING}, ("code",)),
    tool("complex_function", {"name": STRING, "age": INTEGER, "active": {"type": "boolean"},
                              "score": {"type": "number"}}, ("name", "age", "active", "score")),
    tool("get_weather", {"city": STRING, "days": INTEGER, "unit": {"enum": ["celsius", "fahrenheit"]}},
         ("city",)),
    tool("register_user", {"name": STRING, "age": INTEGER, "address": {"type": "object"},
                           "role": {"type": ["string", "null"]}, "passed_test": {"type": "boolean"},
                           "aliases": {"type": "array", "items": STRING}}, ("name",)),
    tool("now", {}),
    tool("write_file", {"path": STRING, "content": STRING, "config": {"type": "object"},
                        "tags": {"type": "array"}, "ratio": {"type": "number"}}, ("path",)),
]}  # fmt: skip

ARG1 = ("special_function", {"arg1": 1})


def parse(reply: str) -> ParseOutcome:
    return parse_tool_calls(reply, TOOLS)


def calls_of(outcome: ParseOutcome) -> list[tuple[str, dict[str, Any]]]:
    return [(call.name, call.arguments) for call in outcome.calls]
