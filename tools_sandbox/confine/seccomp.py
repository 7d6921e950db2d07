"""The seccomp deny-list, as a classic BPF program built by hand (no libseccomp).

Owns the syscall tables per architecture and the program. Denied with EPERM:
tracing and cross-process memory access, mounting and namespaces, kernel
keyrings, BPF, module and kexec loading, io_uring (its operations would bypass
this filter), perf and userfaultfd; `socket` for every family but AF_UNIX;
`ioctl` TIOCSTI/TIOCLINUX (typing into a terminal); `clone` with any
namespace flag; any chmod/open/mknod mode with the setuid or setgid bit (files
in the idmapped workspace are written as their owner, root, so such a bit would
make a root setuid binary on disk). `clone3` and `openat2` get ENOSYS (their
flags and mode sit behind a pointer BPF cannot read), which makes libc fall
back to `clone` and callers to `openat`. Another architecture's syscall
ABI (x32, i386 via int 0x80) kills the process. Stdlib only.
"""

from __future__ import annotations

import ctypes
import errno
import struct

from bastion.tools_sandbox.confine import syscalls

_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K

_RET_KILL_PROCESS = 0x80000000
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000

_OFFSET_NR = 0
_OFFSET_ARCH = 4


def _arg_low(index: int) -> int:
    return 16 + 8 * index  # low 32 bits of args[index] on little-endian machines


AF_UNIX = 1
_TIOCSTI = 0x5412
_TIOCLINUX = 0x541C
_CLONE_NAMESPACES = (syscalls.CLONE_NEWNS | syscalls.CLONE_NEWCGROUP | syscalls.CLONE_NEWUTS
                     | syscalls.CLONE_NEWIPC | syscalls.CLONE_NEWUSER | syscalls.CLONE_NEWPID
                     | syscalls.CLONE_NEWNET)  # fmt: skip

DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root", "chroot",
    "unshare", "setns", "bpf", "keyctl", "add_key", "request_key", "kexec_load", "kexec_file_load",
    "init_module", "finit_module", "delete_module", "perf_event_open", "userfaultfd", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount",
    "fspick", "mount_setattr", "open_by_handle_at", "acct", "swapon", "swapoff", "reboot", "syslog",
    "quotactl", "vhangup",
)  # fmt: skip


class Arch:
    def __init__(self, audit: int, numbers: dict[str, int], foreign_from: int | None) -> None:
        self.audit = audit
        self.numbers = numbers
        self.foreign_from = foreign_from  # syscall numbers at or above this are another ABI


_COMMON = {"io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428,
           "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
           "clone3": 435, "openat2": 437, "mount_setattr": 442, "fchmodat2": 452}  # fmt: skip

# Syscalls that can put a mode on a file, and which argument holds it. The idmapped workspace
# writes as its owner (root), so a setuid/setgid bit set here would be a root setuid file on disk.
MODE_ARGUMENT = {"chmod": 1, "fchmod": 1, "fchmodat": 2, "fchmodat2": 2, "open": 2, "openat": 3, "creat": 1,
                 "mknod": 1, "mknodat": 2}  # fmt: skip
_SETID_BITS = 0o6000

ARCHES = {
    "x86_64": Arch(0xC000003E, _COMMON | {
        "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "mount": 165, "umount2": 166,
        "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308, "bpf": 321, "keyctl": 250,
        "add_key": 248, "request_key": 249, "kexec_load": 246, "kexec_file_load": 320, "init_module": 175,
        "finit_module": 313, "delete_module": 176, "perf_event_open": 298, "userfaultfd": 323,
        "open_by_handle_at": 304, "acct": 163, "swapon": 167, "swapoff": 168, "reboot": 169, "syslog": 103,
        "quotactl": 179, "vhangup": 153, "socket": 41, "ioctl": 16, "clone": 56,
        "chmod": 90, "fchmod": 91, "fchmodat": 268, "open": 2, "openat": 257, "creat": 85, "mknod": 133,
        "mknodat": 259,
    }, foreign_from=0x40000000),
    "aarch64": Arch(0xC00000B7, _COMMON | {
        "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "mount": 40, "umount2": 39,
        "pivot_root": 41, "chroot": 51, "unshare": 97, "setns": 268, "bpf": 280, "keyctl": 219,
        "add_key": 217, "request_key": 218, "kexec_load": 104, "kexec_file_load": 294, "init_module": 105,
        "finit_module": 273, "delete_module": 106, "perf_event_open": 241, "userfaultfd": 282,
        "open_by_handle_at": 265, "acct": 89, "swapon": 224, "swapoff": 225, "reboot": 142, "syslog": 116,
        "quotactl": 60, "vhangup": 58, "socket": 198, "ioctl": 29, "clone": 220,
        "fchmod": 52, "fchmodat": 53, "openat": 56, "mknodat": 33,
    }, foreign_from=None),
}  # fmt: skip


def _ins(code: int, k: int, jt: int = 0, jf: int = 0) -> tuple[int, int, int, int]:
    return (code, jt, jf, k)


def _deny(error: int = errno.EPERM) -> tuple[int, int, int, int]:
    return _ins(_RET_K, _RET_ERRNO | error)


def program(arch: Arch) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions; each check jumps only locally."""
    nr = arch.numbers
    load_nr = _ins(_LD_W_ABS, _OFFSET_NR)
    prog = [
        _ins(_LD_W_ABS, _OFFSET_ARCH),
        _ins(_JEQ_K, arch.audit, jt=1),
        _ins(_RET_K, _RET_KILL_PROCESS),
        load_nr,
    ]
    if arch.foreign_from is not None:
        prog += [_ins(_JGE_K, arch.foreign_from, jf=1), _ins(_RET_K, _RET_KILL_PROCESS)]
    for name in DENIED:
        prog += [_ins(_JEQ_K, nr[name], jf=1), _deny()]
    # Their flags or mode sit behind a pointer BPF cannot read: ENOSYS makes callers fall back.
    for name in ("clone3", "openat2"):
        prog += [_ins(_JEQ_K, nr[name], jf=1), _deny(errno.ENOSYS)]
    for name, index in MODE_ARGUMENT.items():
        if name in nr:
            prog += [
                _ins(_JEQ_K, nr[name], jf=4),
                _ins(_LD_W_ABS, _arg_low(index)),
                _ins(_JSET_K, _SETID_BITS, jf=1),
                _deny(),
                _ins(_RET_K, _RET_ALLOW),
            ]
    # Argument checks: each block ends in a return, so only the jf skips it.
    prog += [
        _ins(_JEQ_K, nr["socket"], jf=4),
        _ins(_LD_W_ABS, _arg_low(0)),
        _ins(_JEQ_K, AF_UNIX, jf=1),
        _ins(_RET_K, _RET_ALLOW),
        _deny(errno.EAFNOSUPPORT),
        _ins(_JEQ_K, nr["ioctl"], jf=5),
        _ins(_LD_W_ABS, _arg_low(1)),
        _ins(_JEQ_K, _TIOCSTI, jt=2),
        _ins(_JEQ_K, _TIOCLINUX, jt=1),
        _ins(_RET_K, _RET_ALLOW),
        _deny(),
        _ins(_JEQ_K, nr["clone"], jf=4),
        _ins(_LD_W_ABS, _arg_low(0)),
        _ins(_JSET_K, _CLONE_NAMESPACES, jf=1),
        _deny(),
        _ins(_RET_K, _RET_ALLOW),
        _ins(_RET_K, _RET_ALLOW),
    ]
    return prog


def encode(prog: list[tuple[int, int, int, int]]) -> bytes:
    """struct sock_filter[]: u16 code, u8 jt, u8 jf, u32 k."""
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(machine: str = syscalls.MACHINE) -> None:
    """Load the filter into this thread (inherited by execve and children). Needs no-new-privs."""
    arch = ARCHES.get(machine)
    if arch is None:
        raise OSError(f"no seccomp syscall table for {machine}")
    prog = program(arch)
    buffer = ctypes.create_string_buffer(encode(prog))
    fprog = _SockFprog(len(prog), ctypes.cast(buffer, ctypes.c_void_p))
    syscalls.prctl(syscalls.PR_SET_SECCOMP, syscalls.SECCOMP_MODE_FILTER, ctypes.addressof(fprog))


def active() -> bool:
    return syscalls.prctl(syscalls.PR_GET_SECCOMP) == syscalls.SECCOMP_MODE_FILTER
