"""The tree type-checks under the project's mypy settings (pyproject.toml `[tool.mypy]`).

Guards the annotations of every bastion package: `protocol/` (the wire
messages every process shares) and `supervisor/harness/` (the agent loop) are
checked as under `mypy --strict`, the rest at mypy's default strictness. mypy
finds the packages under their installed names through the symlinks in
typecheck/bastion/. Its cache stays in the repository's .mypy_cache, so a
repeated run only re-checks what changed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_finds_nothing() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(ROOT / ".mypy_cache")],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
