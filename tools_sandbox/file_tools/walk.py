"""Resolving a path beneath a directory without openat2: a component-by-component
walk where every open carries O_NOFOLLOW, so the kernel never follows a link.

Owns the fallback resolution and must match the openat2 rules the jail asks for
(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS), so the two are interchangeable:

- `..` pops back to a directory fd this walk already holds; it never asks the
  kernel for `..`, so it cannot climb above the root, even while directories
  are being renamed around it.
- A symlink is read with readlinkat and its text is spliced into the remaining
  components, then walked by the same rules: an absolute target is refused
  (EXDEV, as RESOLVE_BENEATH does), a relative one stays beneath by construction.
  /proc magic links are symlinks to lstat, so their text (an absolute path or
  `pipe:[…]`) is treated the same way and never followed by the kernel.
- More than 40 links is ELOOP, as in the kernel.

Errors are `OSError` with the errno openat2 would give.
"""

from __future__ import annotations

import errno
import os
import stat

_MAX_LINKS = 40  # the kernel's MAXSYMLINKS


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part not in ("", ".")]


def _read_link(name: str, dir_fd: int) -> str | None:
    """The link's text, or None when `name` is not (or no longer) a symlink."""
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError as error:
        if error.errno == errno.EINVAL:
            return None
        raise


class _Walk:
    """One resolution: the stack of directory fds from the root down."""

    def __init__(self, root_fd: int, path: str) -> None:
        self.path = path
        self.stack = [root_fd]  # stack[0] is the caller's; the rest are ours to close
        self.pending = _components(path)
        self.links = 0

    def close(self) -> None:
        for fd in self.stack[1:]:
            os.close(fd)
        del self.stack[1:]

    def escape(self) -> OSError:
        return OSError(errno.EXDEV, os.strerror(errno.EXDEV), self.path)

    def count_link(self) -> None:
        self.links += 1
        if self.links > _MAX_LINKS:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), self.path)

    def splice(self, target: str) -> None:
        self.count_link()
        if target.startswith("/"):
            raise self.escape()
        self.pending[:0] = _components(target)

    def step_into(self, name: str) -> None:
        """Descend into directory `name`, splicing it in instead when it is a link."""
        flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self.stack.append(os.open(name, flags, dir_fd=self.stack[-1]))
        except OSError as error:
            # O_DIRECTORY|O_NOFOLLOW on a symlink says ENOTDIR (or ELOOP).
            if error.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            target = _read_link(name, self.stack[-1])
            if target is None:
                raise
            self.splice(target)

    def open_last(self, name: str, flags: int, mode: int) -> int | None:
        """Open the final component, or None when it was a link now spliced in."""
        follow = not flags & os.O_NOFOLLOW
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=self.stack[-1])
        except OSError as error:
            if not follow or error.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            target = _read_link(name, self.stack[-1])
            if target is None:
                raise
            self.splice(target)
            return None
        if follow and flags & os.O_PATH and stat.S_ISLNK(os.fstat(fd).st_mode):
            # O_PATH|O_NOFOLLOW hands back the link itself instead of failing.
            os.close(fd)
            target = _read_link(name, self.stack[-1])
            if target is None:  # swapped for a non-link since: look again
                self.count_link()
                self.pending.append(name)
                return None
            self.splice(target)
            return None
        return fd


def walk_open(root_fd: int, path: str, flags: int, mode: int = 0) -> int:
    """Open `path` beneath `root_fd` following only links that stay beneath.

    `flags` are open(2) flags; O_NOFOLLOW in them means the final component is
    not followed (O_PATH then returns the link itself, anything else ELOOP).
    """
    walk = _Walk(root_fd, path)
    try:
        while walk.pending:
            name = walk.pending.pop(0)
            if name == "..":
                if len(walk.stack) == 1:
                    raise walk.escape()
                os.close(walk.stack.pop())
            elif walk.pending:
                walk.step_into(name)
            else:
                fd = walk.open_last(name, flags, mode)
                if fd is not None:
                    return fd
        # The path named a directory we are already in (".", "a/..", a link to one).
        return os.open(".", flags | os.O_CLOEXEC, mode, dir_fd=walk.stack[-1])
    finally:
        walk.close()
