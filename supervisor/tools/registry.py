"""What tools a run may offer a model, how they are described to it, and how each runs.

Owns `ToolSpec` (what a model is shown: name, description, JSON-schema
parameters), `ToolResult`, the two kinds of tool record — `BuiltinTool` (runs
in the supervisor: `clock`, `calculator`) and `SandboxTool` (runs in the tool
sandbox, described by its protocol record) — and the `ToolRegistry` that holds
them by name, in registration order, and picks a run's tools.

Records can be added while the supervisor runs (`add`): nothing here assumes
a fixed set. Picking a run's tools (`select`) expands `files`, refuses a tool
its trust flags leave off, and names the available tools when one is unknown.
`advertise` is the short system-prompt text that tells a small local model
which tools exist and the one exact way to call them (a fenced `tool_call`
block, which calls.py parses).

`execute` runs a built-in and never raises for the tool's own failure: bad
arguments, a bad time zone, a division by zero come back as `ok=False` with a
message meant for the model. Programming errors at registration (a duplicate
name, a schema that cannot be fully enforced) do raise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from bastion.protocol.tool_catalog import SANDBOXED_TOOLS, SandboxedTool, ToolGroup, TrustFlag
from bastion.supervisor.errors import ToolRegistrationError, TrustFlagError, UnknownToolError
from bastion.supervisor.tools.schema import check_schema, validate


class ToolSpec(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str
    parameters: dict[str, Any]  # a JSON schema that schema.check_schema accepts
    read_only: bool


class ToolResult(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    content: str


ToolExecutor = Callable[[Mapping[str, Any]], ToolResult]


@dataclass(frozen=True)
class BuiltinTool:
    """Runs in the supervisor (it touches nothing)."""

    spec: ToolSpec
    executor: ToolExecutor


@dataclass(frozen=True)
class SandboxTool:
    """Runs in the tool sandbox; `record` says how, and under which trust flag."""

    spec: ToolSpec
    record: SandboxedTool


Tool = BuiltinTool | SandboxTool


class ToolRegistry:
    """Tool records by name, in registration order."""

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    @classmethod
    def builtin(cls, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> ToolRegistry:
        """A registry holding `clock` and `calculator`; `now` is the clock's time source."""
        from bastion.supervisor.tools.builtin import CALCULATOR, CLOCK, calculator, clock

        registry = cls()
        registry.register(CLOCK, lambda arguments: clock(arguments, now))
        registry.register(CALCULATOR, calculator)
        return registry

    @classmethod
    def standard(cls) -> ToolRegistry:
        """Every tool bastion ships: the built-ins, then the sandboxed tools."""
        from bastion.supervisor.tools.sandboxed import sandbox_tool

        registry = cls.builtin()
        for record in SANDBOXED_TOOLS:
            registry.add(sandbox_tool(record))
        return registry

    def register(self, spec: ToolSpec, executor: ToolExecutor) -> None:
        """Add a built-in tool."""
        self.add(BuiltinTool(spec=spec, executor=executor))

    def add(self, tool: Tool) -> None:
        name = tool.spec.name
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ToolRegistrationError(f"tool name {name!r} must be letters, digits, _ or -")
        if name in self._tools or name in _GROUP_NAMES:
            raise ToolRegistrationError(f"tool {name!r} is already registered")
        check_schema(tool.spec.parameters, f"{name}.parameters")
        self._tools[name] = tool

    def names(self) -> list[str]:
        return list(self._tools)

    def tools(self) -> list[Tool]:
        return list(self._tools.values())

    def tool(self, name: str) -> Tool:
        if name not in self._tools:
            raise UnknownToolError(f"no tool named {name!r}; available tools: {self._available()}")
        return self._tools[name]

    def get(self, name: str) -> ToolSpec:
        return self.tool(name).spec

    def select(self, names: Sequence[str]) -> list[ToolSpec]:
        """The specs for `names`, in that order, each once; any unknown name is an error."""
        unknown = [name for name in names if name not in self._tools]
        if unknown:
            raise UnknownToolError(
                f"unknown tool(s): {', '.join(unknown)}; available tools: {self._available()}"
            )
        return [self._tools[name].spec for name in dict.fromkeys(names)]

    def for_run(self, names: Iterable[str], *, allow_shell: bool, allow_write: bool) -> list[Tool]:
        """The tools a run offers for `names` under its trust flags, in order, each once.

        A group name (`files`) stands for its members that need no flag, plus
        those whose flag the run set (the write tools with --allow-write); a
        tool named outright whose flag is off is refused, never dropped."""
        flags = {TrustFlag.ALLOW_SHELL: allow_shell, TrustFlag.ALLOW_WRITE: allow_write}
        picked: list[Tool] = []
        unknown: list[str] = []
        for name in names:
            if name in _GROUP_NAMES:
                picked.extend(
                    tool
                    for tool in self._group(_GROUP_NAMES[name])
                    if tool.record.enabled_by is None or flags[tool.record.enabled_by]
                )
            elif name in self._tools:
                picked.append(self._tools[name])
            else:
                unknown.append(name)
        if unknown:
            available = ", ".join(sorted({*self._tools, *_GROUP_NAMES}))
            raise UnknownToolError(f"unknown tool(s): {', '.join(unknown)}; available: {available}")
        for tool in picked:
            if isinstance(tool, SandboxTool):
                check_trust_flags(tool.record, allow_shell=allow_shell, allow_write=allow_write)
        return list({tool.spec.name: tool for tool in picked}.values())

    def execute(self, name: str, arguments: Mapping[str, Any]) -> ToolResult:
        """Run a built-in tool; anything else, or bad arguments, is a failed result."""
        tool = self._tools.get(name)
        if not isinstance(tool, BuiltinTool):
            return ToolResult(
                ok=False, content=f"no tool named {name!r}; available tools: {self._available()}"
            )
        # The parser validates too; this keeps executors safe from any caller that skipped it.
        errors = validate(arguments, tool.spec.parameters, "$.arguments")
        if errors:
            return ToolResult(ok=False, content=f"invalid arguments for {name}: {'; '.join(errors)}")
        try:
            return tool.executor(arguments)
        except Exception as exc:  # a tool's failure is a result for the model, not a crash
            return ToolResult(ok=False, content=f"{name} failed: {type(exc).__name__}: {exc}")

    def _group(self, group: ToolGroup) -> list[SandboxTool]:
        members = [
            tool
            for tool in self._tools.values()
            if isinstance(tool, SandboxTool) and tool.record.group is group
        ]
        # Read-only members first, as `files` always listed them.
        return sorted(members, key=lambda tool: tool.record.writes)

    def _available(self) -> str:
        return ", ".join(self._tools) or "(none)"


_GROUP_NAMES = {group.value: group for group in ToolGroup}


def check_trust_flags(record: SandboxedTool, *, allow_shell: bool, allow_write: bool) -> None:
    """Refuse a tool whose trust flag is off: the shell without --allow-shell,
    the write tools without --allow-write."""
    flag = record.enabled_by
    if flag is None or {TrustFlag.ALLOW_SHELL: allow_shell, TrustFlag.ALLOW_WRITE: allow_write}[flag]:
        return
    if flag is TrustFlag.ALLOW_SHELL:
        raise TrustFlagError(f"the {record.name} tool is off by default; turn it on with {flag.value}")
    raise TrustFlagError(f"{record.name} writes files, which is off by default; turn it on with {flag.value}")


def advertise(specs: Sequence[ToolSpec]) -> str:
    """System-prompt text listing `specs` and the exact call format, kept short for small contexts."""
    lines = ["You can use these tools:"]
    for spec in specs:
        schema = msgspec.json.encode(spec.parameters).decode()
        lines.append(f"- {spec.name}: {spec.description} Arguments (JSON schema): {schema}")
    # Small models copy examples literally, so the example is a real call of
    # the first tool with its own argument names, never a placeholder.
    lines += [
        "",
        "To use a tool, reply with only a block like this, nothing before or after it:",
        "```tool_call",
        msgspec.json.encode({"name": specs[0].name, "arguments": _example_arguments(specs[0])}).decode()
        if specs
        else '{"name": "clock", "arguments": {}}',
        "```",
        "For several tools, write one block per call. The results come back in the next message; "
        "then answer normally. If no tool is needed, just answer.",
    ]
    return "\n".join(lines)


def _example_arguments(spec: ToolSpec) -> dict[str, Any]:
    properties = spec.parameters.get("properties", {})
    required = spec.parameters.get("required", [])
    example: dict[str, Any] = {}
    for name in required:
        kind = properties.get(name, {}).get("type")
        example[name] = 1 if kind in ("integer", "number") else True if kind == "boolean" else f"<{name}>"
    return example
