"""The launcher's reading of the child's status pipe (vocabulary in spec.py).

Owns `StatusReader`: it splits the pipe into lines as they arrive and pins the
call's pid 1 with a pidfd the moment it is named (by the child's `init` line,
or bwrap's --json-status-fd), so the final wait for the namespace to die can
never land on a recycled pid.
"""

from __future__ import annotations

import json
import os
import select

from bastion.tools_sandbox.confine.spec import STATUS_INIT


class StatusReader:
    """Parses the status pipe as lines arrive; pins the call's pid-1 with a pidfd the moment it is named,
    so the final wait cannot hit a recycled pid."""

    def __init__(self) -> None:
        self._pending = b""
        self.lines: list[str] = []
        self.init_pidfd: int | None = None

    def feed(self, data: bytes) -> None:
        *complete, self._pending = (self._pending + data).split(b"\n")
        for raw in complete:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            pid = _init_pid(line)
            if pid is not None and self.init_pidfd is None:
                try:
                    self.init_pidfd = os.pidfd_open(pid)
                except ProcessLookupError:
                    pass  # already gone, with everything in its namespace

    def wait_for_init(self, timeout: float) -> bool:
        """True once the call's pid 1 has exited: the kernel has then killed its whole namespace."""
        if self.init_pidfd is None:
            return True
        try:
            ready, _, _ = select.select([self.init_pidfd], [], [], timeout)
            return bool(ready)
        finally:
            os.close(self.init_pidfd)
            self.init_pidfd = None


def _init_pid(line: str) -> int | None:
    if line.startswith(STATUS_INIT + " "):
        return int(line.split()[1])
    if line.startswith("{"):  # bwrap --json-status-fd
        try:
            return int(json.loads(line)["child-pid"])
        except (ValueError, KeyError, TypeError):
            return None
    return None
