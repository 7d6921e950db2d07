"""grep: lines matching a Python regular expression.

Arguments: `GrepArgs(pattern, path=".", glob=None)`. `path` is a file or a
directory (walked depth-first, sorted, dot-names skipped as ripgrep does,
symlinks never followed: tree.py). `glob` keeps only files whose
workspace-relative path matches it; a glob without `/` is matched against the
file name alone (`*.py`), as ripgrep's `-g` does. Content: `path:line: text`
per matching line, paths relative to the workspace, lines 1-based and cut at
`MAX_LINE_CHARS`. Binary files (a NUL in the first 8 KiB), special files and
files over `MAX_FILE_BYTES` are skipped and counted in a note. At most
`MAX_MATCHES` lines and `MAX_SCANNED` entries; past those, or past
`limits.max_output_bytes`, the result is truncated (OUTPUT_CAP).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable

from bastion.protocol.sandbox_wire import GrepArgs, ToolEnvelope, ToolLimits, TruncationReason
from bastion.tools_sandbox.file_tools.errors import FileToolError
from bastion.tools_sandbox.file_tools.glob import MAX_SCANNED, parse_pattern
from bastion.tools_sandbox.file_tools.jail import Jail, kind_of
from bastion.tools_sandbox.file_tools.output_cap import HeadTail
from bastion.tools_sandbox.file_tools.text import SNIFF_BYTES, decode, looks_binary
from bastion.tools_sandbox.file_tools.tree import EntryKind, TreeWalk

MAX_MATCHES = 1000
MAX_LINE_CHARS = 300
MAX_FILE_BYTES = 16 * 1024 * 1024
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class _Search:
    """One grep call's running state."""

    def __init__(self, regex: re.Pattern[str], limits: ToolLimits) -> None:
        self.regex = regex
        self.out = HeadTail(limits.max_output_bytes)
        self.matches = 0
        self.files = 0
        self.skipped_binary = 0
        self.skipped_large = 0

    @property
    def full(self) -> bool:
        return self.matches >= MAX_MATCHES

    def search(self, fd: int, path: str) -> None:
        """Search an open fd (consumed), skipping anything but a small text file."""
        with os.fdopen(fd, "rb") as file:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return
            if info.st_size > MAX_FILE_BYTES:
                self.skipped_large += 1
                return
            if looks_binary(os.pread(fd, SNIFF_BYTES, 0)):
                self.skipped_binary += 1
                return
            self.files += 1
            for number, raw in enumerate(file, start=1):
                line = decode(raw)[0].rstrip("\r\n")
                if self.regex.search(line) is None:
                    continue
                if len(line) > MAX_LINE_CHARS:
                    line = line[:MAX_LINE_CHARS] + "…"
                self.out.write(f"{path}:{number}: {line}\n")
                self.matches += 1
                if self.full:
                    return


def grep(args: GrepArgs, jail: Jail, limits: ToolLimits) -> ToolEnvelope:
    try:
        regex = re.compile(args.pattern)
    except re.error as error:
        raise FileToolError(f"invalid regular expression {args.pattern!r}: {error}") from error
    keep = _file_filter(jail, args.glob)
    rel = jail.relative(args.path)
    probe = jail.open(rel, os.O_PATH)
    try:
        mode = os.fstat(probe).st_mode
    finally:
        os.close(probe)
    search = _Search(regex, limits)
    walk = TreeWalk(MAX_SCANNED)
    if stat.S_ISDIR(mode):
        _search_tree(jail, rel, keep, search, walk)
    elif stat.S_ISREG(mode):
        fd, _ = jail.open_regular(rel)
        search.search(fd, rel)
    else:
        raise FileToolError(f"refused: '{rel}' is {kind_of(mode)}; grep searches files and directories")
    return _envelope(search, walk)


def _file_filter(jail: Jail, glob: str | None) -> Callable[[list[str]], bool]:
    if glob is None:
        return lambda parts: True
    pattern = parse_pattern(jail, glob)
    if "/" in glob:
        return pattern.match
    return lambda parts: pattern.match(parts[-1:])


def _search_tree(
    jail: Jail, rel: str, keep: Callable[[list[str]], bool], search: _Search, walk: TreeWalk
) -> None:
    root = jail.open_dir(rel)
    base = [] if rel == "." else rel.split("/")
    try:
        for parts, entry, parent in walk.walk(root, base, lambda p: not p[-1].startswith(".")):
            if entry.kind is not EntryKind.FILE or entry.name.startswith(".") or not keep(parts):
                continue
            try:
                fd = os.open(entry.name, _FILE_FLAGS, dir_fd=parent)
            except OSError:
                continue  # swapped for a link (ELOOP), removed, unreadable: not ours to search
            search.search(fd, "/".join(parts))
            if search.full:
                break
    finally:
        os.close(root)


def _envelope(search: _Search, walk: TreeWalk) -> ToolEnvelope:
    notes = []
    if not search.matches:
        notes.append(f"no matches in {search.files} files searched")
    if search.full:
        notes.append(f"stopped at {MAX_MATCHES} matching lines; narrow the pattern or the path")
    if walk.exhausted:
        notes.append(f"stopped after looking at {MAX_SCANNED} entries; narrow the path or the glob")
    if walk.too_deep:
        notes.append("directories nested too deeply were not entered")
    if search.skipped_binary:
        notes.append(f"skipped {search.skipped_binary} binary files")
    if search.skipped_large:
        notes.append(f"skipped {search.skipped_large} files over {MAX_FILE_BYTES} bytes")
    truncated = search.out.truncated or search.full or walk.exhausted
    return ToolEnvelope(
        ok=True,
        content=search.out.render() + "".join(f"[grep: {note}]\n" for note in notes),
        truncated=truncated,
        truncated_reason=TruncationReason.OUTPUT_CAP if truncated else None,
    )
