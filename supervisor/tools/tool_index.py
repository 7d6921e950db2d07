"""The run's tools as the call parser asks about them.

Owns `ToolIndex`: finding a tool by the name a model wrote (another case, or
namespaced like `functions.clock`), the schema of one of its parameters (for
formats whose argument values are bare text), the order positional arguments
take, and which tool takes a block of raw code (Llama 3.1's and Functionary's
`python` tool). It only reads the registry's `ToolSpec`s.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from bastion.supervisor.tools.registry import ToolSpec

# Tools that Llama 3.1 and Functionary call with a bare block of code instead of JSON.
_CODE_TOOLS = ("python", "ipython", "code_interpreter")


class ToolIndex:
    def __init__(self, tools: Mapping[str, ToolSpec]) -> None:
        self.tools = tools

    def lookup(self, name: str) -> ToolSpec | None:
        if name in self.tools:
            return self.tools[name]
        # "functions.clock" (OpenAI-style namespacing) and "Clock" both mean clock.
        bare = name.strip().rsplit(".", 1)[-1].lower()
        matches = [spec for key, spec in self.tools.items() if key.lower() == bare]
        return matches[0] if len(matches) == 1 else None

    def knows(self, name: str) -> bool:
        return self.lookup(name) is not None

    def parameter_schema(self, tool: str, parameter: str) -> Mapping[str, Any] | None:
        """The schema of `parameter` of `tool`, or None when either is unknown."""
        spec = self.lookup(tool)
        schema = spec.parameters.get("properties", {}).get(parameter) if spec is not None else None
        return schema if isinstance(schema, Mapping) else None

    def positional_names(self, name: str) -> list[str]:
        """Parameter names in the order positional arguments fill them: required ones first."""
        spec = self.lookup(name)
        if spec is None:
            return []
        properties = list(spec.parameters.get("properties", {}))
        required = [p for p in spec.parameters.get("required", []) if p in properties]
        return required + [p for p in properties if p not in required]

    def code_parameter(self, name: str | None = None) -> tuple[str, str] | None:
        """(tool, parameter) for a raw block of code: the named tool, or the first code tool there is,
        when it takes a string `code` argument."""
        for candidate in (name,) if name is not None else _CODE_TOOLS:
            schema = self.parameter_schema(candidate, "code")
            spec = self.lookup(candidate)
            if spec is not None and schema is not None and schema.get("type", "string") == "string":
                return spec.name, "code"
        return None

    def names(self) -> list[str]:
        return list(self.tools)

    def close_match(self, name: str) -> str | None:
        close = difflib.get_close_matches(name, self.names(), n=1)
        return close[0] if close else None
