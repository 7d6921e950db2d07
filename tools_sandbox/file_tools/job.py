"""What one file-tool call is given: `FileToolJob`, the message the confinement
launcher writes to the file-tool child's stdin (and what tests pass to
`run_file_tool` in-process).

Owns the job's shape only; it must not grow behaviour. Every field is data the
supervisor already decided on (arguments that passed policy, the workspace,
limits, whether writes are on), so the child trusts it as given and never looks
at its own environment for any of it.
"""

from __future__ import annotations

import enum

import msgspec

from bastion.protocol import tool_catalog
from bastion.protocol.sandbox_wire import (
    EditFileArgs,
    GlobArgs,
    GrepArgs,
    ListDirArgs,
    ReadFileArgs,
    ToolLimits,
    WriteFileArgs,
)

# The tools this package runs: every `SandboxedArgs` member except the shell.
FileToolArgs = ReadFileArgs | WriteFileArgs | EditFileArgs | ListDirArgs | GlobArgs | GrepArgs

# The names of those tools, as the tool catalog records them.
FILE_TOOLS = tool_catalog.FILE_TOOLS


class ResolveMode(enum.Enum):
    """How paths are resolved beneath the workspace."""

    AUTO = "auto"  # openat2 when the kernel (and any seccomp filter) allows it, else the walk
    OPENAT2 = "openat2"  # openat2 only; a call fails when it is unavailable
    WALK = "walk"  # the component-by-component O_NOFOLLOW walk, even where openat2 works


class FileToolJob(msgspec.Struct, frozen=True, kw_only=True):
    """One file-tool call.

    `workspace` is absolute; every path the tool touches resolves beneath it.
    `writable` is False unless the session turned file writes on: write_file and
    edit_file refuse without it, whatever policy said.
    """

    arguments: FileToolArgs
    workspace: str
    limits: ToolLimits = ToolLimits()
    writable: bool = False
    resolve: ResolveMode = ResolveMode.AUTO
