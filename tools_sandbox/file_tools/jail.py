"""The workspace jail: every path a file tool touches is opened through here.

Owns turning a caller's path into a workspace-relative one, resolving it
beneath the workspace directory fd (opened once per call), and saying in plain
words why a path was refused. It must not decide what is allowed inside the
workspace (protected paths are policy's business) and must not print host paths
beyond the workspace.

The rules, whichever resolver runs (openat2, or the O_NOFOLLOW walk in walk.py):
- an absolute path must lie inside the workspace, compared component by
  component (so `/ws-evil` is not inside `/ws`); it then becomes relative;
- `..` may not climb above the workspace, lexically first (for a clear message)
  and again by the resolver (for links);
- symlinks are followed only while they stay beneath the workspace: an absolute
  symlink, or a relative one that climbs out, is refused (EXDEV);
- /proc magic links are never followed (RESOLVE_NO_MAGICLINKS, or the walk's
  never-let-the-kernel-follow rule).
Every open resolves the whole path in one kernel call (or one fd-held walk), so
there is no check-then-open window for a swapped symlink.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from types import TracebackType

from bastion.tools_sandbox.file_tools.errors import FileToolError
from bastion.tools_sandbox.file_tools.job import ResolveMode
from bastion.tools_sandbox.file_tools.openat2 import RESOLVE_BENEATH, RESOLVE_NO_MAGICLINKS, Openat2
from bastion.tools_sandbox.file_tools.walk import walk_open

_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFREG: "a regular file",
}


def kind_of(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "a special file")


def _parts(path: str) -> list[str]:
    return [part for part in path.split("/") if part not in ("", ".")]


class Jail:
    """An open workspace directory and the resolver that opens paths beneath it.

    Use as a context manager; the workspace fd is closed on exit.
    """

    def __init__(self, root_fd: int, roots: list[list[str]], openat2: Openat2 | None, writable: bool) -> None:
        self.root_fd = root_fd
        self._roots = roots  # the workspace as given and as the kernel sees it, as components
        self._openat2 = openat2  # None: the walk
        self.writable = writable

    @classmethod
    def at(cls, workspace: str, mode: ResolveMode, writable: bool) -> Jail:
        if not workspace.startswith("/"):
            raise FileToolError("the workspace must be an absolute path")
        try:
            root_fd = os.open(workspace, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as error:
            raise FileToolError(f"the workspace cannot be opened: {error.strerror}") from error
        roots = [_parts(os.path.normpath(workspace)), _parts(os.path.realpath(workspace))]
        openat2 = None
        if mode is not ResolveMode.WALK:
            openat2 = Openat2.load()
            if openat2 is not None and not openat2.works(root_fd):
                openat2 = None
            if openat2 is None and mode is ResolveMode.OPENAT2:
                os.close(root_fd)
                raise FileToolError("openat2 is not available here and the job asked for it alone")
        return cls(root_fd, roots, openat2, writable)

    @property
    def resolver(self) -> ResolveMode:
        return ResolveMode.WALK if self._openat2 is None else ResolveMode.OPENAT2

    def __enter__(self) -> Jail:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        os.close(self.root_fd)

    def relative(self, path: str) -> str:
        """`path` as a normalised workspace-relative path ("." for the workspace)."""
        if not path:
            raise FileToolError("the path is empty")
        if "\0" in path:
            raise FileToolError("refused: the path contains a NUL byte")
        rest = path
        if path.startswith("/"):
            parts = _parts(path)
            root = next((r for r in self._roots if parts[: len(r)] == r), None)
            if root is None:
                raise FileToolError(
                    f"refused: '{path}' is outside the workspace (absolute paths must lie inside it)"
                )
            rest = "/".join(parts[len(root) :]) or "."
        normal = posixpath.normpath(rest)
        if normal == ".." or normal.startswith("../"):
            raise FileToolError(f"refused: '{path}' climbs out of the workspace with '..'")
        return normal

    def resolve(self, rel: str, flags: int, mode: int = 0) -> int:
        """An fd for workspace-relative `rel` (from `relative`), or the resolver's
        `OSError`; close the fd yourself."""
        if self._openat2 is None:
            return walk_open(self.root_fd, rel, flags, mode)
        return self._openat2.open(self.root_fd, rel, flags, _RESOLVE, mode)

    def open(self, rel: str, flags: int, mode: int = 0) -> int:
        """`resolve`, with failures told as a `FileToolError`."""
        try:
            return self.resolve(rel, flags, mode)
        except OSError as error:
            raise refusal(rel, error) from error

    def open_regular(self, rel: str) -> tuple[int, os.stat_result]:
        """A read-only fd on a regular file, refusing FIFOs, devices, sockets and
        directories without opening them for reading (a FIFO would block, a device
        open can act)."""
        probe = self.open(rel, os.O_PATH)
        try:
            before = os.fstat(probe)
        finally:
            os.close(probe)
        if not stat.S_ISREG(before.st_mode):
            raise FileToolError(f"refused: '{rel}' is {kind_of(before.st_mode)}, not a regular file")
        # Resolved again, so it may have been swapped since the probe: O_NONBLOCK keeps a
        # FIFO from blocking and the identity check refuses anything but the probed file.
        fd = self.open(rel, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino) or not stat.S_ISREG(now.st_mode):
            os.close(fd)
            raise FileToolError(f"refused: '{rel}' changed while it was being opened")
        return fd, now

    def open_dir(self, rel: str) -> int:
        try:
            return self.open(rel, os.O_RDONLY | os.O_DIRECTORY)
        except FileToolError as error:
            if isinstance(error.__cause__, OSError) and error.__cause__.errno == errno.ENOTDIR:
                raise FileToolError(f"'{rel}' is not a directory") from error
            raise

    def stays_inside(self, rel: str) -> bool:
        """Whether `rel`, links followed, resolves to something beneath the workspace."""
        try:
            os.close(self.open(rel, os.O_PATH))
        except FileToolError:
            return False
        return True


def refusal(rel: str, error: OSError) -> FileToolError:
    """What an errno from resolving `rel` means, in words that leak no host path."""
    code = error.errno
    if code == errno.EXDEV:
        return FileToolError(
            f"refused: '{rel}' leads outside the workspace (a symbolic link on it points out)"
        )
    if code == errno.ELOOP:
        return FileToolError(
            f"refused: '{rel}' goes through a /proc magic link, a symbolic link where none may be, "
            "or too many symbolic links"
        )
    if code == errno.ENOENT:
        return FileToolError(f"'{rel}' does not exist")
    if code == errno.ENOTDIR:
        return FileToolError(f"'{rel}': a part of the path is not a directory")
    if code in (errno.EACCES, errno.EPERM):
        return FileToolError(f"permission denied: '{rel}'")
    if code == errno.ENXIO:
        return FileToolError(f"refused: '{rel}' is a special file (a socket or a FIFO)")
    if code == errno.EISDIR:
        return FileToolError(f"'{rel}' is a directory")
    return FileToolError(f"cannot open '{rel}': {os.strerror(code) if code else error}")
