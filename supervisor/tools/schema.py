"""The JSON-Schema subset that tool parameters are written in, and checking arguments against it.

Owns two things: `check_schema`, which refuses a schema using any keyword this
module does not enforce (a tool must not be registered with a schema we would
only half-validate), and `validate`, which lists every way an argument value
breaks a schema, each message naming the JSON path (`$.arguments.expression:
expected string, got number`) so a model can be told exactly what to fix.

Supported: type (string, number, integer, boolean, object, array, null, or a
list of them), properties, required, additionalProperties (bool or schema),
enum, const, items (one schema), minItems/maxItems, minimum/maximum,
exclusiveMinimum/exclusiveMaximum (numbers, draft 6+), minLength/maxLength,
pattern, anyOf/oneOf; annotations (title, description, default, examples,
$schema) are accepted and ignored. Not supported, and so refused: $ref,
allOf, not, if/then/else, patternProperties, format, dependencies and the rest.

It knows nothing of tools or models; `registry.py` and `calls.py` use it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from bastion.supervisor.errors import ToolSchemaError

_TYPES = ("string", "number", "integer", "boolean", "object", "array", "null")
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$comment"})
_NUMBER_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_COUNT_KEYS = ("minItems", "maxItems", "minLength", "maxLength")
_ASSERTIONS = frozenset(
    {"type", "properties", "required", "additionalProperties", "enum", "const", "items", "pattern",
     "anyOf", "oneOf", *_NUMBER_KEYS, *_COUNT_KEYS}
)  # fmt: skip
# A model may produce arbitrarily deep nesting; past this depth we stop and say so.
_MAX_DEPTH = 32


def check_schema(schema: Any, path: str = "$") -> None:
    """Raise ToolSchemaError unless every keyword in `schema` is one `validate` enforces."""
    if not isinstance(schema, Mapping):
        raise ToolSchemaError(f"{path}: a schema must be an object, got {_json_type(schema)}")
    unknown = sorted(set(schema) - _ASSERTIONS - _ANNOTATIONS)
    if unknown:
        raise ToolSchemaError(
            f"{path}: unsupported schema keyword(s) {', '.join(unknown)}; "
            f"supported: {', '.join(sorted(_ASSERTIONS))}"
        )
    for key, value in schema.items():
        checker = _KEYWORD_CHECKS.get(key)
        if checker is not None:
            checker(value, f"{path}.{key}")


def _check_type(value: Any, path: str) -> None:
    names = value if isinstance(value, list) else [value]
    if not names or any(name not in _TYPES for name in names):
        raise ToolSchemaError(f"{path}: must be one of {', '.join(_TYPES)} (or a non-empty list of them)")


def _check_properties(value: Any, path: str) -> None:
    if not isinstance(value, Mapping):
        raise ToolSchemaError(f"{path}: must be an object of schemas")
    for name, sub in value.items():
        check_schema(sub, _join(path, name))


def _check_required(value: Any, path: str) -> None:
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise ToolSchemaError(f"{path}: must be a list of property names")


def _check_additional(value: Any, path: str) -> None:
    if not isinstance(value, bool):
        check_schema(value, path)


def _check_enum(value: Any, path: str) -> None:
    if not isinstance(value, list) or not value:
        raise ToolSchemaError(f"{path}: must be a non-empty list")


def _check_pattern(value: Any, path: str) -> None:
    if not isinstance(value, str):
        raise ToolSchemaError(f"{path}: must be a string")
    try:
        re.compile(value)
    except re.error as exc:
        raise ToolSchemaError(f"{path}: not a valid regular expression ({exc})") from exc


def _check_alternatives(value: Any, path: str) -> None:
    if not isinstance(value, list) or not value:
        raise ToolSchemaError(f"{path}: must be a non-empty list of schemas")
    for index, sub in enumerate(value):
        check_schema(sub, f"{path}[{index}]")


def _check_number(value: Any, path: str) -> None:
    # Draft 4's boolean exclusiveMinimum would be silently misread as a bound of 0 or 1.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ToolSchemaError(f"{path}: must be a number")


def _check_count(value: Any, path: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ToolSchemaError(f"{path}: must be a non-negative integer")


_KEYWORD_CHECKS: dict[str, Callable[[Any, str], None]] = {
    "type": _check_type,
    "properties": _check_properties,
    "required": _check_required,
    "additionalProperties": _check_additional,
    "enum": _check_enum,
    "items": check_schema,
    "pattern": _check_pattern,
    "anyOf": _check_alternatives,
    "oneOf": _check_alternatives,
    **{key: _check_number for key in _NUMBER_KEYS},
    **{key: _check_count for key in _COUNT_KEYS},
}


def validate(instance: Any, schema: Mapping[str, Any], path: str = "$") -> list[str]:
    """Every way `instance` breaks `schema` (a schema `check_schema` accepts); empty when it conforms."""
    errors: list[str] = []
    _validate(instance, schema, path, errors, 0)
    return errors


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, as messages say it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _validate(instance: Any, schema: Mapping[str, Any], path: str, errors: list[str], depth: int) -> None:
    if depth > _MAX_DEPTH:
        errors.append(f"{path}: nested too deeply")
        return
    if "type" in schema and not _type_matches(instance, schema["type"]):
        expected = schema["type"] if isinstance(schema["type"], str) else " or ".join(schema["type"])
        errors.append(f"{path}: expected {expected}, got {_kind(instance)}")
        return  # the other keywords would only repeat the same mistake
    if "enum" in schema and not any(_json_equal(instance, option) for option in schema["enum"]):
        errors.append(f"{path}: must be one of {', '.join(_show(option) for option in schema['enum'])}")
    if "const" in schema and not _json_equal(instance, schema["const"]):
        errors.append(f"{path}: must be {_show(schema['const'])}")
    if isinstance(instance, Mapping):
        _validate_object(instance, schema, path, errors, depth)
    elif isinstance(instance, list):
        _validate_array(instance, schema, path, errors, depth)
    elif isinstance(instance, str):
        _validate_string(instance, schema, path, errors)
    elif isinstance(instance, int | float) and not isinstance(instance, bool):
        _validate_number(instance, schema, path, errors)
    for keyword in ("anyOf", "oneOf"):
        if keyword in schema:
            _validate_alternatives(instance, schema[keyword], keyword, path, errors, depth)


def _validate_object(
    instance: Mapping[str, Any], schema: Mapping[str, Any], path: str, errors: list[str], depth: int
) -> None:
    properties = schema.get("properties", {})
    for name in schema.get("required", ()):
        if name not in instance:
            errors.append(f"{_join(path, name)}: required property is missing")
    additional = schema.get("additionalProperties", True)
    for name, value in instance.items():
        where = _join(path, str(name))
        if name in properties:
            _validate(value, properties[name], where, errors, depth + 1)
        elif additional is False:
            allowed = ", ".join(properties) or "none"
            errors.append(f"{where}: unexpected property (allowed: {allowed})")
        elif isinstance(additional, Mapping):
            _validate(value, additional, where, errors, depth + 1)


def _validate_array(
    instance: list[Any], schema: Mapping[str, Any], path: str, errors: list[str], depth: int
) -> None:
    if "minItems" in schema and len(instance) < schema["minItems"]:
        errors.append(f"{path}: needs at least {schema['minItems']} item(s), got {len(instance)}")
    if "maxItems" in schema and len(instance) > schema["maxItems"]:
        errors.append(f"{path}: allows at most {schema['maxItems']} item(s), got {len(instance)}")
    if "items" in schema:
        for index, item in enumerate(instance):
            _validate(item, schema["items"], f"{path}[{index}]", errors, depth + 1)


def _validate_string(instance: str, schema: Mapping[str, Any], path: str, errors: list[str]) -> None:
    if "minLength" in schema and len(instance) < schema["minLength"]:
        errors.append(f"{path}: must be at least {schema['minLength']} character(s) long")
    if "maxLength" in schema and len(instance) > schema["maxLength"]:
        errors.append(f"{path}: must be at most {schema['maxLength']} character(s) long")
    if "pattern" in schema and re.search(schema["pattern"], instance) is None:
        errors.append(f"{path}: must match the pattern {schema['pattern']!r}")


def _validate_number(instance: float, schema: Mapping[str, Any], path: str, errors: list[str]) -> None:
    if isinstance(instance, float) and not math.isfinite(instance):
        errors.append(f"{path}: must be a finite number")
        return
    bounds = (
        ("minimum", lambda bound: instance >= bound, ">="),
        ("maximum", lambda bound: instance <= bound, "<="),
        ("exclusiveMinimum", lambda bound: instance > bound, ">"),
        ("exclusiveMaximum", lambda bound: instance < bound, "<"),
    )
    for keyword, holds, relation in bounds:
        if keyword in schema and not holds(schema[keyword]):
            errors.append(f"{path}: must be {relation} {_show(schema[keyword])}, got {_show(instance)}")


def _validate_alternatives(
    instance: Any, alternatives: list[Any], keyword: str, path: str, errors: list[str], depth: int
) -> None:
    failures = [_validate_at(instance, option, path, depth + 1) for option in alternatives]
    matched = sum(1 for failure in failures if not failure)
    if matched == 0:
        # The first alternative's complaint is usually the one a model can act on.
        errors.append(f"{path}: matches none of the {keyword} alternatives ({failures[0][0]})")
    elif keyword == "oneOf" and matched > 1:
        errors.append(f"{path}: matches {matched} of the oneOf alternatives, expected exactly one")


def _validate_at(instance: Any, schema: Mapping[str, Any], path: str, depth: int) -> list[str]:
    errors: list[str] = []
    _validate(instance, schema, path, errors, depth)
    return errors


def _type_matches(instance: Any, expected: str | list[str]) -> bool:
    names = [expected] if isinstance(expected, str) else expected
    return any(_is_type(instance, name) for name in names)


def _is_type(instance: Any, name: str) -> bool:
    if name == "integer":
        # JSON has one number type: 2.0 is an integer, True is not.
        if isinstance(instance, bool):
            return False
        return isinstance(instance, int) or (isinstance(instance, float) and instance.is_integer())
    if name == "number":
        return isinstance(instance, int | float) and not isinstance(instance, bool)
    return _json_type(instance) == name


def _kind(instance: Any) -> str:
    # Messages say "number" for every JSON number, as a model reading them thinks of it.
    kind = _json_type(instance)
    return "number" if kind == "integer" else kind


def _json_equal(left: Any, right: Any) -> bool:
    """Equality as JSON means it: True is not 1, 1 is 1.0, order matters in arrays only."""
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool) and left == right
    if isinstance(left, Mapping) and isinstance(right, Mapping):
        return left.keys() == right.keys() and all(_json_equal(left[key], right[key]) for key in left)
    if isinstance(left, list | tuple) and isinstance(right, list | tuple):
        return len(left) == len(right) and all(_json_equal(a, b) for a, b in zip(left, right))
    if isinstance(left, int | float) and isinstance(right, int | float):
        return left == right
    return type(left) is type(right) and left == right


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if name.isidentifier() else f'{path}["{name}"]'


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value)
