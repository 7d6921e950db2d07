"""Reading a TOML or YAML document while keeping line numbers for error messages.

Owns `read_document`: the parsed data plus a `Lines` index that answers "which
line wrote this key path" (`("rules", 2, "decision")`). tomllib keeps no
positions, so for TOML the index is a best-effort scan of headers and keys
(the N-th `[[rules]]` header is rules[N]); YAML's composed node tree has exact
marks. Syntax errors become PolicyError with the parser's own line.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from typing import Any

import yaml

from bastion.supervisor.errors import PolicyError

KeyPath = tuple[str | int, ...]
YAML_SUFFIXES = (".yaml", ".yml")


class Lines:
    def __init__(self, file: str, exact: Mapping[KeyPath, int] | None = None, toml_text: str = "") -> None:
        self.file = file
        self._exact = dict(exact or {})
        self._toml = toml_text.splitlines()

    def line(self, path: KeyPath) -> int | None:
        """The line of `path`, else of its nearest enclosing key that has one."""
        for end in range(len(path), 0, -1):
            found = self._exact.get(path[:end]) if self._exact else _toml_line(self._toml, path[:end])
            if found:
                return found
        return None

    def where(self, path: KeyPath = ()) -> str:
        line = self.line(path) if path else None
        return f"{self.file}:{line}" if line else self.file


def read_document(file: str, text: str) -> tuple[Any, Lines]:
    if file.endswith(YAML_SUFFIXES):
        return _read_yaml(file, text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"at line (\d+)", str(exc))
        where = f"{file}:{found.group(1)}" if found else file
        raise PolicyError(f"{where}: invalid TOML: {exc}") from exc
    return data, Lines(file, toml_text=text)


def _read_yaml(file: str, text: str) -> tuple[Any, Lines]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark is not None else file
        raise PolicyError(f"{where}: invalid YAML: {exc}") from exc
    lines: dict[KeyPath, int] = {}
    if node is not None:
        _index_yaml(node, (), lines)
    return ({} if data is None else data), Lines(file, exact=lines)


def _index_yaml(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*path, str(key.value))
            lines[child] = key.start_mark.line + 1
            _index_yaml(value, child, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*path, index)] = item.start_mark.line + 1
            _index_yaml(item, (*path, index), lines)


_HEADER = re.compile(r"^\s*\[")


def _toml_line(lines: list[str], path: KeyPath) -> int | None:
    """Top-level keys before the first header; `(name, N, key…)` inside the N-th `[[name]]`."""
    if len(path) >= 2 and isinstance(path[1], int):
        header = re.compile(rf"^\s*\[\[\s*{re.escape(str(path[0]))}\s*\]\]")
        starts = [i for i, line in enumerate(lines) if header.match(line)]
        if path[1] >= len(starts):
            return None
        start = starts[path[1]]
        if len(path) == 2:
            return start + 1
        return _key_line(lines, start + 1, str(path[2])) or start + 1
    return _key_line(lines, 0, str(path[0]))


def _key_line(lines: list[str], start: int, key: str) -> int | None:
    assignment = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
    for i in range(start, len(lines)):
        if _HEADER.match(lines[i]):
            return None
        if assignment.match(lines[i]):
            return i + 1
    return None
