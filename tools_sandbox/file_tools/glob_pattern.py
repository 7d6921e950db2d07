"""Glob patterns over workspace-relative paths: `*`, `?`, `[…]` within one
component, `**` for any number of directories.

Owns matching only (the glob tool walks, grep filters). As Python's glob does,
a wildcard or `**` never matches a name starting with `.` unless the pattern's
component starts with `.` itself, so `**/*.py` stays out of `.git` and `.venv`.
"""

from __future__ import annotations

import fnmatch
import re


class GlobPattern:
    """A parsed pattern: its components, `**` kept as is."""

    def __init__(self, pattern: str) -> None:
        components: list[str] = []
        for part in pattern.split("/"):
            if part in ("", "."):
                continue
            if part == "**" and components and components[-1] == "**":
                continue  # a/**/**/b is a/**/b
            components.append(part)
        self.components = components
        self._regexes = {c: re.compile(fnmatch.translate(c)) for c in components if c != "**"}

    def _component(self, component: str, name: str) -> bool:
        if name.startswith(".") and not component.startswith("."):
            return False
        return self._regexes[component].match(name) is not None

    def match(self, parts: list[str]) -> bool:
        """Whether the path (as components) matches the whole pattern."""
        return self._match(parts, 0, 0)

    def could_match_below(self, parts: list[str]) -> bool:
        """Whether some path strictly beneath directory `parts` could match."""
        return self._below(parts, 0, 0)

    def _match(self, parts: list[str], i: int, j: int) -> bool:
        if j == len(self.components):
            return i == len(parts)
        if self.components[j] == "**":
            while True:
                if self._match(parts, i, j + 1):
                    return True
                if i == len(parts) or parts[i].startswith("."):
                    return False
                i += 1
        return (
            i < len(parts)
            and self._component(self.components[j], parts[i])
            and self._match(parts, i + 1, j + 1)
        )

    def _below(self, parts: list[str], i: int, j: int) -> bool:
        if i == len(parts):
            return j < len(self.components)
        if j == len(self.components):
            return False
        if self.components[j] == "**":
            if self._below(parts, i, j + 1):
                return True
            return not parts[i].startswith(".") and self._below(parts, i + 1, j)
        return self._component(self.components[j], parts[i]) and self._below(parts, i + 1, j + 1)
