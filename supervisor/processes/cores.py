"""Sharing the machine's cores among the workers that are generating.

llama.cpp's decode threads spin while they wait for each other, so two
workers that each use every core do not share the machine: they slow each
other down far more than by half. `share_cores` gives each busy worker its
share of the cores (never more than its model asked for, at least one), and
the pool sends a `SetThreads` whenever a worker's share changes — also to a
worker in the middle of a generation, which picks it up at its next step.

`cpu_sets` optionally pins each busy worker to its own cores (all threads of
the process, via sched_setaffinity); an idle worker gets the whole machine
back. Whether pinning pays is a property of the machine, so it is off by
default and measured in bench/vs_peer.py (concurrent scenario).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence

log = logging.getLogger(__name__)


def available_cpus() -> list[int]:
    """The CPUs this process may run on (a container or taskset may allow fewer than cpu_count)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def share_cores(busy: Sequence[str], cores: int, ceilings: dict[str, int]) -> dict[str, int]:
    """Threads for each busy worker: the cores split evenly (the remainder to
    the first ones), capped by each worker's own ceiling, at least one each."""
    if not busy:
        return {}
    base, extra = divmod(max(1, cores), len(busy))
    shares = {}
    for index, worker in enumerate(busy):
        share = max(1, base + (1 if index < extra else 0))
        shares[worker] = max(1, min(share, ceilings.get(worker, share)))
    return shares


def cpu_sets(shares: dict[str, int], cpus: Sequence[int]) -> dict[str, list[int]]:
    """Disjoint CPU lists, one per busy worker, sized by its share (in the
    order given); when there are more threads than CPUs every worker gets all."""
    if sum(shares.values()) > len(cpus):
        return {worker: list(cpus) for worker in shares}
    sets, start = {}, 0
    for worker, share in shares.items():
        sets[worker] = list(cpus[start : start + share])
        start += share
    return sets


def pin_process(pid: int, cpus: Sequence[int]) -> bool:
    """Pin every thread of process `pid` to `cpus`; threads it starts later
    inherit the affinity of the thread that starts them. False if the
    process is gone or the kernel refused."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    pinned = False
    for task in tasks:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task), cpus)
            pinned = True
    return pinned
