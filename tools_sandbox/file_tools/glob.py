"""glob: workspace paths matching a pattern.

Arguments: `GlobArgs(pattern)`, matched against workspace-relative paths (see
glob_pattern.py; `**` spans directories, wildcards skip dot-names). Content:
matching paths relative to the workspace, one a line, sorted, directories
ending in `/`. Refuses a pattern with a `..` component and an absolute pattern
that does not start inside the workspace (one that does is made relative).
The walk never enters a symlinked directory (tree.py), and a matching symlink
is listed only when it resolves beneath the workspace. At most `MAX_RESULTS`
paths and `MAX_SCANNED` entries looked at; past either the result says so and
is truncated (OUTPUT_CAP).
"""

from __future__ import annotations

import os

from bastion.protocol.sandbox_wire import GlobArgs, ToolEnvelope, ToolLimits, TruncationReason
from bastion.tools_sandbox.file_tools.errors import FileToolError
from bastion.tools_sandbox.file_tools.glob_pattern import GlobPattern
from bastion.tools_sandbox.file_tools.jail import Jail
from bastion.tools_sandbox.file_tools.output_cap import HeadTail
from bastion.tools_sandbox.file_tools.tree import EntryKind, TreeWalk

MAX_RESULTS = 1000
MAX_SCANNED = 100_000


def parse_pattern(jail: Jail, pattern: str) -> GlobPattern:
    """A pattern relative to the workspace, or a refusal."""
    if not pattern.strip():
        raise FileToolError("the pattern is empty")
    if ".." in pattern.split("/"):
        raise FileToolError(f"refused: '{pattern}' contains '..'; patterns match beneath the workspace only")
    relative = jail.relative(pattern) if pattern.startswith("/") else pattern
    return GlobPattern(relative)


def glob(args: GlobArgs, jail: Jail, limits: ToolLimits) -> ToolEnvelope:
    pattern = parse_pattern(jail, args.pattern)
    root = jail.open_dir(".")
    walk = TreeWalk(MAX_SCANNED)
    found: list[str] = []
    try:
        for parts, entry, _ in walk.walk(root, [], pattern.could_match_below):
            if not pattern.match(parts):
                continue
            rel = "/".join(parts)
            if entry.kind is EntryKind.LINK and not jail.stays_inside(rel):
                continue
            found.append(rel + "/" if entry.kind is EntryKind.DIR else rel)
    finally:
        os.close(root)
    found.sort()
    out = HeadTail(limits.max_output_bytes)
    for path in found[:MAX_RESULTS]:
        out.write(path + "\n")
    notes = []
    if not found:
        notes.append(f"no paths match '{args.pattern}'")
    if len(found) > MAX_RESULTS:
        notes.append(f"{len(found) - MAX_RESULTS} more matches not shown; narrow the pattern")
    if walk.exhausted:
        notes.append(f"stopped after looking at {MAX_SCANNED} entries; narrow the pattern")
    if walk.too_deep:
        notes.append("directories nested too deeply were not entered")
    truncated = out.truncated or len(found) > MAX_RESULTS or walk.exhausted
    return ToolEnvelope(
        ok=True,
        content=out.render() + "".join(f"[glob: {note}]\n" for note in notes),
        truncated=truncated,
        truncated_reason=TruncationReason.OUTPUT_CAP if truncated else None,
    )
