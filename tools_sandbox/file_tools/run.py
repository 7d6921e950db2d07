"""`run_file_tool`: one job in, one envelope out, the same in-process and in
the confined child (__main__.py).

Owns dispatch and the boundary where failures become data: a `FileToolError`
or an `OSError` from the file system becomes an ok=False envelope whose message
carries no host path (an OSError's filename is dropped, only its strerror is
kept). Anything else is a bug and propagates.
"""

from __future__ import annotations

import time

import msgspec

from bastion.protocol.sandbox_wire import (
    EditFileArgs,
    GlobArgs,
    GrepArgs,
    ListDirArgs,
    ReadFileArgs,
    ToolEnvelope,
    WriteFileArgs,
    tool_name,
)
from bastion.protocol.tool_catalog import WRITE_TOOLS
from bastion.tools_sandbox.file_tools.edit_file import edit_file
from bastion.tools_sandbox.file_tools.errors import FileToolError
from bastion.tools_sandbox.file_tools.glob import glob
from bastion.tools_sandbox.file_tools.grep import grep
from bastion.tools_sandbox.file_tools.jail import Jail
from bastion.tools_sandbox.file_tools.job import FileToolJob
from bastion.tools_sandbox.file_tools.list_dir import list_dir
from bastion.tools_sandbox.file_tools.read_file import read_file
from bastion.tools_sandbox.file_tools.write_file import WRITES_OFF, write_file


def run_file_tool(job: FileToolJob) -> ToolEnvelope:
    """Run the job's tool beneath its workspace; never raises for a tool failure."""
    started = time.monotonic()
    name = tool_name(job.arguments)
    try:
        envelope = _dispatch(job, name)
    except FileToolError as error:
        envelope = ToolEnvelope(ok=False, content=str(error))
    except OSError as error:  # ENOSPC, EIO, EMFILE… mid-operation
        envelope = ToolEnvelope(ok=False, content=f"{name} failed: {error.strerror or type(error).__name__}")
    return msgspec.structs.replace(envelope, duration_ms=(time.monotonic() - started) * 1000)


def _dispatch(job: FileToolJob, name: str) -> ToolEnvelope:
    # Checked before the workspace is even opened; the write path checks again.
    if name in WRITE_TOOLS and not job.writable:
        raise FileToolError(f"refused: {name} is disabled: {WRITES_OFF}")
    with Jail.at(job.workspace, job.resolve, job.writable) as jail:
        match job.arguments:
            case ReadFileArgs() as args:
                return read_file(args, jail, job.limits)
            case WriteFileArgs() as args:
                return write_file(args, jail, job.limits)
            case EditFileArgs() as args:
                return edit_file(args, jail, job.limits)
            case ListDirArgs() as args:
                return list_dir(args, jail, job.limits)
            case GlobArgs() as args:
                return glob(args, jail, job.limits)
            case GrepArgs() as args:
                return grep(args, jail, job.limits)
    raise FileToolError(f"'{name}' is not a file tool")
