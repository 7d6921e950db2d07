"""Which server of a remote model serves which session (scale-out), and what each has done.

A remote model lists one or more servers (`RemoteEndpoint.backends`). `Backends` keeps:

- affinity: a session stays on the server that served it, so that server's prompt cache
  (and, on llama.cpp's server, the slot that holds the session) stays warm;
- placement: a session new to the model, or whose server is down, goes to the healthy server
  with the fewest requests in flight (then the fewest sessions); a moved session is told so,
  since the new server evaluates its whole prompt;
- health: a server that could not be reached is down until a health probe (remote/core.py)
  finds it answering again; while every server is down, requests still go to the least
  recently failed one (it may be back) rather than failing without a try;
- the figures `bastion ps` shows per server (`BackendGauge`), and a check of the server's
  cache claims: a server cannot have reused more tokens of a prompt than the prompt has in
  common with what bastion sent it before (every token covers at least one character), so a
  larger claim means it restored another conversation's state, or another client shares it.

Pure bookkeeping, no I/O; used from the core's event loop thread only.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from bastion.protocol.remote import BackendGauge

# How many of the texts sent to a server are kept to check its cache claims against, and
# how much of each (a claim beyond what these share is flagged; older texts only make the
# check more lenient, never wrong).
RECENT_TEXTS = 64
RECENT_TEXT_CHARS = 256 * 1024
# Sessions whose server is remembered, least recently served first out (one-shot runs are
# sessions too: without a bound the map would grow with every request).
REMEMBERED_SESSIONS = 4096


@dataclass
class Backend:
    url: str
    healthy: bool = True
    in_flight: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    contradicted: int = 0
    failed_at: float = 0.0
    last_error: str = ""
    sent: deque[str] = field(default_factory=lambda: deque(maxlen=RECENT_TEXTS))

    def shared_chars(self, prompt: str) -> int:
        """The longest prefix `prompt` shares with anything sent to this server lately."""
        return max((_common_prefix(prompt, text) for text in self.sent), default=0)


def _common_prefix(a: str, b: str) -> int:
    """How many leading characters `a` and `b` share: a binary search over slice comparisons, which
    run in C (a character-by-character loop over 256K characters stalls the loop for 0.3 s)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


@dataclass(frozen=True)
class Placement:
    backend: Backend
    moved_from: str = ""  # the server the session was on before, when it had to move


class Backends:
    def __init__(self, urls: tuple[str, ...]) -> None:
        self._all = [Backend(url) for url in urls]
        # session -> the server that last served it, where it stays (see REMEMBERED_SESSIONS)
        self._home: OrderedDict[str, Backend] = OrderedDict()

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._all)

    def place(self, session: str, *, avoid: Backend | None = None) -> Placement:
        """The server for `session`'s next request (not `avoid`, which just failed it, when another exists)."""
        home = self._home.get(session)
        if home is not None and home.healthy and home is not avoid:
            return Placement(home)
        candidates = [b for b in self._all if b.healthy and b is not avoid] or [b for b in self._all if b is not avoid]
        if not candidates:
            candidates = self._all
        sessions = self._sessions()
        chosen = min(candidates, key=lambda b: (not b.healthy, b.in_flight, sessions.get(b.url, 0),
                                                b.failed_at if not b.healthy else 0.0))  # fmt: skip
        # Only a session that was served elsewhere has moved (a first request that fails over has not).
        return Placement(chosen, moved_from=home.url if home is not None and home is not chosen else "")

    def failed(self, backend: Backend, error: str, now: float) -> None:
        backend.healthy, backend.last_error, backend.failed_at = False, error, now

    def answered(self, backend: Backend) -> None:
        backend.healthy, backend.last_error = True, ""

    def served(self, session: str, backend: Backend, text: str, prompt_tokens: int | None,
               cached_tokens: int | None, prompt: str) -> bool:  # fmt: skip
        """Count a finished reply (the session stays on `backend` from now on); True when the server's
        cache claim contradicts what it was sent."""
        self._home[session] = backend
        self._home.move_to_end(session)
        while len(self._home) > REMEMBERED_SESSIONS:
            self._home.popitem(last=False)
        backend.requests += 1
        contradicted = False
        if prompt_tokens is not None:
            backend.prompt_tokens += prompt_tokens
        if cached_tokens:
            backend.cached_tokens += cached_tokens
            # +1: a BOS the server adds itself is cached too, and is no character of the prompt.
            contradicted = cached_tokens > backend.shared_chars(prompt) + 1
            backend.contradicted += contradicted
        backend.sent.append((prompt + text)[:RECENT_TEXT_CHARS])
        return contradicted

    def gauges(self) -> tuple[BackendGauge, ...]:
        sessions = self._sessions()
        return tuple(
            BackendGauge(url=b.url, healthy=b.healthy, in_flight=b.in_flight, sessions=sessions.get(b.url, 0),
                         requests=b.requests, prompt_tokens=b.prompt_tokens, cached_tokens=b.cached_tokens,
                         contradicted=b.contradicted, last_error=b.last_error)
            for b in self._all
        )  # fmt: skip

    def _sessions(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for backend in self._home.values():
            counts[backend.url] = counts.get(backend.url, 0) + 1
        return counts
