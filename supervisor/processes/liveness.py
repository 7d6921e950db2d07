"""Whether a live worker counts as hung, and how a dead one is described.

Pure decisions with no clock of their own (callers pass `now`), so every rule
is tested without spawning anything:

- `hang_reason` says whether a live worker counts as hung: silent (no message
  for the silence limit) or stalled (busy, yet its progress counter has not
  moved for the stall limit);
- `failure_line` condenses an exit into the one line `bastion ps` shows.

Killing a hung worker is workers.py's job; whether to restart it afterwards
is the models layer's (models/restarts.py).
"""

from __future__ import annotations

import re

# A worker's log record on stderr: `2024-05-01 12:00:00,123 worker w1-2 ERROR name: text`.
_LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d [\d:,.]+ worker \S+ (?P<level>[A-Z]+) (?P<rest>.*)$")


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
