"""A clock a test advances by hand, for code that takes a `Clock`
(supervisor/models/residency.py): time moves only when the test says, and
the callbacks that come due run then, in order. So "not before" is checked
by advancing to just before, never by sleeping and hoping."""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable


class _Timer:
    def __init__(self, clock: ManualClock, at: float, callback: Callable[[], None]) -> None:
        self.at = at
        self.callback = callback
        self.cancelled = False
        self._clock = clock

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    def __init__(self, start: float | None = None) -> None:
        # Start where the real monotonic clock is, so times recorded with it compare sensibly.
        self._now = time.monotonic() if start is None else start
        self._timers: list[tuple[float, int, _Timer]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(self, self._now + max(0.0, delay), callback)
        heapq.heappush(self._timers, (timer.at, next(self._order), timer))
        return timer

    def pending(self) -> list[float]:
        """When the timers still armed are due, soonest first."""
        return sorted(timer.at - self._now for _at, _n, timer in self._timers if not timer.cancelled)

    def advance(self, seconds: float) -> None:
        """Move time forward, running every callback that comes due on the way."""
        target = self._now + seconds
        while self._timers and self._timers[0][0] <= target:
            at, _n, timer = heapq.heappop(self._timers)
            self._now = max(self._now, at)
            if not timer.cancelled:
                timer.callback()
        self._now = target
