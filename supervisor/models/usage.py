"""How a loaded model is being used: the record memory and keep_alive decisions read.

Owns `ModelUsage`: a model's memory estimate, its keep_alive, when it was last
used and how many requests are using it now. A request uses a model from the
moment it asks for it until it ends (a run: every generation, tool call and
approval wait in it), so an agent run between two generations still counts
as using its model and is never unloaded under it.

It holds no timers' logic beyond the handle residency.py gives it, and never
stops a worker: LoadedModels does that.
"""

from __future__ import annotations

import math
import time
from typing import Protocol

from bastion.supervisor.models.memory import MemoryEstimate

# keep_alive values: NEVER keeps a model until it is unloaded or evicted.
NEVER = -1.0


def normalize_keep_alive(seconds: float) -> float:
    """Seconds ≥ 0, or NEVER for any negative or non-finite value (a wire value may be anything)."""
    if math.isnan(seconds) or seconds < 0 or math.isinf(seconds):
        return NEVER
    return float(seconds)


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class ModelUsage:
    def __init__(self, *, estimate: MemoryEstimate, keep_alive_s: float) -> None:
        self.estimate = estimate
        self.keep_alive_s = normalize_keep_alive(keep_alive_s)
        self.last_used = time.monotonic()
        self.users = 0  # requests using the model now
        self.timer: Cancellable | None = None

    def touch(self, now: float) -> None:
        self.last_used = now

    def expires_in_s(self, now: float | None = None) -> float | None:
        """Seconds left before an idle model is unloaded; None when it never is."""
        if self.keep_alive_s < 0:
            return None
        now = time.monotonic() if now is None else now
        return round(max(0.0, self.last_used + self.keep_alive_s - now), 3)

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
