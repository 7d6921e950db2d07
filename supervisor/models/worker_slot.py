"""A loaded model's worker across crashes and restarts, as runs see it.

`WorkerSlot` holds the handle of the worker serving a model now and the
model's state where it is not its worker's own: a restart puts a new handle in
the same slot, so a run that holds the model keeps working. `serving()` is how
a run waits for a restart (bounded), and the errors here are what it gets when
there will be no worker: the model failed, was unloaded, or takes too long to
come back.

One enum says what state a model is in (`WorkerState`, as `bastion ps` shows
it): while a worker serves, its own state (idle, busy, ...); otherwise the
slot's: `restarting`, `failed`, or `dead` once the model is unloaded.

When to restart is restarts.py's decision; doing it is loaded.py's.
"""

from __future__ import annotations

import asyncio
import time

from bastion.protocol import WorkerState
from bastion.supervisor.errors import (
    ModelFailedError,
    ModelUnloadedError,
    RestartTimeoutError,
)
from bastion.supervisor.models.restarts import CrashHistory
from bastion.supervisor.processes.worker_handle import WorkerHandle


def failed_message(name: str, failure: str) -> str:
    return f"model {name} failed ({failure}); run `bastion load {name}` to try again"


class WorkerSlot:
    """The worker behind one loaded model, across restarts. Runs hold the
    model, not the worker: a restart puts a new handle here, and `serving()`
    is how a run waits for it."""

    def __init__(self, handle: WorkerHandle) -> None:
        self.handle = handle
        # The model's state when it is not the worker's own (None: the worker serves).
        self._state: WorkerState | None = None
        self.failure = ""  # why it last restarted, or failed
        self.history: CrashHistory | None = None  # from its first crash on
        self.wait_limit_s = 60.0
        self._changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def state(self) -> WorkerState:
        """The model's state: the slot's while it has no worker serving, else the worker's."""
        return self._state or self.handle.state

    def restarts(self) -> int:
        return self.history.restarts(time.monotonic()) if self.history else 0

    # --- transitions (loaded.py makes them) ---------------------------------

    def serve(self, handle: WorkerHandle) -> None:
        """A (new) worker serves the model."""
        self.handle = handle
        self._move(None)

    def restarting(self, failure: str) -> None:
        self.failure = failure
        self._move(WorkerState.RESTARTING)

    def failed(self, failure: str) -> None:
        self.failure = failure
        self._move(WorkerState.FAILED)

    def unloaded(self) -> None:
        self._move(WorkerState.DEAD)

    def _move(self, state: WorkerState | None) -> None:
        self._state = state
        self._changed.set_result(None)
        self._changed = asyncio.get_running_loop().create_future()

    async def serving(self) -> WorkerHandle:
        """The worker to submit to, once there is one (bounded by `wait_limit_s`)."""
        name = self.handle.name
        deadline = time.monotonic() + self.wait_limit_s
        while True:
            match self._state:
                case WorkerState.FAILED:
                    raise ModelFailedError(failed_message(name, self.failure))
                case WorkerState.DEAD:
                    raise ModelUnloadedError(f"model {name} was unloaded; retry to load it again")
                case None if self.handle.state in (WorkerState.IDLE, WorkerState.BUSY):
                    return self.handle
            # Restarting, or its worker just exited and the exit is not handled yet.
            try:
                await asyncio.wait_for(asyncio.shield(self._changed), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise RestartTimeoutError(
                    f"model {name} is still restarting after {self.wait_limit_s:.0f} s ({self.failure}); "
                    "try again shortly"
                ) from None
