"""The Landlock ruleset: the file system the tool may touch, and nothing else.

Owns the access masks per ABI version and the rules: system and runtime paths
read-and-execute, the workspace read (and write when the call is writable),
the per-call HOME read-write, a few device files. Every TCP bind/connect is
denied (ABI 4+), and signals and abstract unix sockets cannot leave the
domain (ABI 6+). Everything not named is denied, /proc included, which is what
stops `/proc/<pid>/environ` and `/proc/self/root` escapes. Stdlib only.
"""

from __future__ import annotations

import ctypes
import os
import stat
from collections.abc import Iterable

from bastion.tools_sandbox.confine import syscalls

_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1

EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5
_NET_BIND_TCP = 1 << 0  # ABI 4
_NET_CONNECT_TCP = 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
_SCOPE_SIGNAL = 1 << 1

_FILE_ONLY = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
READ = EXECUTE | READ_FILE | READ_DIR
WRITE = (WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | MAKE_SYM | MAKE_FIFO | MAKE_SOCK
         | REFER | TRUNCATE)  # fmt: skip
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # the kernel struct is __attribute__((packed))
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def abi_version() -> int:
    """0 when the kernel has no Landlock or it is disabled."""
    result = syscalls.raw_syscall(syscalls.NR_LANDLOCK_CREATE_RULESET, None, 0, _CREATE_RULESET_VERSION)
    return max(int(result), 0)


def handled_fs(abi: int) -> int:
    mask = (1 << 13) - 1
    if abi >= 2:
        mask |= REFER
    if abi >= 3:
        mask |= TRUNCATE
    if abi >= 5:
        mask |= IOCTL_DEV
    return mask


def restrict(*, read: Iterable[str], read_write: Iterable[str], devices: Iterable[str] = DEVICES) -> int:
    """Apply the ruleset to this thread and its future children; returns the ABI used.

    Needs no-new-privs set first. Paths that do not exist are skipped."""
    abi = abi_version()
    if abi < 1:
        raise OSError("Landlock is not available")
    handled = handled_fs(abi)
    attr = _RulesetAttr(handled, _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0,
                        _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if abi >= 6 else 0)  # fmt: skip
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = syscalls.check(
        syscalls.raw_syscall(syscalls.NR_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), size, 0),
        "landlock_create_ruleset",
    )
    try:
        for path in read:
            _allow(ruleset, path, READ & handled)
        for path in read_write:
            _allow(ruleset, path, (READ | WRITE) & handled)
        for path in devices:
            _allow(ruleset, path, (READ_FILE | WRITE_FILE) & handled)
        syscalls.check(syscalls.raw_syscall(syscalls.NR_LANDLOCK_RESTRICT_SELF, ruleset, 0),
                       "landlock_restrict_self")  # fmt: skip
    finally:
        os.close(ruleset)
    return abi


def _allow(ruleset: int, path: str, access: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= _FILE_ONLY
        rule = _PathBeneathAttr(access, fd)
        syscalls.check(syscalls.raw_syscall(syscalls.NR_LANDLOCK_ADD_RULE, ruleset, _RULE_PATH_BENEATH,
                                            ctypes.byref(rule), 0), f"landlock_add_rule {path}")  # fmt: skip
    finally:
        os.close(fd)
