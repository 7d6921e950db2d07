"""A loaded model's worker across crashes and restarts, as runs see it.

`WorkerSlot` holds the handle of the worker serving a model now and whether
the model is serving, restarting, failed or unloaded; a restart puts a new
handle in the same slot, so a run that holds the model keeps working.
`serving()` is how a run waits for a restart (bounded), and the errors here
are what it gets when there will be no worker: the model failed, was
unloaded, or takes too long to come back.

When to restart is recovery.py's decision; doing it is models.py's.
"""

from __future__ import annotations

import asyncio
import enum
import time

from bastion.protocol import WorkerState
from bastion.supervisor.errors import (
    ModelFailedError,
    ModelUnloadedError,
    RestartTimeoutError,
)
from bastion.supervisor.models.restarts import CrashHistory
from bastion.supervisor.processes.workers import WorkerHandle


def failed_message(name: str, failure: str) -> str:
    return f"model {name} failed ({failure}); run `bastion load {name}` to try again"


class Availability(enum.Enum):
    SERVING = "serving"  # the handle's own state applies
    RESTARTING = "restarting"
    FAILED = "failed"
    UNLOADED = "unloaded"


class WorkerSlot:
    """The worker behind one loaded model, across restarts. Runs hold the
    model, not the worker: a restart puts a new handle here, and `serving()`
    is how a run waits for it."""

    def __init__(self, handle: WorkerHandle) -> None:
        self.handle = handle
        self.availability = Availability.SERVING
        self.failure = ""  # why it last restarted, or failed
        self.history: CrashHistory | None = None  # from its first crash on
        self.wait_limit_s = 60.0
        self._changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def restarts(self) -> int:
        return self.history.restarts(time.monotonic()) if self.history else 0

    def set(self, availability: Availability, *, handle: WorkerHandle | None = None,
            failure: str | None = None) -> None:
        self.availability = availability
        if handle is not None:
            self.handle = handle
        if failure is not None:
            self.failure = failure
        self._changed.set_result(None)
        self._changed = asyncio.get_running_loop().create_future()

    async def serving(self) -> WorkerHandle:
        """The worker to submit to, once there is one (bounded by `wait_limit_s`)."""
        name = self.handle.name
        deadline = time.monotonic() + self.wait_limit_s
        while True:
            match self.availability:
                case Availability.FAILED:
                    raise ModelFailedError(failed_message(name, self.failure))
                case Availability.UNLOADED:
                    raise ModelUnloadedError(f"model {name} was unloaded; retry to load it again")
                case Availability.SERVING if self.handle.state in (WorkerState.IDLE, WorkerState.BUSY):
                    return self.handle
            # Restarting, or its worker just exited and the exit is not handled yet.
            try:
                await asyncio.wait_for(asyncio.shield(self._changed), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise RestartTimeoutError(
                    f"model {name} is still restarting after {self.wait_limit_s:.0f} s ({self.failure}); "
                    "try again shortly"
                ) from None
