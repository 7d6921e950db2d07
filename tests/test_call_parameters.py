"""Argument values written as text between tags, typed by the tool's schema.

Qwen3-Coder, Seed-OSS, GLM and MiniMax write `<parameter=age>\n30\n</parameter>`:
the schema says whether that is 30 or "30". Cases from llama.cpp's
tests/test-chat.cpp (LC) Qwen3-Coder XML block and Nemotron-3-Nano peg-parser
block, and vLLM's qwen3coder_tool_parser.py `_convert_param_value` (VL).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.supervisor.tools.calls import CallFormat, ParseOutcome, ProblemKind, parse_tool_calls
from bastion.supervisor.tools.typed_values import trim_block, value_from_text
from tests.call_samples import TOOLS, calls_of, tool

LC = "llama.cpp tests/test-chat.cpp"
EXTRA = [
    tool("math_function", {"negative": {"type": "integer"}, "decimal": {"type": "number"},
                           "scientific": {"type": "number"}, "formula": {"type": "string"}}),
    tool("null_function", {"optional_param": {"type": "null"}}, ("optional_param",)),
    tool("qwen_union", {"priority": {"type": ["number", "null"]},
                        "maybe_text": {"anyOf": [{"type": "string"}]},
                        "config": {"anyOf": [{"type": "object"}, {"type": "null"}]}}),
]  # fmt: skip
ALL_TOOLS = {**TOOLS, **{spec.name: spec for spec in EXTRA}}


def parse(reply: str) -> ParseOutcome:
    return parse_tool_calls(reply, ALL_TOOLS)


def qwen(name: str, *parameters: tuple[str, str]) -> str:
    """A call as Qwen3-Coder writes it, pretty-printed as in LC's Qwen3-Coder block."""
    blocks = "".join(f"    <parameter={key}>\n{value}\n    </parameter>\n" for key, value in parameters)
    return f"<tool_call>\n  <function={name}>\n{blocks}  </function>\n</tool_call>"


# (spec, source, reply, expected arguments)
TYPED: list[tuple[str, str, str, tuple[str, dict[str, Any]]]] = [
    ("reads_an_object_parameter_as_json", f"{LC} Qwen3-Coder, JSON object as parameter value",
     qwen("write_file", ("path", "a"), ("config", '      {"host": "localhost", "port": 8080, "ssl": false}')),
     ("write_file", {"path": "a", "config": {"host": "localhost", "port": 8080, "ssl": False}})),
    ("reads_an_array_parameter_as_json", f"{LC} Qwen3-Coder, array as parameter value",
     qwen("write_file", ("path", "a"), ("tags", '      ["apple", "banana", "cherry"]')),
     ("write_file", {"path": "a", "tags": ["apple", "banana", "cherry"]})),
    ("reads_negative_and_scientific_numbers", f"{LC} Qwen3-Coder, negative numbers and scientific notation",
     qwen("math_function", ("negative", " -42"), ("decimal", " -3.14"), ("scientific", " 1.23e-4")),
     ("math_function", {"negative": -42, "decimal": -3.14, "scientific": 1.23e-4})),
    ("reads_null_for_a_null_parameter", f"{LC} Qwen3-Coder, null value",
     qwen("null_function", ("optional_param", "      null")), ("null_function", {"optional_param": None})),
    ("keeps_an_empty_string_parameter", f"{LC} Qwen3-Coder, empty parameter",
     "<tool_call>\n  <function=write_file>\n    <parameter=path>\n    </parameter>\n  </function>\n"
     "</tool_call>", ("write_file", {"path": ""})),
    ("keeps_xml_like_content_of_a_string_verbatim", f"{LC} Qwen3-Coder, XML-like content in parameters",
     qwen("write_file", ("path", "      <root><item>value</item></root>")),
     ("write_file", {"path": "<root><item>value</item></root>"})),
    ("keeps_quotes_in_a_string_verbatim", f"{LC} Qwen3-Coder, quotes and escape characters",
     qwen("write_file", ("path", '      She said "Hello!" and left.')),
     ("write_file", {"path": 'She said "Hello!" and left.'})),
    ("keeps_the_indentation_of_multiline_code", f"{LC} Qwen3-Coder, multiline content",
     qwen("write_file", ("path", "a.py"), ("content", 'def hello():\n    print("Hello!")\n    return True')),
     ("write_file", {"path": "a.py", "content": 'def hello():\n    print("Hello!")\n    return True'})),
    ("keeps_tabs_and_inner_spaces", f"{LC} Qwen3-Coder, tabs and mixed whitespace",
     qwen("write_file", ("path", "a"), ("content", "line1\n\tindented line\n    spaces")),
     ("write_file", {"path": "a", "content": "line1\n\tindented line\n    spaces"})),
    ("reads_an_unclosed_parameter_up_to_the_end_of_its_function",
     f"{LC} peg parsers, Nemotron-3-Nano, no </parameter>",
     '<tool_call>\n<function=python>\n<parameter=code>\ndef hello():\n    print("Hello, world!")\n\nhello()\n'
     "</function>\n</tool_call>",
     ("python", {"code": 'def hello():\n    print("Hello, world!")\n\nhello()'})),
    ("reads_union_types_by_the_first_type_that_fits", f"{LC} Qwen3-Coder union/anyOf tool",
     qwen("qwen_union", ("priority", "2.5"), ("maybe_text", "42"), ("config", "null")),
     ("qwen_union", {"priority": 2.5, "maybe_text": "42", "config": None})),
    ("keeps_a_parameter_the_schema_does_not_declare_as_text", "VL qwen3coder _convert_param_value",
     qwen("get_weather", ("city", "Paris"), ("country", "33")),
     ("get_weather", {"city": "Paris", "country": "33"})),
    ("types_glm_values_too", f"{LC} GLM-4.6, web_search streaming case",
     "<tool_call>write_file\n<arg_key>path</arg_key>\n<arg_value>\"From Zero\" tracklist</arg_value>\n"
     "<arg_key>ratio</arg_key>\n<arg_value>3</arg_value>\n</tool_call>",
     ("write_file", {"path": '"From Zero" tracklist', "ratio": 3})),
    ("accepts_a_glm_value_left_open_before_the_next_key", "GLM 4.7 prompt examples omit </arg_value>",
     "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris<arg_key>days</arg_key><arg_value>2"
     "</arg_value></tool_call>", ("get_weather", {"city": "Paris", "days": 2})),
    ("types_minimax_parameters", f"{LC} MiniMax-M2, optional parameters",
     '<minimax:tool_call><invoke name="special_function_with_opt"><parameter name="arg1">1</parameter>'
     '<parameter name="arg2">2</parameter></invoke></minimax:tool_call>',
     ("special_function_with_opt", {"arg1": 1, "arg2": 2})),
]  # fmt: skip


@pytest.mark.parametrize(
    ("source", "reply", "call"), [case[1:] for case in TYPED], ids=[case[0] for case in TYPED]
)
def test_text_values_are_typed_by_the_schema(
    source: str, reply: str, call: tuple[str, dict[str, Any]]
) -> None:
    outcome = parse(reply)
    assert outcome.problems == (), source
    assert calls_of(outcome) == [call], source


@pytest.mark.parametrize(
    ("reply", "message"),
    [(qwen("complex_function", ("name", "x"), ("age", "thirty"), ("active", "true"), ("score", "1")),
      "complex_function: $.arguments.age: expected integer, got string"),
     (qwen("complex_function", ("name", "x"), ("age", "3"), ("active", "yes"), ("score", "1")),
      "complex_function: $.arguments.active: expected boolean, got string"),
     (qwen("write_file", ("path", "a"), ("config", "{not json")),
      "write_file: $.arguments.config: expected object, got string")],
    ids=["an_integer_that_is_a_word", "a_boolean_that_is_yes", "an_object_that_is_not_json"],
)  # fmt: skip
def test_a_value_that_does_not_convert_is_invalid_arguments(reply: str, message: str) -> None:
    [problem] = parse(reply).problems
    assert problem.kind is ProblemKind.INVALID_ARGUMENTS and problem.resembled is CallFormat.QWEN3_CODER
    assert problem.message == message


@pytest.mark.parametrize(
    ("text", "schema", "value"),
    [("\n  12\n", {"type": "integer"}, 12), ("12.0", {"type": "integer"}, "12.0"),
     ("nan", {"type": "number"}, "nan"), ("1_000", {"type": "number"}, "1_000"),
     ("True", {"type": "boolean"}, True), ("None", {"type": "null"}, None),
     ("null", {"type": "string"}, "null"), ("7", {"enum": [1, 7]}, 7), ("a", {"enum": ["a", "b"]}, "a"),
     ("{'a': 1,}", {"type": "object"}, {"a": 1}), ("[1, 2]", {"type": "object"}, "[1, 2]"),
     ("", {"type": "array"}, ""), ("x", None, "x")],
    ids=["integer", "a_float_is_not_an_integer", "nan_is_not_a_number", "no_underscored_numbers",
         "python_true", "python_none", "null_stays_text_for_a_string", "enum_of_numbers", "enum_of_strings",
         "near_json_object_is_repaired", "an_array_is_not_an_object", "empty_text_is_not_an_array",
         "undeclared_parameter"],
)  # fmt: skip
def test_value_from_text(text: str, schema: dict[str, Any] | None, value: Any) -> None:
    assert value_from_text(text, schema) == value


@settings(max_examples=300, deadline=None)
@given(
    st.text(max_size=80),
    st.sampled_from(["string", "integer", "number", "boolean", "object", "array", "null"]),
)
def test_value_from_text_never_raises(text: str, kind: str) -> None:
    value_from_text(text, {"type": kind})
    assert isinstance(trim_block(text), str)


def test_trim_block_drops_only_the_layout_around_a_value() -> None:
    assert trim_block("\n      John Doe\n    ") == "John Doe"
    assert trim_block("\n  a\n  b\n  ") == "  a\n  b"
    assert trim_block("  \n  ") == ""
