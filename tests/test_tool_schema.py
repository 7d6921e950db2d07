"""The JSON-Schema subset tool parameters use: what it enforces, how it says so, what it refuses."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.supervisor.errors import SupervisorError, ToolSchemaError
from bastion.supervisor.tools.schema import check_schema, validate

ARGS = {
    "type": "object",
    "properties": {
        "expression": {"type": "string", "minLength": 1, "maxLength": 10},
        "count": {"type": "integer", "minimum": 1, "maximum": 5},
        "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "mode": {"enum": ["fast", "slow"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2},
        "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "maybe": {"type": ["string", "null"]},
    },
    "required": ["expression"],
    "additionalProperties": False,
}


def test_conforming_arguments_have_no_errors() -> None:
    instance = {"expression": "1+1", "count": 2, "ratio": 0.5, "mode": "fast", "tags": ["a"], "code": "ABC",
                "maybe": None}  # fmt: skip
    assert validate(instance, ARGS) == []


def test_type_error_names_the_json_path() -> None:
    assert validate({"expression": 5}, ARGS, "$.arguments") == [
        "$.arguments.expression: expected string, got number"
    ]


def test_missing_required_property_is_named() -> None:
    assert validate({}, ARGS) == ["$.expression: required property is missing"]


def test_unexpected_property_lists_the_allowed_ones() -> None:
    [error] = validate({"expression": "1", "colour": "red"}, ARGS)
    assert error.startswith("$.colour: unexpected property (allowed: expression, count")


def test_additional_properties_may_be_a_schema() -> None:
    schema = {"type": "object", "additionalProperties": {"type": "integer"}}
    assert validate({"a": 1, "b": "x"}, schema) == ["$.b: expected integer, got string"]


@pytest.mark.parametrize(
    ("value", "ok"), [(2, True), (2.0, True), (2.5, False), (True, False), ("2", False), (None, False)]
)
def test_integer_is_a_whole_json_number_and_never_a_boolean(value: Any, ok: bool) -> None:
    assert (validate(value, {"type": "integer"}) == []) is ok


@pytest.mark.parametrize(("value", "ok"), [(2, True), (2.5, True), (False, False), ("2.5", False)])
def test_number_accepts_ints_and_floats_but_not_booleans(value: Any, ok: bool) -> None:
    assert (validate(value, {"type": "number"}) == []) is ok


def test_a_list_of_types_accepts_any_of_them() -> None:
    schema = {"type": ["string", "null"]}
    assert validate(None, schema) == validate("x", schema) == []
    assert validate(1, schema) == ["$: expected string or null, got number"]


@pytest.mark.parametrize(
    ("instance", "message"),
    [
        ({"expression": ""}, "$.expression: must be at least 1 character(s) long"),
        ({"expression": "x" * 11}, "$.expression: must be at most 10 character(s) long"),
        ({"expression": "1", "count": 0}, "$.count: must be >= 1, got 0"),
        ({"expression": "1", "count": 6}, "$.count: must be <= 5, got 6"),
        ({"expression": "1", "ratio": 0}, "$.ratio: must be > 0, got 0"),
        ({"expression": "1", "ratio": 1.0}, "$.ratio: must be < 1, got 1.0"),
        ({"expression": "1", "mode": "medium"}, '$.mode: must be one of "fast", "slow"'),
        ({"expression": "1", "tags": []}, "$.tags: needs at least 1 item(s), got 0"),
        ({"expression": "1", "tags": ["a", "b", "c"]}, "$.tags: allows at most 2 item(s), got 3"),
        ({"expression": "1", "tags": ["a", 7]}, "$.tags[1]: expected string, got number"),
        ({"expression": "1", "code": "abc"}, "$.code: must match the pattern '^[A-Z]{3}$'"),
    ],
)
def test_each_constraint_reports_where_and_what(instance: dict[str, Any], message: str) -> None:
    assert validate(instance, ARGS) == [message]


def test_enum_and_const_compare_as_json_does() -> None:
    assert validate(True, {"enum": [1, 2]}) == ["$: must be one of 1, 2"]
    assert validate(1.0, {"enum": [1, 2]}) == []
    assert validate(1, {"const": True}) == ["$: must be true"]
    assert validate({"a": [1]}, {"const": {"a": [1]}}) == []


def test_all_errors_are_listed_not_just_the_first() -> None:
    assert len(validate({"count": "x", "mode": "?"}, ARGS)) == 3


def test_odd_property_names_are_quoted_in_the_path() -> None:
    schema = {"type": "object", "properties": {"a b": {"type": "string"}}}
    assert validate({"a b": 1}, schema) == ['$["a b"]: expected string, got number']


def test_any_of_needs_one_match_and_one_of_exactly_one() -> None:
    any_of = {"anyOf": [{"type": "string"}, {"type": "integer"}]}
    assert validate("x", any_of) == validate(3, any_of) == []
    assert validate(1.5, any_of) == [
        "$: matches none of the anyOf alternatives ($: expected string, got number)"
    ]
    one_of = {"oneOf": [{"type": "number"}, {"type": "integer"}]}
    assert validate(1.5, one_of) == []
    assert validate(2, one_of) == ["$: matches 2 of the oneOf alternatives, expected exactly one"]


def test_the_supported_subset_passes_check_schema() -> None:
    check_schema(ARGS)
    check_schema({"type": "object", "title": "t", "description": "d", "properties": {"x": {"default": 1}}})
    check_schema({"anyOf": [{"type": "string"}, {"const": 3}]})


@pytest.mark.parametrize(
    ("schema", "complaint"),
    [
        ({"$ref": "#/defs/x"}, "unsupported schema keyword(s) $ref"),
        ({"allOf": [{"type": "string"}]}, "unsupported schema keyword(s) allOf"),
        ({"type": "string", "format": "email"}, "unsupported schema keyword(s) format"),
        ({"type": "object", "properties": {"p": {"patternProperties": {}}}}, "$.properties.p: unsupported"),
        ({"type": "strnig"}, "$.type: must be one of"),
        ({"type": "number", "exclusiveMinimum": True}, "$.exclusiveMinimum: must be a number"),
        ({"type": "string", "pattern": "("}, "$.pattern: not a valid regular expression"),
        ({"type": "array", "items": [{"type": "string"}]}, "$.items: a schema must be an object"),
        ({"required": "name"}, "$.required: must be a list"),
        ({"maxLength": -1}, "$.maxLength: must be a non-negative integer"),
        ({"enum": []}, "$.enum: must be a non-empty list"),
        ("object", "a schema must be an object"),
    ],
)
def test_check_schema_refuses_what_validate_would_not_enforce(schema: Any, complaint: str) -> None:
    with pytest.raises(ToolSchemaError, match=None) as caught:
        check_schema(schema)
    assert complaint in str(caught.value)
    assert isinstance(caught.value, SupervisorError)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@given(_JSON)
def test_validate_never_raises_and_always_returns_messages(instance: Any) -> None:
    errors = validate(instance, ARGS, "$.arguments")
    assert all(isinstance(error, str) and error.startswith("$.arguments") for error in errors)


def test_absurd_nesting_is_reported_not_recursed_into() -> None:
    schema: dict[str, Any] = {"type": "array"}
    schema["items"] = schema  # a cycle stands in for arbitrarily deep arguments
    instance: list[Any] = []
    for _ in range(100):
        instance = [instance]
    assert any("nested too deeply" in error for error in validate(instance, schema))
