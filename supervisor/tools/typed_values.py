"""Argument values written as bare text, typed by the tool's JSON schema.

Qwen3-Coder, Seed-OSS, GLM and MiniMax write each argument as the text
between two tags (`<parameter=limit>\n3\n</parameter>`), so the text alone does
not say whether `3` is a number or a string: the parameter's schema does.
Owns `value_from_text`: a string-typed parameter keeps the text verbatim
(only the line breaks that pretty-printing put around it are dropped);
integer, number, boolean and null are read from the trimmed text; object and
array are read as JSON (near-JSON repaired). A parameter whose schema allows
several types takes the first non-string type the text reads as, else the
string. Text that reads as none of the allowed types is returned as it is,
so schema validation reports it as an invalid argument, naming the parameter;
nothing here raises, and nothing is evaluated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from bastion.supervisor.tools.near_json import decode_values

_INTEGER = re.compile(r"[-+]?\d+")
_NON_STRING_ORDER = ("null", "boolean", "integer", "number", "object", "array")
_BOOLEANS = {"true": True, "false": False}
_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}


def value_from_text(text: str, schema: Mapping[str, Any] | None) -> Any:
    """The value `text` stands for under `schema`; a parameter the tool does not declare stays text."""
    kinds = _allowed_types(schema) if schema is not None else {"string"}
    trimmed = text.strip()
    for kind in _NON_STRING_ORDER:
        if kind in kinds and (value := _read(kind, trimmed)) is not _UNREADABLE:
            return value
    return trim_block(text) if "string" in kinds else trimmed


def trim_block(text: str) -> str:
    """The text between two tags without the layout around it: a blank first and last line go, and
    a one-line value loses its surrounding spaces; inner lines keep their indentation (it may be code)."""
    if not text.strip():
        return ""
    lines = text.split("\n")
    if len(lines) > 1 and not lines[0].strip():
        lines = lines[1:]
    if len(lines) > 1 and not lines[-1].strip():
        lines = lines[:-1]
    return lines[0].strip() if len(lines) == 1 else "\n".join(lines).rstrip("\r")


_UNREADABLE = object()


def _read(kind: str, text: str) -> Any:
    lowered = text.lower()
    if kind == "null":
        return None if lowered in ("null", "none") else _UNREADABLE
    if kind == "boolean":
        return _BOOLEANS.get(lowered, _UNREADABLE)
    if kind == "integer":
        return int(text) if _INTEGER.fullmatch(text) else _UNREADABLE
    if kind == "number":
        return _number(text)
    decoded = decode_values(text) if text.startswith(("{", "[")) else "not JSON"
    if isinstance(decoded, str) or len(decoded[0]) != 1:
        return _UNREADABLE
    value = decoded[0][0]
    wanted = dict if kind == "object" else list
    return value if isinstance(value, wanted) else _UNREADABLE


def _number(text: str) -> Any:
    if _INTEGER.fullmatch(text):
        return int(text)
    try:
        value = float(text)
    except ValueError:
        return _UNREADABLE
    return value if math.isfinite(value) and "_" not in text else _UNREADABLE


def _allowed_types(schema: Mapping[str, Any]) -> set[str]:
    """Every JSON type `schema` admits, looking into anyOf/oneOf and enum; untyped means text."""
    kinds: set[str] = set()
    declared = schema.get("type")
    if isinstance(declared, str):
        kinds.add(declared)
    elif isinstance(declared, list):
        kinds.update(kind for kind in declared if isinstance(kind, str))
    for key in ("anyOf", "oneOf"):
        for alternative in schema.get(key, ()):
            if isinstance(alternative, Mapping):
                kinds |= _allowed_types(alternative)
    if not kinds and isinstance(schema.get("enum"), list):
        kinds.update(_JSON_TYPES.get(type(option), "object") for option in schema["enum"])
    if "const" in schema and not kinds:
        kinds.add(_JSON_TYPES.get(type(schema["const"]), "object"))
    return kinds or {"string"}
