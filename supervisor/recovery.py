"""When a model's worker is restarted, and when it is declared hung or failed.

Pure decisions, no processes and no clock of their own (callers pass `now`),
so every rule here is tested without spawning anything:

- `CrashHistory.record` answers each unexpected worker exit with `Restart`
  (at once for the first crash in the window — a lone crash should cost
  seconds, not a wait — then after a backoff that doubles with each further
  crash still inside the window, up to a cap) or, once `crash_limit` crashes fall inside `window_s`, with
  `GiveUp`: a model that keeps crashing is marked failed instead of looping.
- `hang_reason` says whether a live worker counts as hung: silent (no message
  for the silence limit) or stalled (busy, yet its progress counter has not
  moved for the stall limit).
- `failure_line` condenses an exit into the one line `bastion ps` shows.

Spawning, killing and waiting belong to workers.py and models.py.
"""

from __future__ import annotations

import re
from collections import deque

import msgspec

from bastion.supervisor.config import SupervisorConfig

# A worker's log record on stderr: `2024-05-01 12:00:00,123 worker w1-2 ERROR name: text`.
_LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d [\d:,.]+ worker \S+ (?P<level>[A-Z]+) (?P<rest>.*)$")


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


def hang_reason(
    *,
    now: float,
    last_seen: float,
    busy: bool,
    progress_at: float,
    silence_limit_s: float,
    stall_limit_s: float,
) -> str | None:
    """Why a worker counts as hung, or None. `progress_at` is when its progress
    counter last moved, or when its current generation started if later."""
    silent = now - last_seen
    if silent > silence_limit_s:
        return f"no heartbeat for {silent:.0f} s"
    stalled = now - progress_at
    if busy and stalled > stall_limit_s:
        return f"busy with no progress for {stalled:.0f} s"
    return None


def failure_line(exit_description: str, stderr_tail: list[str]) -> str:
    """`exited with code 1: RuntimeError: ...`: how it ended and the last thing
    it said, unless that was routine logging (a killed worker says nothing of
    its death; its last INFO line would only mislead)."""
    last = next((line.strip() for line in reversed(stderr_tail) if line.strip()), "")
    record = _LOG_RECORD.match(last)
    if record is not None:
        last = "" if record["level"] in ("DEBUG", "INFO") else f"{record['level']} {record['rest']}"
    return f"{exit_description}: {last}" if last else exit_description
