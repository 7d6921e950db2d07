"""Reading policy files: the format, includes, and validation that names file and line.

The format (TOML; a `.yaml`/`.yml` file is read as YAML with the same keys):

    default = "ask"                  # allow | deny | ask when no rule matches (unset anywhere: ask)
    include = ["team.toml", "bundled:default_policy.toml"]
    protected = ["secrets/**"]       # more workspace paths denied unless a rule names them

    [[rules]]
    decision = "allow"               # allow | deny | ask
    tools = ["shell"]                # globs over tool names
    commands = ["git status", "ls"]  # shell only: argv patterns (see patterns.py)
    paths = ["src/**"]               # file tools only: workspace-relative globs
    note = "why the rule exists"     # optional, shown with its decisions

An include is relative to the file naming it; `bundled:NAME` is a file shipped
in `bastion.configs`. Included rules come first; a file's own `default` wins
over its includes'; `protected` lists add up. Including a file twice is fine,
including one's own includer is a cycle and an error. Unknown keys and unknown
decisions are refused. What the rules mean is `engine.py`'s business.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from bastion.protocol.agent_events import ToolDecisionKind
from bastion.protocol.tool_catalog import FILE_TOOLS
from bastion.supervisor.errors import PolicyError
from bastion.supervisor.trust.policy.locate import KeyPath, Lines, read_document
from bastion.supervisor.trust.policy.model import PolicySpec, ProtectedPath, Rule, Source
from bastion.supervisor.trust.policy.patterns import CommandPattern, PathPattern, tool_matches

BUNDLED_PREFIX = "bundled:"
DEFAULT_POLICY = "default_policy.toml"
_BUNDLED_PACKAGE = "bastion.configs"

T = TypeVar("T")


class _RawRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    decision: ToolDecisionKind
    tools: list[str]
    commands: list[str] = []
    paths: list[str] = []
    note: str = ""


class _RawFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    default: ToolDecisionKind | None = None
    include: list[str] = []
    protected: list[str] = []
    rules: list[_RawRule] = []


def bundled_path(name: str = DEFAULT_POLICY) -> Path:
    return Path(str(resources.files(_BUNDLED_PACKAGE).joinpath(name)))


def load_policy(path: Path) -> PolicySpec:
    """The effective policy of `path` and everything it includes."""
    loading = _Loading()
    loading.load(Path(path), chain=(), named_at=None)
    default, default_source = loading.default or (ToolDecisionKind.ASK, None)
    return PolicySpec(default=default, default_source=default_source, rules=tuple(loading.rules),
                      protected=tuple(loading.protected), files=tuple(loading.files))


def convert(data: Any, kind: type[T], lines: Lines, prefix: KeyPath = ()) -> T:
    """msgspec.convert, with its complaint turned into `file:line: key.path: problem`."""
    try:
        return msgspec.convert(data, type=kind)
    except msgspec.ValidationError as exc:
        problem, _, at = str(exc).partition(" - at `$")
        path: list[str | int] = list(prefix)
        for name, index in re.findall(r"\.([^.\[`]+)|\[(\d+)\]", at.rstrip("`")):
            path.append(name if name else int(index))
        unknown = re.search(r"unknown field `(.+?)`", problem)
        if unknown:
            path.append(unknown.group(1))
        if "enum value" in problem:
            problem += f" (expected one of: {', '.join(d.value for d in ToolDecisionKind)})"
        raise PolicyError(f"{lines.where(tuple(path))}: {_dotted(tuple(path))}: {problem}") from exc


def _dotted(path: KeyPath) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "(top level)"


class _Loading:
    def __init__(self) -> None:
        self.files: list[str] = []
        self.rules: list[Rule] = []
        self.protected: list[ProtectedPath] = []
        self.default: tuple[ToolDecisionKind, Source] | None = None
        self._seen: set[Path] = set()

    def load(self, path: Path, *, chain: tuple[Path, ...], named_at: Source | None) -> None:
        key = path.resolve()
        if key in chain:
            loop = " -> ".join(str(p) for p in (*chain[chain.index(key):], key))
            raise PolicyError(f"{named_at}: include cycle: {loop}")
        if key in self._seen:
            return
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            where = f"{named_at}: include {path}" if named_at else str(path)
            raise PolicyError(f"{where}: cannot read the policy: {exc}") from exc
        self._seen.add(key)
        file = str(path)
        data, lines = read_document(file, text)
        if not isinstance(data, dict):
            raise PolicyError(f"{file}: a policy is a table of keys (default, include, protected, rules)")
        raw = convert(data, _RawFile, lines)
        self.files.append(file)
        for index, name in enumerate(raw.include):
            self.load(self._include_path(name, path), chain=(*chain, key),
                      named_at=Source(file=file, line=lines.line(("include", index))))
        for index, pattern in enumerate(raw.protected):
            parsed = _path_pattern(pattern, lines, ("protected", index))
            self.protected.append(ProtectedPath(pattern=parsed, core=parsed.literal_segments,
                                                source=Source(file=file, line=lines.line(("protected", index)))))
        self.rules.extend(_rule(rule, index, lines) for index, rule in enumerate(raw.rules))
        if raw.default is not None:
            self.default = (raw.default, Source(file=file, line=lines.line(("default",))))

    @staticmethod
    def _include_path(name: str, including: Path) -> Path:
        if name.startswith(BUNDLED_PREFIX):
            return bundled_path(name[len(BUNDLED_PREFIX) :])
        target = Path(name).expanduser()
        return target if target.is_absolute() else including.parent / target


def _rule(raw: _RawRule, index: int, lines: Lines) -> Rule:
    def fail(key: str, problem: str) -> PolicyError:
        return PolicyError(f"{lines.where(('rules', index, key))}: rules[{index}].{key}: {problem}")

    if not raw.tools or not all(t.strip() for t in raw.tools):
        raise fail("tools", 'name at least one tool, and no empty names (globs such as "read_*" work)')
    if raw.commands and raw.paths:
        raise fail("commands", "a rule gives commands (for the shell) or paths (for file tools), not both")
    if raw.commands and not tool_matches(raw.tools, "shell"):
        raise fail("commands", "commands only apply to the shell tool, which `tools` does not name")
    if raw.paths and not any(tool_matches(raw.tools, tool) for tool in FILE_TOOLS):
        raise fail("paths", f"paths only apply to file tools ({', '.join(sorted(FILE_TOOLS))})")
    commands = []
    for text in raw.commands:
        try:
            commands.append(CommandPattern.parse(text))
        except ValueError as exc:
            raise fail("commands", f"{text!r}: {exc}") from exc
    paths = tuple(_path_pattern(text, lines, ("rules", index, "paths")) for text in raw.paths)
    return Rule(decision=raw.decision, tools=tuple(raw.tools), commands=tuple(commands), paths=paths,
                note=raw.note, source=Source(file=lines.file, line=lines.line(("rules", index))))


def _path_pattern(text: str, lines: Lines, at: KeyPath) -> PathPattern:
    try:
        return PathPattern.parse(text)
    except ValueError as exc:
        raise PolicyError(f"{lines.where(at)}: {_dotted(at)}: {exc}") from exc
