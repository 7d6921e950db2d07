"""Who the child is after setup: the unprivileged uid, no capabilities, no way
to gain privileges through execve, and no life beyond its parent.

Owns the order of the credential change (groups, then gid, then uid: after
setresuid the process could no longer change the others). Stdlib only.
"""

from __future__ import annotations

import errno
import os
import select
import signal

from bastion.tools_sandbox.confine import syscalls


def drop_bounding_set() -> None:
    """Empty the capability bounding set (needs CAP_SETPCAP, so before the uid drop)."""
    for capability in range(64):
        try:
            syscalls.prctl(syscalls.PR_CAPBSET_DROP, capability)
        except OSError as error:
            if error.errno == errno.EINVAL:  # past the kernel's last capability
                return
            raise


def drop_to(uid: int) -> None:
    """Become `uid`/`uid` with no supplementary groups, irrevocably."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid) or os.getgroups():
        raise OSError(f"credentials did not change to {uid}")
    try:
        os.setresuid(0, 0, 0)
    except PermissionError:
        return
    raise OSError("root could be regained after the uid drop")


def forbid_new_privileges() -> None:
    syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)


def no_new_privileges_set() -> bool:
    return syscalls.prctl(syscalls.PR_GET_NO_NEW_PRIVS) == 1


def die_with_parent(alive_fd: int) -> None:
    """SIGKILL this process when its parent dies.

    Set after the uid drop because a credential change clears it. `alive_fd` is
    the read end of a pipe whose write end only the parent holds: a hang-up
    means the parent died before the signal was armed, which getppid() cannot
    tell inside a new PID namespace (it reads 0 there)."""
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
    poller = select.poll()
    poller.register(alive_fd, select.POLLHUP | select.POLLIN)
    if poller.poll(0):
        os._exit(signal.SIGKILL + 128)
