"""The file tools of the tool sandbox: read_file, write_file, edit_file,
list_dir, glob and grep, one module each.

Owns running one file-tool call beneath a workspace. It imports only
`bastion.protocol` and the standard library/third-party packages, never the
supervisor, and decides nothing about policy: protected paths inside the
workspace, who may write, which tools are shown, all arrive already decided in
the job. What it does guarantee on its own, with or without the confinement
launcher's walls around it (a policy mistake must still be contained):

- every path resolves beneath the workspace, race-free (jail.py: openat2 with
  RESOLVE_BENEATH|RESOLVE_NO_MAGICLINKS, or the O_NOFOLLOW walk in walk.py);
- special files are refused without blocking; links are never written through;
  writes go temp file + fsync + rename (atomic_write.py);
- output is capped keeping head and tail (output_cap.py).

Public API:

    FileToolJob(arguments, workspace, limits, writable, resolve)   job.py
    run_file_tool(job) -> ToolEnvelope                             run.py
    FILE_TOOLS, FileToolArgs, ResolveMode

Process contract (`python -m bastion.tools_sandbox.file_tools`, __main__.py):
stdin is one msgpack `FileToolJob` (read to EOF); stdout is one msgpack
`ToolEnvelope`; exit 0 whenever an envelope was produced, tool failures being
ok=False envelopes. Exit 2 means the job could not be decoded (an ok=False
envelope saying why is still written); any other exit is a crash (traceback on
stderr).
"""

from bastion.tools_sandbox.file_tools.job import FILE_TOOLS, FileToolArgs, FileToolJob, ResolveMode
from bastion.tools_sandbox.file_tools.run import run_file_tool

__all__ = ["FILE_TOOLS", "FileToolArgs", "FileToolJob", "ResolveMode", "run_file_tool"]
