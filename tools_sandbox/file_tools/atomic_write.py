"""Writing a file inside the workspace: parents created beneath it, content
replaced atomically, never through a link.

Owns the one code path that changes the file system, so it also re-checks
`Jail.writable` (defence in depth behind the dispatcher's check).

How a write goes:
1. the parent directory is resolved through the jail (missing directories are
   made one `mkdirat` at a time, each parent re-resolved beneath the workspace)
   and held open as an fd, so later renames of the path cannot redirect us;
2. the final name is lstat'ed in that directory: a symlink, a directory or a
   special file there is refused, so nothing is ever written through a link;
3. the content goes to a new temp file in the same directory (O_CREAT|O_EXCL|
   O_NOFOLLOW), is fsync'ed, and renamed over the name, then the directory is
   fsync'ed. rename(2) replaces the directory entry and never follows it, so
   the check in 2 needs no lock: whatever was swapped in meanwhile is replaced,
   not written into.
A hard-linked target (st_nlink > 1, maybe a link to a file outside the
workspace) is therefore never modified: the name gets a new inode and the
other links keep the old content; the result says so.
"""

from __future__ import annotations

import errno
import os
import posixpath
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager

import msgspec

from bastion.tools_sandbox.file_tools.errors import FileToolError
from bastion.tools_sandbox.file_tools.jail import Jail, kind_of, refusal

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY


class WriteTarget(msgspec.Struct, frozen=True, kw_only=True):
    """Where a write lands: an open parent directory and the name inside it."""

    dir_fd: int
    name: str
    rel: str
    created: list[str]  # directories this call made, workspace-relative
    existing: os.stat_result | None  # the name's lstat, None when it is new


@contextmanager
def open_target(jail: Jail, rel: str, create_parents: bool) -> Iterator[WriteTarget]:
    """Resolve `rel`'s parent (made when asked), check what its name holds now,
    and keep the parent open for the duration."""
    parent, name = posixpath.split(rel)
    if name in ("", ".", ".."):
        raise FileToolError(f"'{rel}' names a directory, not a file")
    parent = parent or "."
    created = _make_parents(jail, parent) if create_parents else []
    dir_fd = jail.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            existing = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        except OSError as error:
            raise refusal(rel, error) from error
        if existing is not None:
            _refuse_non_regular(rel, existing.st_mode)
        yield WriteTarget(dir_fd=dir_fd, name=name, rel=rel, created=created, existing=existing)
    finally:
        os.close(dir_fd)


def _refuse_non_regular(rel: str, mode: int) -> None:
    if stat.S_ISLNK(mode):
        raise FileToolError(f"refused: '{rel}' is a symbolic link; file tools never write through links")
    if not stat.S_ISREG(mode):
        raise FileToolError(f"refused: '{rel}' is {kind_of(mode)}; only regular files are written")


def _make_parents(jail: Jail, parent: str) -> list[str]:
    try:
        os.close(jail.resolve(parent, _DIR_FLAGS))
        return []
    except OSError as error:
        if error.errno != errno.ENOENT:
            raise refusal(parent, error) from error
    made = []
    parts = parent.split("/")
    for depth in range(1, len(parts) + 1):
        here = "/".join(parts[:depth])
        try:
            os.close(jail.resolve(here, _DIR_FLAGS))
            continue
        except OSError as error:
            if error.errno != errno.ENOENT:
                raise refusal(here, error) from error
        base = jail.open("/".join(parts[: depth - 1]) or ".", _DIR_FLAGS)
        try:
            os.mkdir(parts[depth - 1], 0o777, dir_fd=base)
            made.append(here)
        except FileExistsError:
            pass  # made meanwhile, or a dangling link: the next resolve decides
        except OSError as error:
            raise refusal(here, error) from error
        finally:
            os.close(base)
    return made


def replace_contents(jail: Jail, target: WriteTarget, data: bytes) -> None:
    """Put `data` at the target via temp file + fsync + rename."""
    if not jail.writable:
        raise FileToolError("refused: file writes are off for this session")
    existing = target.existing
    temp = f".bastion-{secrets.token_hex(8)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600 if existing else 0o666, dir_fd=target.dir_fd)  # fmt: skip
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if existing is not None:
                os.fchmod(fd, stat.S_IMODE(existing.st_mode) & 0o777)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, target.name, src_dir_fd=target.dir_fd, dst_dir_fd=target.dir_fd)
    except BaseException:
        try:
            os.unlink(temp, dir_fd=target.dir_fd)
        except OSError:
            pass
        raise
    os.fsync(target.dir_fd)


def describe(target: WriteTarget) -> str:
    """What the write did beyond the content, for the result."""
    notes = []
    if target.created:
        notes.append("created " + ", ".join(f"{d}/" for d in target.created))
    if target.existing is not None and target.existing.st_nlink > 1:
        notes.append(
            f"'{target.rel}' had {target.existing.st_nlink} hard links: it now names a new file and the "
            "other links keep the old content"
        )
    return "".join(f"\n({note})" for note in notes)
