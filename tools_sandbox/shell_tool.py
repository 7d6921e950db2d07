"""The `shell` tool: `/bin/sh -c COMMAND` in a fresh confined child.

Owns turning `ShellArgs` into a `ConfinedJob` and nothing else: the walls,
the streaming, the timeout and the output cap are the launcher's
(`confine/launcher.py`). The command's own `timeout_s` can shorten the call,
never lengthen it past the limits policy gave. The envelope is ok only when
the command ran and exited 0; `exit_code` is set whenever it ran to the end
(128+N when a signal N killed it), and its output is stdout and stderr
combined in arrival order.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from bastion.protocol.sandbox_wire import ConfinementReport, ShellArgs, ToolEnvelope, ToolLimits
from bastion.tools_sandbox.confine.job import DEFAULT_SANDBOX_UID, ConfinedJob
from bastion.tools_sandbox.confine.launcher import run_confined
from bastion.tools_sandbox.confine.output import ChunkSink

SHELL = "/bin/sh"


def shell_job(args: ShellArgs, *, workspace: str, limits: ToolLimits, writable: bool, uid: int) -> ConfinedJob:
    if args.timeout_s is not None and 0 < args.timeout_s < limits.timeout_s:
        limits = msgspec.structs.replace(limits, timeout_s=args.timeout_s)
    return ConfinedJob(argv=(SHELL, "-c", args.command), workspace=workspace, limits=limits, writable=writable,
                       uid=uid)  # fmt: skip


def run_shell(args: ShellArgs, workspace: str, limits: ToolLimits, report: ConfinementReport,
              on_chunk: ChunkSink | None, cancelled: Callable[[], bool], *, writable: bool = False,
              uid: int = DEFAULT_SANDBOX_UID) -> ToolEnvelope:  # fmt: skip
    """Run one shell command confined; streams output chunks through `on_chunk` while it runs.

    `writable` says whether the command may write in the workspace: pass the
    session's file-write switch. Off, the workspace is mounted read-only."""
    job = shell_job(args, workspace=workspace, limits=limits, writable=writable, uid=uid)
    return run_confined(job, report=report, on_chunk=on_chunk, cancelled=cancelled)
