"""How a worker process ends: exit codes, stop requests, dying with its parent.

Exit codes are the worker's only word to a supervisor that may no longer be
listening, so each one means one thing:

    0  clean exit (Shutdown message, SIGTERM/SIGINT)
    1  the model could not be loaded (WorkerLoadFailed was sent first)
    2  bad command line (argparse)
    3  protocol mismatch in the handshake
    4  the supervisor is gone: no handshake answer, heartbeats stopped,
       the parent died, or the hello was refused
    5  an internal error in the process shell
"""

from __future__ import annotations

import ctypes
import enum
import logging
import os
import signal
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class ExitCode(enum.IntEnum):
    OK = 0
    LOAD_FAILED = 1
    USAGE = 2
    PROTOCOL_MISMATCH = 3
    SUPERVISOR_LOST = 4
    INTERNAL = 5


@dataclass(frozen=True)
class StopRequest:
    """Put on the engine thread's queue to end the process with `code`."""

    code: ExitCode
    reason: str


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the parent dies (Linux only).

    The kernel ties this to the parent *thread* that forked us, so the
    supervisor must spawn workers from a thread that outlives them."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))


def parent_gone(parent_pid: int | None) -> bool:
    """True once we have been re-parented: the parent died, possibly before
    `die_with_parent` was in place."""
    return parent_pid is not None and os.getppid() != parent_pid
