"""Which loaded models stay in memory: the budget at load time and keep_alive after use.

`Residency` is LoadedModels' (loaded.py) partner for two decisions:
- admission: before a worker is spawned, the new model's estimate plus what
  loaded and loading models hold must fit the memory budget; if not, idle
  models are unloaded least recently used first (memory.py plans it), and if
  that cannot make room the load fails with `insufficient_memory`;
- expiry: a model nobody has used for its keep_alive is unloaded (never
  while a request uses it or its worker has a generation in flight or
  queued; -1 never; 0 as soon as it is idle).

A model is in use from the moment a request asks for it until that request
ends (`use(..., until=...)`); its last-used time is set at both ends, so
keep_alive counts from the end of the last request. Residency never spawns
workers; it unloads through the callable LoadedModels gives it.

Time comes from a `Clock` (the event loop's by default), so tests run
keep_alive on a clock they advance instead of waiting it out.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Protocol

from bastion.protocol import WorkerState
from bastion.protocol.quantities import format_bytes
from bastion.supervisor.models.memory import Holder, MemoryBudget, plan_admission
from bastion.supervisor.models.usage import Cancellable, normalize_keep_alive

if TYPE_CHECKING:
    from bastion.supervisor.models.loaded_model import LoadedModel

log = logging.getLogger(__name__)

# A worker still finishing a generation nobody waits for (a cancelled run's)
# is checked again this often before its keep_alive may run out.
_BUSY_RECHECK_S = 0.25


class Clock(Protocol):
    """Monotonic seconds, and callbacks after a delay."""

    def now(self) -> float: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> Cancellable: ...


class LoopClock:
    """The event loop's clock: `time.monotonic` and `loop.call_later`."""

    def now(self) -> float:
        return time.monotonic()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Cancellable:
        return asyncio.get_running_loop().call_later(delay, callback)


def is_idle(model: LoadedModel) -> bool:
    """No request uses it and its worker has no generation in flight or queued."""
    handle = model.handle
    return model.usage.users == 0 and not handle.running and not handle.queue


def expires_in_s(model: LoadedModel) -> float | None:
    """For `bastion ps`: seconds before keep_alive unloads it; None while in use, when
    never, or for a failed model (nothing of it is loaded)."""
    if model.slot.state is WorkerState.FAILED or not is_idle(model):
        return None
    return model.usage.expires_in_s()


class Residency:
    def __init__(
        self,
        *,
        budget: Callable[[], MemoryBudget],
        loaded: Callable[[], Mapping[str, LoadedModel]],
        unload: Callable[[str], Awaitable[bool]],
        clock: Clock | None = None,
    ) -> None:
        self._clock = clock or LoopClock()
        self._budget = budget
        self._loaded = loaded
        self._unload = unload
        self._reserved: dict[str, int] = {}  # loads admitted and not finished: their estimates
        self._wanted: collections.Counter[str] = collections.Counter()  # requests between asking and using
        self._admission = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # --- admission --------------------------------------------------------

    @contextlib.asynccontextmanager
    async def admitted(self, name: str, needed: int) -> AsyncIterator[None]:
        """Room for `needed` bytes for `name` while the block loads it (then the
        loaded model's own estimate counts). Admissions run one at a time, so
        two loads never count the same free memory."""
        async with self._admission:
            while True:
                victims = plan_admission(name, needed, self._budget(), self._holders())
                if not victims:
                    break
                # One at a time, planning again after each: a model may be asked
                # for while an earlier one stops.
                victim = victims[0]
                log.info("unloading %s (idle, least recently used) to make room for %s (%s)", victim, name,
                         format_bytes(needed))
                await self._unload(victim)
            self._reserved[name] = needed
        try:
            yield
        finally:
            self._reserved.pop(name, None)

    def _holders(self) -> list[Holder]:
        holders = [
            Holder(name=name, bytes=model.usage.estimate.total, last_used=model.usage.last_used,
                   evictable=is_idle(model) and not self._wanted[name])
            for name, model in self._loaded().items()
        ]  # fmt: skip
        holders += [Holder(name=name, bytes=size, last_used=math.inf, evictable=False)
                    for name, size in self._reserved.items()]
        return holders

    def held(self) -> dict[str, int]:
        """Estimated bytes per model, loaded or loading."""
        held = {name: model.usage.estimate.total for name, model in self._loaded().items()}
        held.update(self._reserved)
        return held

    # --- use and keep_alive ---------------------------------------------------

    @contextlib.contextmanager
    def wanting(self, name: str) -> Iterator[None]:
        """While a request waits for `name` (loading, restarting), it is not idle to evict."""
        self._wanted[name] += 1
        try:
            yield
        finally:
            self._wanted[name] -= 1
            if not self._wanted[name]:
                del self._wanted[name]
                # An expiry that came due meanwhile was put off for this request.
                model = self._loaded().get(name)
                if model is not None:
                    self._schedule(model)

    def use(self, model: LoadedModel, keep_alive_s: float, until: asyncio.Future[object] | None) -> None:
        """A request got `model`: it applies its keep_alive and, with `until`,
        uses the model until that future is done."""
        usage = model.usage
        usage.keep_alive_s = normalize_keep_alive(keep_alive_s)
        usage.touch(self._clock.now())
        if until is not None and not until.done():
            usage.users += 1
            until.add_done_callback(lambda _f: self._release(model))
        self._schedule(model)

    def _release(self, model: LoadedModel) -> None:
        model.usage.users -= 1
        model.usage.touch(self._clock.now())
        self._schedule(model)

    def _schedule(self, model: LoadedModel) -> None:
        usage = model.usage
        usage.cancel_timer()
        if self._closed or usage.keep_alive_s < 0 or not self._current(model) or usage.users:
            return
        delay = max(0.0, usage.last_used + usage.keep_alive_s - self._clock.now())
        usage.timer = self._clock.call_later(delay, lambda: self._expire(model))

    def _expire(self, model: LoadedModel) -> None:
        usage = model.usage
        usage.timer = None
        name = model.spec.name
        if self._closed or not self._current(model) or usage.keep_alive_s < 0:
            return
        if usage.users or self._wanted[name]:
            return  # whoever uses it reschedules when done
        if not is_idle(model):
            usage.touch(self._clock.now())
            usage.timer = self._clock.call_later(_BUSY_RECHECK_S, lambda: self._expire(model))
            return
        remaining = usage.last_used + usage.keep_alive_s - self._clock.now()
        if remaining > 0:
            usage.timer = self._clock.call_later(remaining, lambda: self._expire(model))
            return
        log.info("unloading %s: idle for its keep_alive of %g s", name, usage.keep_alive_s)
        task = asyncio.create_task(self._unload_quietly(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _unload_quietly(self, name: str) -> None:
        try:
            await self._unload(name)
        except Exception:
            log.exception("unloading idle model %s failed", name)

    def _current(self, model: LoadedModel) -> bool:
        return self._loaded().get(model.spec.name) is model

    def close(self) -> None:
        """The supervisor is stopping: no more expiries (every worker is stopped anyway)."""
        self._closed = True
        for model in self._loaded().values():
            model.usage.cancel_timer()
