"""The tools that run in the tool sandbox: one record each, read by every process.

A `SandboxedTool` says everything about one tool:

- `arguments`, the Struct its calls are decoded into: its tag is the tool's
  name, the policy inspects its typed fields, the sandbox runs it, and the JSON
  schema the model is shown is generated from it (`argument_schema`);
- `description`, what the model is told the tool does;
- `kind`, how the sandbox runs it (`/bin/sh -c`, or the file-tool program);
- `writes`, whether it can change the workspace (the workspace is mounted
  writable for its calls only when the run allows writes);
- `enabled_by`, the trust flag a run must set before the tool is even offered;
- `group`, the shorthand it is selected by (`files`), if any;
- `required_level`, the weakest confinement it may run under.

Everything else is derived from these records: the supervisor's tool specs and
trust-flag checks, the policy's set of file tools, the sandbox's dispatch and
its refusal to write without permission. Adding a sandboxed tool is adding its
argument Struct (sandbox_wire.py) and one record here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import msgspec

from bastion.protocol.sandbox_wire import (
    ConfinementLevel,
    EditFileArgs,
    GlobArgs,
    GrepArgs,
    ListDirArgs,
    ReadFileArgs,
    SandboxedArgs,
    ShellArgs,
    ToolArguments,
    WriteFileArgs,
)


class ToolKind(enum.Enum):
    SHELL = "shell"  # /bin/sh -c in a confined child
    FILE = "file"  # `python -m bastion.tools_sandbox.file_tools` in a confined child


class TrustFlag(enum.Enum):
    """A switch a run (or `bastion tools run`) must turn on for a tool; the value is the CLI flag."""

    ALLOW_SHELL = "--allow-shell"
    ALLOW_WRITE = "--allow-write"


class ToolGroup(enum.Enum):
    FILES = "files"  # `--tools files`: the read-only file tools, plus the write tools with --allow-write


@dataclass(frozen=True)
class SandboxedTool:
    arguments: type[SandboxedArgs]
    description: str
    kind: ToolKind
    writes: bool
    required_level: ConfinementLevel
    enabled_by: TrustFlag | None = None
    group: ToolGroup | None = None

    @property
    def name(self) -> str:
        return str(self.arguments.__struct_config__.tag)


SANDBOXED_TOOLS: tuple[SandboxedTool, ...] = (
    SandboxedTool(
        arguments=ShellArgs,
        description="Run a shell command in the workspace (no network). Returns its output and exit code.",
        kind=ToolKind.SHELL, writes=True, enabled_by=TrustFlag.ALLOW_SHELL,
        # What can change things needs the kernel's walls (namespaces, Landlock
        # or bubblewrap), not only rlimits.
        required_level=ConfinementLevel.PARTIAL,
    ),
    SandboxedTool(
        arguments=ReadFileArgs,
        description="Read a text file in the workspace, optionally from a line offset for a number of lines.",
        kind=ToolKind.FILE, writes=False, group=ToolGroup.FILES, required_level=ConfinementLevel.MINIMAL,
    ),
    SandboxedTool(
        arguments=ListDirArgs,
        description="List a directory of the workspace (directories end with /).",
        kind=ToolKind.FILE, writes=False, group=ToolGroup.FILES, required_level=ConfinementLevel.MINIMAL,
    ),
    SandboxedTool(
        arguments=GlobArgs,
        description="Find workspace files matching a glob pattern such as src/**/*.py.",
        kind=ToolKind.FILE, writes=False, group=ToolGroup.FILES, required_level=ConfinementLevel.MINIMAL,
    ),
    SandboxedTool(
        arguments=GrepArgs,
        description="Search workspace files for a regular expression; optional glob to limit which files.",
        kind=ToolKind.FILE, writes=False, group=ToolGroup.FILES, required_level=ConfinementLevel.MINIMAL,
    ),
    SandboxedTool(
        arguments=EditFileArgs,
        description="Replace exactly one occurrence of `old` with `new` in a file of the workspace.",
        kind=ToolKind.FILE, writes=True, enabled_by=TrustFlag.ALLOW_WRITE, group=ToolGroup.FILES,
        required_level=ConfinementLevel.PARTIAL,
    ),
    SandboxedTool(
        arguments=WriteFileArgs,
        description="Create or overwrite a text file in the workspace.",
        kind=ToolKind.FILE, writes=True, enabled_by=TrustFlag.ALLOW_WRITE, group=ToolGroup.FILES,
        required_level=ConfinementLevel.PARTIAL,
    ),
)  # fmt: skip

_BY_NAME = {tool.name: tool for tool in SANDBOXED_TOOLS}
_BY_TYPE: dict[type[ToolArguments], SandboxedTool] = {tool.arguments: tool for tool in SANDBOXED_TOOLS}

FILE_TOOLS = frozenset(tool.name for tool in SANDBOXED_TOOLS if tool.kind is ToolKind.FILE)
# File tools that change the workspace: they refuse to run unless the call is writable.
WRITE_TOOLS = frozenset(tool.name for tool in SANDBOXED_TOOLS if tool.kind is ToolKind.FILE and tool.writes)


def sandboxed_tool(name: str) -> SandboxedTool | None:
    return _BY_NAME.get(name)


def tool_of(arguments: ToolArguments) -> SandboxedTool:
    """The record of the tool `arguments` are for."""
    return _BY_TYPE[type(arguments)]


def argument_schema(arguments: type[ToolArguments]) -> dict[str, Any]:
    """The JSON schema of a tool's arguments as a model is shown it: an object
    of the Struct's fields (without the tag), each with its type, description
    and bounds; an optional field is simply not required (never `null`)."""
    generated = msgspec.json.schema(arguments)
    definition = generated["$defs"][generated["$ref"].rsplit("/", 1)[-1]]
    properties = {
        name: _plain(schema) for name, schema in definition["properties"].items() if name != _TAG_FIELD
    }
    required = [name for name in definition.get("required", []) if name != _TAG_FIELD]
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


_TAG_FIELD = "tool"
_KEY_ORDER = ("type", "description")


def _plain(schema: dict[str, Any]) -> dict[str, Any]:
    options = schema.get("anyOf")
    if options is not None:
        # `X | None = None`: the model leaves it out rather than sending null.
        (schema,) = [option for option in options if option.get("type") != "null"]
    kept = {key: value for key, value in schema.items() if key not in ("default", "title")}
    ordered = {key: kept[key] for key in _KEY_ORDER if key in kept}
    return ordered | {key: value for key, value in kept.items() if key not in ordered}
