"""What one confined call runs: `ConfinedJob`, and `python_job` for tools
written in Python (the file tools) that run as `python -I -m MODULE`.

Owns the job's shape and the list of paths an interpreter needs; no
behaviour. There is deliberately no network switch: no job can ask for one.
"""

from __future__ import annotations

import enum
import os
import sys
from pathlib import Path

import msgspec

from bastion.protocol.sandbox_wire import ToolLimits

SANDBOX_UID_BASE = 60000  # uids 60000..64999: no passwd entries needed, far from real users
DEFAULT_SANDBOX_UID = SANDBOX_UID_BASE


class OutputMode(enum.Enum):
    TEXT = "text"  # stdout+stderr combined, streamed, capped keeping head and tail (the shell)
    ENVELOPE = "envelope"  # stdout is one msgpack ToolEnvelope written by the tool (the file tools)


class ConfinedJob(msgspec.Struct, frozen=True, kw_only=True):
    """One tool invocation.

    `argv[0]` must be an absolute path (execve does no PATH search). The tool's
    cwd is `workspace`; it may write there only when `writable`. `uid` (also
    the gid) is the unprivileged identity used when the sandbox runs as root:
    give each sandbox or session its own, `SANDBOX_UID_BASE + n`, so one
    cannot signal or exhaust another's processes. `read_only_paths` are extra
    paths the tool may read and execute besides the system directories
    (python_job fills in the interpreter)."""

    argv: tuple[str, ...]
    workspace: str
    limits: ToolLimits = ToolLimits()
    writable: bool = False
    stdin_bytes: bytes = b""
    uid: int = DEFAULT_SANDBOX_UID
    read_only_paths: tuple[str, ...] = ()
    output: OutputMode = OutputMode.TEXT


def interpreter_paths() -> tuple[str, ...]:
    """What `python -I -m bastion.tools_sandbox...` needs to start: the base
    installation, the virtualenv, and the two bastion packages it imports
    (an editable install maps them to source folders). Nothing else of the
    repository, and not the bastion home."""
    import bastion.protocol
    import bastion.tools_sandbox

    paths = [sys.base_prefix, sys.prefix]
    paths += [str(Path(module.__file__).resolve().parent) for module in (bastion.protocol, bastion.tools_sandbox)
              if module.__file__]  # fmt: skip
    return tuple(dict.fromkeys(os.path.realpath(path) for path in paths))


def python_job(module: str, *, stdin_bytes: bytes, workspace: str, limits: ToolLimits = ToolLimits(),
               writable: bool = False, uid: int = DEFAULT_SANDBOX_UID,
               output: OutputMode = OutputMode.ENVELOPE) -> ConfinedJob:  # fmt: skip
    """`python -I -m module` with `stdin_bytes` on its stdin; by default its
    stdout is read back as one msgpack ToolEnvelope."""
    return ConfinedJob(
        argv=(sys.executable, "-I", "-m", module),
        workspace=workspace,
        limits=limits,
        writable=writable,
        stdin_bytes=stdin_bytes,
        uid=uid,
        read_only_paths=interpreter_paths(),
        output=output,
    )
