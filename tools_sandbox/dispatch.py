"""One `RunTool` → the right tool, run through the confinement launcher.

The shell runs as `/bin/sh -c` in a confined child; the file tools run as
`python -m bastion.tools_sandbox.file_tools` in a confined child (the same
walls), so a bug in a file tool is contained like a hostile command. A call
that needs a stronger confinement level than this machine offers is refused
here, before anything starts.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from bastion.protocol.sandbox_wire import (
    ConfinementReport,
    RunTool,
    ShellArgs,
    ToolEnvelope,
    ToolStream,
    level_reaches,
)
from bastion.tools_sandbox.confine import python_job, run_confined
from bastion.tools_sandbox.file_tools import FileToolJob
from bastion.tools_sandbox.shell_tool import run_shell

_FILE_TOOLS_ENTRY = "bastion.tools_sandbox.file_tools"


def execute(
    request: RunTool,
    *,
    report: ConfinementReport,
    on_chunk: Callable[[ToolStream, str], None] | None,
    cancelled: Callable[[], bool],
) -> ToolEnvelope:
    if not level_reaches(report.level, request.required_level):
        return ToolEnvelope(
            ok=False,
            content=f"[bastion sandbox] REFUSED: this call needs {request.required_level.value} confinement and "
            f"this machine offers {report.level.value}; see `bastion doctor`",
        )
    match request.arguments:
        case ShellArgs() as arguments:
            return run_shell(arguments, request.workspace, request.limits, report, on_chunk, cancelled,
                             writable=request.writable)
        case arguments:
            # Every other tool is a file tool (tool_catalog: ToolKind.FILE).
            job = FileToolJob(arguments=arguments, workspace=request.workspace, limits=request.limits,
                              writable=request.writable)
    confined = python_job(_FILE_TOOLS_ENTRY, stdin_bytes=msgspec.msgpack.encode(job), workspace=request.workspace,
                          limits=request.limits, writable=request.writable)
    return run_confined(confined, report=report, on_chunk=None, cancelled=cancelled)
