"""Where a path a tool names points, relative to the workspace.

Owns `place`: the lexical reading of a path (`..` and `.` folded, absolute
paths compared segment by segment, so `/ws-evil` is not inside `/ws`) and, when
the workspace exists, the reading after following symlinks. Policy must hold
for both, since a link inside the workspace can point into `.git/hooks` or out
of the workspace altogether. The sandbox resolves paths again, race-free, when
the tool runs; this is the policy's view, not the wall.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import msgspec


class Placement(msgspec.Struct, frozen=True, kw_only=True):
    # Workspace-relative segments: the lexical reading first, then the resolved one if it differs.
    readings: tuple[tuple[str, ...], ...] = ()
    outside: str | None = None  # why the path is not in the workspace; None when it is


def place(path: str, workspace: Path) -> Placement:
    if "\x00" in path:
        return Placement(outside=f"{path!r} contains a NUL byte")
    if path.startswith("~"):
        return Placement(outside=f"{path} is under the home directory, outside the workspace")
    root = os.path.abspath(workspace)
    real_root = os.path.realpath(workspace)
    joined = os.path.normpath(path if os.path.isabs(path) else os.path.join(root, path))
    lexical = _within(joined, root)
    if lexical is None:
        lexical = _within(joined, real_root)
    if lexical is None:
        return Placement(outside=f"{path} is outside the workspace")
    # The kernel follows a symlink before applying the `..` after it; realpath does the same.
    resolved = _within(os.path.realpath(os.path.join(real_root, path)), real_root)
    if resolved is None:
        return Placement(outside=f"{path} resolves outside the workspace (through a symlink)")
    readings = (lexical,) if resolved == lexical else (lexical, resolved)
    return Placement(readings=readings)


def _within(path: str, root: str) -> tuple[str, ...] | None:
    try:
        return PurePosixPath(path).relative_to(PurePosixPath(root)).parts
    except ValueError:
        return None


def display(segments: tuple[str, ...]) -> str:
    return "/".join(segments) or "."
