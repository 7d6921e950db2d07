"""ctypes bindings of the Linux syscalls the confinement layers need and Python
3.11's `os` lacks (unshare, mount, the new mount API, prctl, Landlock).

Owns the constants and the errno-to-OSError translation; owns no policy. Every
wrapper raises OSError on failure. Stdlib only (the child imports it).

The new-style syscalls (open_tree and later) share one number on every
architecture since Linux 5.1, so only the classic ones go through glibc.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_SECCOMP = 22
PR_GET_SECCOMP = 21
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
SECCOMP_MODE_FILTER = 2

_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_OPEN_TREE_CLONE = 1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_IDMAP = 0x00100000

_NR_OPEN_TREE = 428
_NR_MOVE_MOUNT = 429
_NR_MOUNT_SETATTR = 442
NR_LANDLOCK_CREATE_RULESET = 444
NR_LANDLOCK_ADD_RULE = 445
NR_LANDLOCK_RESTRICT_SELF = 446

MACHINE = os.uname().machine


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


def raw_syscall(number: int, *args: object) -> int:
    """The raw result (-1 on failure with errno set); callers wrap it in check()."""
    return _libc.syscall(number, *args)


def unshare(flags: int) -> None:
    check(_libc.unshare(flags), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def enc(value: str | None) -> bytes | None:
        return None if value is None else value.encode()

    check(_libc.mount(enc(source), target.encode(), enc(fstype), flags, enc(data)), f"mount {target}")


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    """`arg3` may be an address (ctypes.addressof) for PR_SET_SECCOMP."""
    return check(_libc.prctl(option, arg2, arg3, 0, 0), f"prctl({option})")


def clone_tree(path: str) -> int:
    """A detached, recursive copy of the mount tree at `path` (open_tree OPEN_TREE_CLONE)."""
    flags = _OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_RECURSIVE
    return check(raw_syscall(_NR_OPEN_TREE, _AT_FDCWD, path.encode(), flags), f"open_tree {path}")


def set_mount_attr(tree_fd: int, attr_set: int, userns_fd: int = 0) -> None:
    attr = _MountAttr(attr_set, 0, 0, userns_fd)
    result = raw_syscall(_NR_MOUNT_SETATTR, tree_fd, b"", _AT_EMPTY_PATH | _AT_RECURSIVE,
                         ctypes.byref(attr), ctypes.sizeof(attr))  # fmt: skip
    check(result, "mount_setattr")


def attach_tree(tree_fd: int, target: str) -> None:
    result = raw_syscall(_NR_MOVE_MOUNT, tree_fd, b"", _AT_FDCWD, target.encode(), _MOVE_MOUNT_F_EMPTY_PATH)
    check(result, f"move_mount {target}")
