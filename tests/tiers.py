"""The test tiers, and the checks that keep their markers honest.

    e2e         starts a real process (a supervisor, a worker, a sandbox child, a checker)
                or loads a real model; everything else is in-process logic
    real_model  loads a real GGUF (in-process or in a worker); implies e2e
    soak        minutes of concurrent real traffic; implies e2e

`pytest -m "not e2e"` is the fast tier. The markers are checked while the
tests run, not trusted: a test that is not marked e2e and starts a process
fails at that moment (`refuse_processes`); a test that loads a GGUF without
`real_model` fails (`require_marker`, and the end-of-test check of the homes
a test's supervisors used).
"""

from __future__ import annotations

import contextvars
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

TIERS = ("e2e", "real_model", "soak")
IMPLIES_E2E = ("real_model", "soak")

_current: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("markers", default=frozenset(TIERS))


class TierError(AssertionError):
    pass


def markers_of(item: pytest.Item) -> frozenset[str]:
    return frozenset(mark.name for mark in item.iter_markers() if mark.name in TIERS)


@contextmanager
def current_markers(markers: frozenset[str]) -> Iterator[None]:
    token = _current.set(markers)
    try:
        yield
    finally:
        _current.reset(token)


def require_marker(marker: str, why: str) -> None:
    if marker not in _current.get():
        raise TierError(f"mark this test `{marker}`: {why}")


@contextmanager
def refuse_processes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any attempt to start a process fails with a message saying to mark the test e2e."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise TierError("this test starts a process: mark it `e2e` (or keep it in-process)")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "execv", "execve"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, refuse)
    yield


def gguf_loaded_in(home: Path) -> list[str]:
    """The GGUF files the workers of a bastion home loaded (from their logs)."""
    loaded = []
    for log in sorted((home / "logs").glob("worker-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if "bastion.worker.proc: loaded " in line and ".gguf" in line:
                loaded.append(line.split("loaded ", 1)[1].split(" (", 1)[0])
    return loaded
