"""Waiting for something observable, with a deadline: the one polling helper.

Tests wait for an event they can observe (a process state, a file, an answer)
instead of sleeping and hoping. Where the thing cannot be awaited directly (it
happens in another process), `wait_until` polls it until it holds or the
deadline passes, and then fails saying what was awaited and what was seen last.
Nothing here proves that something did *not* happen: for that, inject the clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

import psutil

T = TypeVar("T")


def wait_until(probe: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.05, what: str = "") -> T:
    """The first truthy value of `probe()`, polled every `interval` seconds; an
    AssertionError naming `what` (and the last value seen) after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:.0f} s for {what or probe!r}; last seen: {value!r}")
        time.sleep(interval)


async def until(probe: Callable[[], T], *, timeout: float = 5.0, interval: float = 0.005, what: str = "") -> T:
    """`wait_until` for a coroutine: polls without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:.0f} s for {what or probe!r}; last seen: {value!r}")
        await asyncio.sleep(interval)


def gone(process: psutil.Process) -> bool:
    """Whether a process has exited. One whose parent is init may stay a zombie
    until init reaps it (seconds, on some machines); it has exited all the same."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(processes: list[psutil.Process], timeout: float = 30.0) -> list[psutil.Process]:
    """Wait until every process has exited; the ones still alive at the deadline."""
    deadline = time.monotonic() + timeout
    alive = [p for p in processes if not gone(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [p for p in alive if not gone(p)]
    return alive


async def quiescent(timeout: float = 5.0) -> None:
    """Until every other task on the event loop has finished: whatever was
    scheduled (a restart after its backoff, an unload) has run by then, so a
    check made afterwards sees its effect or proves it was not scheduled."""
    async with asyncio.timeout(timeout):
        while others := [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]:
            await asyncio.wait(others)
