"""What one request to either system gave back, as the scenarios record it.

Both sides fill the same record so a scenario can lay bastion and the peer
side by side; times are taken at the client with `time.perf_counter()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Reply:
    sent_at: float  # perf_counter when the request left the client
    first_token_at: float | None = None
    end_at: float | None = None
    text: str = ""
    completion_tokens: int = 0
    token_times: list[float] = field(default_factory=list)
    error: str | None = None
    error_at: float | None = None
    # Side-specific figures worth keeping (bastion's generation stats, the
    # peer's HTTP status, ...), JSON-ready.
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_at is None else 1000 * (self.first_token_at - self.sent_at)

    @property
    def decode_tokens_per_s(self) -> float:
        times = self.token_times
        return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
