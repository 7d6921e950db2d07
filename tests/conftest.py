"""Shared fixtures and the tier checks (tests/tiers.py).

End-to-end tests drive the real CLI against a home in a temp dir
(`bastion`: one supervisor per test; `shared_bastion`: one per module, for
tests that only read or add state of their own). Every test runs with its
tier markers known: one not marked `e2e` may not start a process, and one
whose supervisors loaded a GGUF must be marked `real_model`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e_support import Bastion
from tests.inprocess import drive
from tests.tiers import IMPLIES_E2E, TierError, current_markers, gguf_loaded_in, markers_of, refuse_processes


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(name) for name in IMPLIES_E2E) and not item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def tier_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    markers = markers_of(request.node)
    with current_markers(markers):
        if "e2e" in markers:
            yield
        else:
            with refuse_processes(monkeypatch):
                yield


def _check_models(home: Path, markers: frozenset[str], who: str) -> None:
    loaded = gguf_loaded_in(home) if home.exists() else []
    if loaded and "real_model" not in markers:
        raise TierError(f"{who} loaded {loaded[0]}: mark it `real_model`")


@pytest.fixture
def bastion(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Bastion]:
    cli = Bastion(tmp_path / "home")
    yield cli
    cli.cleanup()
    _check_models(cli.home, markers_of(request.node), request.node.nodeid)


@pytest.fixture(scope="module")
def shared_bastion(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bastion]:
    """One supervisor for a whole module of end-to-end tests (models stay loaded)."""
    cli = Bastion(tmp_path_factory.mktemp("shared") / "home")
    yield cli
    cli.cleanup()
    users = [item for item in request.session.items
             if item.module is request.module and "shared_bastion" in getattr(item, "fixturenames", ())]
    markers = frozenset().union(*(markers_of(item) for item in users))
    _check_models(cli.home, markers, f"a test of {request.node.nodeid}")


@pytest.fixture
def supervised(tmp_path: Path):
    """`supervised(test, **options)` runs a test coroutine against a fresh in-process supervisor."""
    return lambda test, **options: drive(tmp_path / "home", test, **options)
