"""The JSON schema of "one call of one of these tools", for constrained decoding.

A call is an object naming the tool and carrying its arguments:
`{"name": <one tool's name>, "<arguments key>": <that tool's parameters>}`, one
alternative per tool (`anyOf`), with the name as a constant so the arguments'
schema follows from it. The arguments key is what the model's own call syntax
uses (`arguments` for most, `parameters` for Llama 3.1's JSON calls). The
worker turns this schema into a grammar; a value it admits is a call the
parser reads and the schema checker accepts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bastion.supervisor.tools.registry import ToolSpec


def call_schema(tools: Sequence[ToolSpec], *, arguments_key: str = "arguments") -> dict[str, Any]:
    """The schema of one call of any of `tools` (at least one)."""
    alternatives = [
        {
            "type": "object",
            "properties": {"name": {"const": spec.name}, arguments_key: spec.parameters},
            "required": ["name", arguments_key],
            "additionalProperties": False,
        }
        for spec in tools
    ]
    return alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
