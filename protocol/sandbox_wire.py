"""Messages between the supervisor and a tool sandbox process, and the typed
arguments of every sandboxed tool.

The sandbox's DEALER connects to the supervisor's tools ROUTER and speaks first:

    sandbox    -> Hello(role=sandbox, name=<sandbox id>)
    supervisor -> HelloAccepted | RequestFailed(protocol_mismatch)
    sandbox    -> SandboxReady {confinement report: each layer active or missing, and the level}
    supervisor -> RunTool {request_id, arguments, workspace, limits}
    sandbox    -> ToolChunk* (shell output while it runs) then ToolFinished {envelope}
    supervisor -> Cancel {request_id}   (the call's whole process tree is killed)
    both ways     Heartbeat every second

Tool arguments are Structs, one per tool, so policy inspects typed fields
(argv for the shell, paths for files), never a bag of JSON. What else is known
of each tool (who may turn it on, whether it writes, how it runs) is its
record in tool_catalog.py.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Annotated

import msgspec

from bastion.protocol.common import Cancel, Heartbeat, Hello, HelloAccepted, Message, RequestFailed, Shutdown


class ToolArguments(msgspec.Struct, frozen=True, kw_only=True, tag_field="tool"):
    """Base of every sandboxed tool's arguments; the tag is the tool's name.

    Field annotations carry what the model is told about each argument (a
    description, a minimum): the JSON schema it sees is generated from them
    (tool_catalog.argument_schema)."""


WorkspacePath = Annotated[str, msgspec.Meta(description="a path relative to the workspace")]


class ShellArgs(ToolArguments, frozen=True, tag="shell"):
    command: str  # run by /bin/sh -c inside the sandbox; policy matches its parsed argv
    timeout_s: Annotated[float, msgspec.Meta(ge=1)] | None = None


class ReadFileArgs(ToolArguments, frozen=True, tag="read_file"):
    path: WorkspacePath
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0  # first line, 0-based
    limit: Annotated[int, msgspec.Meta(ge=1)] | None = None  # lines


class WriteFileArgs(ToolArguments, frozen=True, tag="write_file"):
    path: WorkspacePath
    content: str


class EditFileArgs(ToolArguments, frozen=True, tag="edit_file"):
    # Replace exactly one occurrence of `old` with `new` (fails when missing or ambiguous).
    path: WorkspacePath
    old: str
    new: str


class ListDirArgs(ToolArguments, frozen=True, tag="list_dir"):
    path: WorkspacePath = "."


class GlobArgs(ToolArguments, frozen=True, tag="glob"):
    pattern: str


class GrepArgs(ToolArguments, frozen=True, tag="grep"):
    pattern: str  # a Python regular expression
    path: WorkspacePath = "."
    glob: str | None = None  # only files whose workspace-relative path matches


SandboxedArgs = ShellArgs | ReadFileArgs | WriteFileArgs | EditFileArgs | ListDirArgs | GlobArgs | GrepArgs


def tool_name(arguments: ToolArguments) -> str:
    """The name of the tool `arguments` are for (its Struct's tag)."""
    return str(type(arguments).__struct_config__.tag)


class ConfinementLevel(enum.Enum):
    STRONG = "strong"  # every layer this design asks for is active
    PARTIAL = "partial"  # the always-on layers plus some kernel ones
    MINIMAL = "minimal"  # only what any Linux offers


_LEVEL_RANK = {ConfinementLevel.MINIMAL: 0, ConfinementLevel.PARTIAL: 1, ConfinementLevel.STRONG: 2}


def level_reaches(offered: ConfinementLevel, required: ConfinementLevel) -> bool:
    """Whether confinement at `offered` is enough for a call that needs `required`."""
    return _LEVEL_RANK[offered] >= _LEVEL_RANK[required]


def strictest_level(levels: Iterable[ConfinementLevel]) -> ConfinementLevel:
    return max(levels, key=_LEVEL_RANK.__getitem__, default=ConfinementLevel.MINIMAL)


class LayerStatus(msgspec.Struct, frozen=True, kw_only=True):
    name: str  # e.g. "uid_drop", "network_namespace", "landlock", "seccomp", "bubblewrap"
    active: bool
    detail: str = ""  # why it is missing, or how it is applied
    fix: str = ""  # what would make it active


class ConfinementReport(msgspec.Struct, frozen=True, kw_only=True):
    level: ConfinementLevel
    layers: list[LayerStatus]


class ToolLimits(msgspec.Struct, frozen=True, kw_only=True):
    timeout_s: float = 30.0
    max_output_bytes: int = 64 * 1024  # kept as head and tail when exceeded
    memory_bytes: int = 1024 * 1024 * 1024
    cpu_seconds: int = 60
    file_size_bytes: int = 64 * 1024 * 1024
    open_files: int = 256
    processes: int = 64


class TruncationReason(enum.Enum):
    OUTPUT_CAP = "output_cap"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


class ToolEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    """Every tool's result, the same shape for all."""

    ok: bool
    content: str
    truncated: bool = False
    truncated_reason: TruncationReason | None = None
    exit_code: int | None = None  # the shell's
    duration_ms: float = 0.0


class SandboxReady(Message, frozen=True, tag="sandbox_ready"):
    report: ConfinementReport


class RunTool(Message, frozen=True, tag="run_tool"):
    request_id: str
    arguments: SandboxedArgs
    workspace: str  # absolute; every path the tool touches resolves beneath it
    limits: ToolLimits = ToolLimits()
    # The call is refused unless the sandbox reaches this level.
    required_level: ConfinementLevel = ConfinementLevel.MINIMAL
    # Whether the workspace is writable for this call (write tools, or a shell with --allow-write).
    writable: bool = False


class ToolStream(enum.Enum):
    STDOUT = "stdout"
    STDERR = "stderr"


class ToolChunk(Message, frozen=True, tag="tool_chunk"):
    request_id: str
    stream: ToolStream
    text: str


class ToolFinished(Message, frozen=True, tag="tool_finished"):
    request_id: str
    envelope: ToolEnvelope


ToSandbox = HelloAccepted | Heartbeat | RunTool | Cancel | Shutdown | RequestFailed
FromSandbox = Hello | SandboxReady | Heartbeat | ToolChunk | ToolFinished | RequestFailed
