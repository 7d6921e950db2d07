"""When a model's crashed worker is restarted, and when the model is declared failed.

Pure decisions, no processes and no clock of their own (callers pass `now`),
so every rule here is tested without spawning anything:

- `CrashHistory.record` answers each unexpected worker exit with `Restart`
  (at once for the first crash in the window — a lone crash should cost
  seconds, not a wait — then after a backoff that doubles with each further
  crash still inside the window, up to a cap) or, once `crash_limit` crashes fall inside `window_s`, with
  `GiveUp`: a model that keeps crashing is marked failed instead of looping.

Spawning, killing and waiting belong to processes/workers.py; acting on a
decision to loaded.py. When a live worker counts as hung is processes/liveness.py's.
"""

from __future__ import annotations

from collections import deque

import msgspec

from bastion.supervisor.config import SupervisorConfig


class RestartPolicy(msgspec.Struct, frozen=True, kw_only=True):
    first_backoff_s: float = 0.0
    backoff_s: float = 0.5
    backoff_max_s: float = 8.0
    crash_limit: int = 3
    window_s: float = 60.0

    @classmethod
    def from_config(cls, config: SupervisorConfig) -> RestartPolicy:
        return cls(first_backoff_s=config.restart_first_backoff_s, backoff_s=config.restart_backoff_s, backoff_max_s=config.restart_backoff_max_s,
                   crash_limit=config.restart_limit, window_s=config.restart_window_s)


class Restart(msgspec.Struct, frozen=True, kw_only=True):
    delay_s: float
    crashes: int  # inside the window, this one included


class GiveUp(msgspec.Struct, frozen=True, kw_only=True):
    crashes: int
    window_s: float


class CrashHistory:
    """The crashes of one model inside the policy's sliding window."""

    def __init__(self, policy: RestartPolicy) -> None:
        self._policy = policy
        self._crashes: deque[float] = deque()
        self.gave_up = False

    def record(self, now: float) -> Restart | GiveUp:
        self._expire(now)
        self._crashes.append(now)
        crashes = len(self._crashes)
        if crashes >= self._policy.crash_limit:
            self.gave_up = True
            return GiveUp(crashes=crashes, window_s=self._policy.window_s)
        if crashes == 1:
            delay = self._policy.first_backoff_s
        else:
            delay = min(self._policy.backoff_s * 2 ** (crashes - 2), self._policy.backoff_max_s)
        return Restart(delay_s=delay, crashes=crashes)

    def restarts(self, now: float) -> int:
        """Restarts begun for crashes still inside the window (the crash that
        made the model give up started none)."""
        self._expire(now)
        return len(self._crashes) - (1 if self.gave_up else 0)

    def _expire(self, now: float) -> None:
        if self.gave_up:
            return  # a failed model keeps the record of why until it is loaded again
        while self._crashes and now - self._crashes[0] > self._policy.window_s:
            self._crashes.popleft()
