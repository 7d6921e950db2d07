"""Walking directories beneath the workspace by fd, never through a link.

Owns listing one directory (`entries`) and the depth-first walk that list_dir,
glob and grep share. The walk starts from a directory fd the jail resolved and
opens every child with O_DIRECTORY|O_NOFOLLOW relative to its parent's fd, so
a symlinked directory is listed as a link and never entered: no loops, and no
way out of the workspace however the tree is laid out. Bounded by an entry
budget and a depth, because a model can point it at a huge tree.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterator

import msgspec

MAX_DEPTH = 64


class EntryKind(enum.Enum):
    FILE = "file"
    DIR = "dir"
    LINK = "link"
    SPECIAL = "special"  # FIFO, socket, device


class Entry(msgspec.Struct, frozen=True):
    name: str
    kind: EntryKind


def _kind(entry: os.DirEntry[str]) -> EntryKind:
    if entry.is_symlink():
        return EntryKind.LINK
    if entry.is_dir(follow_symlinks=False):
        return EntryKind.DIR
    if entry.is_file(follow_symlinks=False):
        return EntryKind.FILE
    return EntryKind.SPECIAL


def entries(dir_fd: int) -> list[Entry]:
    """The directory's entries sorted by name (the fd is not consumed)."""
    with os.scandir(dir_fd) as found:
        listed = []
        for entry in found:
            try:
                listed.append(Entry(entry.name, _kind(entry)))
            except OSError:
                continue  # removed while we looked
    return sorted(listed, key=lambda e: e.name)


def open_child_dir(dir_fd: int, name: str) -> int | None:
    """A read fd on subdirectory `name`, or None when it is gone, a link or unreadable."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None


class TreeWalk:
    """One bounded walk; after it, `exhausted` and `too_deep` say what was cut."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.seen = 0
        self.exhausted = False
        self.too_deep = False

    def walk(self, dir_fd: int, parts: list[str],
             descend: Callable[[list[str]], bool]) -> Iterator[tuple[list[str], Entry, int]]:  # fmt: skip
        """Yield (path components, entry, its parent's fd) depth-first; enter a
        directory when `descend(its components)` says so. The parent fd is valid
        only until the next item."""
        try:
            listed = entries(dir_fd)
        except OSError:
            return
        for entry in listed:
            if self.seen >= self.max_entries:
                self.exhausted = True
                return
            self.seen += 1
            path = [*parts, entry.name]
            yield path, entry, dir_fd
            if entry.kind is not EntryKind.DIR or not descend(path):
                continue
            if len(path) >= MAX_DEPTH:
                self.too_deep = True
                continue
            child = open_child_dir(dir_fd, entry.name)
            if child is None:
                continue
            try:
                yield from self.walk(child, path, descend)
            finally:
                os.close(child)
            if self.exhausted:
                return
