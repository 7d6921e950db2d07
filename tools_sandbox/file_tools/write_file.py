"""write_file: create or replace a file inside the workspace.

Arguments: `WriteFileArgs(path, content)`; the content is written as UTF-8.
Missing parent directories are created beneath the workspace; the file is
written to a temp file in the same directory, fsync'ed and renamed over the
name (atomic_write.py), so a reader never sees half a file and a link at the
name is replaced, never written through. Refused when the job is not
`writable`, when the content exceeds `limits.file_size_bytes`, and when the
name holds a symlink, a directory or a special file.
"""

from __future__ import annotations

from bastion.protocol.sandbox_wire import ToolEnvelope, ToolLimits, WriteFileArgs
from bastion.tools_sandbox.file_tools.atomic_write import describe, open_target, replace_contents
from bastion.tools_sandbox.file_tools.errors import FileToolError
from bastion.tools_sandbox.file_tools.jail import Jail

WRITES_OFF = "file writes are off for this session (the user turns them on with --allow-write)"


def write_file(args: WriteFileArgs, jail: Jail, limits: ToolLimits) -> ToolEnvelope:
    if not jail.writable:
        raise FileToolError(f"refused: write_file is disabled: {WRITES_OFF}")
    rel = jail.relative(args.path)
    data = args.content.encode("utf-8")
    if len(data) > limits.file_size_bytes:
        raise FileToolError(
            f"refused: {len(data)} bytes is more than the {limits.file_size_bytes}-byte file size limit"
        )
    with open_target(jail, rel, create_parents=True) as target:
        replace_contents(jail, target, data)
        return ToolEnvelope(ok=True, content=f"wrote {len(data)} bytes to '{rel}'" + describe(target))
