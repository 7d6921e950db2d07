"""The tools that run in the sandbox, as the model and the policy see them.

Each has a JSON schema for the model (advertised like any tool) and a typed
argument Struct from the protocol (what the policy inspects and the sandbox
runs). Which of them a run may offer depends on trust flags: the shell only
with `--allow-shell`; `write_file` and `edit_file` only with `--allow-write`
(without it they are not even shown to the model).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from bastion.protocol.sandbox_wire import (
    WRITE_TOOLS,
    ConfinementLevel,
    EditFileArgs,
    GlobArgs,
    GrepArgs,
    ListDirArgs,
    ReadFileArgs,
    SandboxedArgs,
    ShellArgs,
    WriteFileArgs,
)
from bastion.supervisor.errors import TrustFlagError
from bastion.supervisor.tools.registry import ToolSpec


def _schema(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


_PATH = {"type": "string", "description": "a path relative to the workspace"}

SHELL = ToolSpec(
    name="shell",
    description="Run a shell command in the workspace (no network). Returns its output and exit code.",
    parameters=_schema({"command": {"type": "string"}, "timeout_s": {"type": "number", "minimum": 1}}, ["command"]),
    read_only=False,
)
READ_FILE = ToolSpec(
    name="read_file",
    description="Read a text file in the workspace, optionally from a line offset for a number of lines.",
    parameters=_schema({"path": _PATH, "offset": {"type": "integer", "minimum": 0},
                        "limit": {"type": "integer", "minimum": 1}}, ["path"]),
    read_only=True,
)
WRITE_FILE = ToolSpec(
    name="write_file",
    description="Create or overwrite a text file in the workspace.",
    parameters=_schema({"path": _PATH, "content": {"type": "string"}}, ["path", "content"]),
    read_only=False,
)
EDIT_FILE = ToolSpec(
    name="edit_file",
    description="Replace exactly one occurrence of `old` with `new` in a file of the workspace.",
    parameters=_schema({"path": _PATH, "old": {"type": "string"}, "new": {"type": "string"}},
                       ["path", "old", "new"]),
    read_only=False,
)
LIST_DIR = ToolSpec(
    name="list_dir",
    description="List a directory of the workspace (directories end with /).",
    parameters=_schema({"path": _PATH}, []),
    read_only=True,
)
GLOB = ToolSpec(
    name="glob",
    description="Find workspace files matching a glob pattern such as src/**/*.py.",
    parameters=_schema({"pattern": {"type": "string"}}, ["pattern"]),
    read_only=True,
)
GREP = ToolSpec(
    name="grep",
    description="Search workspace files for a regular expression; optional glob to limit which files.",
    parameters=_schema({"pattern": {"type": "string"}, "path": _PATH, "glob": {"type": "string"}}, ["pattern"]),
    read_only=True,
)

SANDBOXED: dict[str, ToolSpec] = {
    spec.name: spec for spec in (SHELL, READ_FILE, WRITE_FILE, EDIT_FILE, LIST_DIR, GLOB, GREP)
}
_ARGUMENT_TYPES: dict[str, type] = {
    "shell": ShellArgs, "read_file": ReadFileArgs, "write_file": WriteFileArgs, "edit_file": EditFileArgs,
    "list_dir": ListDirArgs, "glob": GlobArgs, "grep": GrepArgs,
}  # fmt: skip
# Weakest confinement each tool may run under: what can change things needs
# the kernel's walls (namespaces, Landlock or bubblewrap), not only rlimits.
REQUIRED_LEVEL: dict[str, ConfinementLevel] = {
    "shell": ConfinementLevel.PARTIAL, "write_file": ConfinementLevel.PARTIAL,
    "edit_file": ConfinementLevel.PARTIAL, "read_file": ConfinementLevel.MINIMAL,
    "list_dir": ConfinementLevel.MINIMAL, "glob": ConfinementLevel.MINIMAL, "grep": ConfinementLevel.MINIMAL,
}  # fmt: skip

READ_ONLY_GROUP = ("read_file", "list_dir", "glob", "grep")


def is_sandboxed(name: str) -> bool:
    return name in SANDBOXED


def to_arguments(name: str, arguments: Mapping[str, Any]) -> SandboxedArgs:
    """The typed arguments of a call the model made (already schema-checked)."""
    return msgspec.convert(dict(arguments), _ARGUMENT_TYPES[name])


def expand_selection(names: tuple[str, ...], *, allow_shell: bool, allow_write: bool) -> tuple[str, ...]:
    """Resolve `files` (the read-only file tools, plus the write tools with
    --allow-write) and check that every named tool is allowed by the flags."""
    expanded: list[str] = []
    for name in names:
        if name == "files":
            expanded.extend(READ_ONLY_GROUP)
            if allow_write:
                expanded.extend(sorted(WRITE_TOOLS))
        else:
            expanded.append(name)
    for name in expanded:
        check_trust_flags(name, allow_shell=allow_shell, allow_write=allow_write)
    return tuple(dict.fromkeys(expanded))


def check_trust_flags(name: str, *, allow_shell: bool, allow_write: bool) -> None:
    """Refuse a tool its run's flags leave off: the shell without --allow-shell,
    the write tools without --allow-write."""
    if name == "shell" and not allow_shell:
        raise TrustFlagError("the shell tool is off by default; turn it on with --allow-shell")
    if name in WRITE_TOOLS and not allow_write:
        raise TrustFlagError(f"{name} writes files, which is off by default; turn it on with --allow-write")


def writable_for(name: str, *, allow_write: bool) -> bool:
    """Whether the workspace is mounted writable for a call of `name`: the write
    tools, and the shell, when the run allows writes; never otherwise."""
    return allow_write and (name in WRITE_TOOLS or name == "shell")
