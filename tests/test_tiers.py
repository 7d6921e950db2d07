"""The tier markers are checked while tests run (tests/tiers.py), and the
checks themselves work: a test not marked e2e cannot start a process, a test
that uses a GGUF must say so, and the homes' logs tell which GGUFs loaded."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiers import TierError, current_markers, gguf_loaded_in, require_marker


def test_an_unmarked_test_cannot_start_a_process() -> None:
    with pytest.raises(TierError, match="mark it `e2e`"):
        subprocess.run([sys.executable, "-c", "pass"], check=False)
    with pytest.raises(TierError):
        os.fork()


def test_an_unmarked_test_cannot_start_an_asyncio_subprocess() -> None:
    async def spawn() -> None:
        await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")

    with pytest.raises(TierError):
        asyncio.run(spawn())


@pytest.mark.e2e
def test_an_e2e_test_may() -> None:
    assert subprocess.run([sys.executable, "-c", "pass"], check=False).returncode == 0


def test_a_real_model_needs_its_marker() -> None:
    with current_markers(frozenset({"e2e"})), pytest.raises(TierError, match="real_model"):
        require_marker("real_model", "it uses a GGUF")
    with current_markers(frozenset({"e2e", "real_model"})):
        require_marker("real_model", "it uses a GGUF")


def test_the_tier_markers_imply_e2e(request: pytest.FixtureRequest) -> None:
    soak_and_models = [item for item in request.session.items
                       if item.get_closest_marker("real_model") or item.get_closest_marker("soak")]
    assert all(item.get_closest_marker("e2e") for item in soak_and_models)


def test_the_workers_logs_tell_which_gguf_they_loaded(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "worker-a.log").write_text(
        "[12] 2026-01-01 00:00:00,000 worker w1-1 INFO bastion.worker.proc: loaded /m/model.gguf (llama, n_ctx 4096)"
        " in 300 ms\n"
    )
    (logs / "worker-b.log").write_text(
        "[13] 2026-01-01 00:00:00,000 worker w1-2 INFO bastion.worker.proc: loaded /s/script.json (scripted, n_ctx"
        " 4096) in 1 ms\n"
    )
    assert gguf_loaded_in(tmp_path) == ["/m/model.gguf"]
