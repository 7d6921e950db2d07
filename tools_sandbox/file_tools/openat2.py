"""The `openat2(2)` system call, bound through ctypes.

Owns the binding and its probe, nothing about workspaces. Python's `os` has no
openat2, and only openat2 lets the kernel resolve a whole path beneath a
directory atomically (RESOLVE_BENEATH) while refusing /proc magic links
(RESOLVE_NO_MAGICLINKS): no check-then-open window for a rename or a swapped
symlink to slip through.

Errors come back as `OSError` with the kernel's errno: EXDEV when resolution
would leave the directory (`..`, an absolute path or an absolute symlink), ELOOP
for a magic link or too many links.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections.abc import Callable

# Syscall 437 since Linux 5.6; x86_64 and aarch64 share the generic number.
_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}.get(platform.machine())

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08

# EAGAIN: the kernel saw a concurrent rename during a RESOLVE_BENEATH walk and
# could not prove the result stays beneath; it asks the caller to try again.
_EAGAIN_RETRIES = 16


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class Openat2:
    """A loaded binding; build one with `Openat2.load()`, which says None when the
    architecture or the C library offers no way to make the call."""

    def __init__(self, syscall: Callable[..., int], number: int) -> None:
        self._syscall = syscall
        self._number = number

    @classmethod
    def load(cls) -> Openat2 | None:
        if _SYS_OPENAT2 is None:
            return None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            return None
        syscall = libc.syscall
        syscall.restype = ctypes.c_long
        return cls(syscall, _SYS_OPENAT2)

    def open(self, dir_fd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
        """Open `path` relative to `dir_fd`; the new fd is close-on-exec."""
        how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & (os.O_CREAT | os.O_TMPFILE) else 0, resolve)
        encoded = os.fsencode(path)
        for _ in range(_EAGAIN_RETRIES):
            fd = self._syscall(
                ctypes.c_long(self._number), ctypes.c_int(dir_fd), ctypes.c_char_p(encoded),
                ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)),
            )  # fmt: skip
            if fd >= 0:
                return int(fd)
            code = ctypes.get_errno()
            if code not in (errno.EAGAIN, errno.EINTR):
                raise OSError(code, os.strerror(code), path)
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)

    def works(self, dir_fd: int) -> bool:
        """Whether the call really runs here: an old kernel says ENOSYS, a seccomp
        filter typically EPERM or ENOSYS."""
        try:
            os.close(self.open(dir_fd, ".", os.O_PATH | os.O_DIRECTORY, RESOLVE_BENEATH))
        except OSError:
            return False
        return True
