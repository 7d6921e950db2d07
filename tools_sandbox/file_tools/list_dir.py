"""list_dir: the names in one workspace directory.

Arguments: `ListDirArgs(path=".")`. Content: one name a line, sorted; a
directory ends in `/`; a symlink is shown as what it resolves to beneath the
workspace (`name/` or `name`), or as `name@` when it leads outside the
workspace or nowhere (its target is not shown: it may be a host path). At most
`MAX_ENTRIES` names, then a note and truncated (OUTPUT_CAP), as when the text
passes `limits.max_output_bytes`.
"""

from __future__ import annotations

import os
import posixpath
import stat

from bastion.protocol.sandbox_wire import ListDirArgs, ToolEnvelope, ToolLimits, TruncationReason
from bastion.tools_sandbox.file_tools.errors import FileToolError
from bastion.tools_sandbox.file_tools.jail import Jail
from bastion.tools_sandbox.file_tools.output_cap import HeadTail
from bastion.tools_sandbox.file_tools.tree import Entry, EntryKind, entries

MAX_ENTRIES = 1000


def list_dir(args: ListDirArgs, jail: Jail, limits: ToolLimits) -> ToolEnvelope:
    rel = jail.relative(args.path)
    fd = jail.open_dir(rel)
    try:
        listed = entries(fd)
    except OSError as error:
        raise FileToolError(f"cannot list '{rel}': {error.strerror}") from error
    finally:
        os.close(fd)
    out = HeadTail(limits.max_output_bytes)
    outside = False
    for entry in listed[:MAX_ENTRIES]:
        shown = _show(jail, rel, entry)
        outside |= shown.endswith("@")
        out.write(shown + "\n")
    notes = []
    if not listed:
        notes.append(f"'{rel}' is empty")
    if len(listed) > MAX_ENTRIES:
        notes.append(f"{len(listed) - MAX_ENTRIES} more entries not shown")
    if outside:
        notes.append("a name ending in @ is a symbolic link that leads outside the workspace or nowhere")
    truncated = out.truncated or len(listed) > MAX_ENTRIES
    return ToolEnvelope(
        ok=True,
        content=out.render() + "".join(f"[list_dir: {note}]\n" for note in notes),
        truncated=truncated,
        truncated_reason=TruncationReason.OUTPUT_CAP if truncated else None,
    )


def _show(jail: Jail, rel: str, entry: Entry) -> str:
    if entry.kind is EntryKind.DIR:
        return entry.name + "/"
    if entry.kind is not EntryKind.LINK:
        return entry.name
    try:
        fd = jail.resolve(posixpath.join(rel, entry.name), os.O_PATH)
    except OSError:
        return entry.name + "@"
    try:
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    return entry.name + ("/" if is_dir else "")
