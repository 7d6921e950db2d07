"""Where a bastion home keeps its state and sockets."""

from __future__ import annotations

import stat
from pathlib import Path

import platformdirs
import pytest

from bastion.protocol import HomeLayout
from bastion.protocol.home import default_home


def test_home_comes_from_bastion_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BASTION_HOME", str(tmp_path / "h"))
    assert HomeLayout.from_env().root == tmp_path / "h"


def test_default_home_is_the_platform_user_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BASTION_HOME", raising=False)
    assert default_home() == Path(platformdirs.user_data_dir("bastion", appauthor=False))


def test_runtime_dir_is_private(tmp_path: Path) -> None:
    layout = HomeLayout(tmp_path / "home")
    layout.ensure()
    assert layout.runtime_dir == layout.root / "run"
    assert stat.S_IMODE(layout.runtime_dir.stat().st_mode) == 0o700
    assert layout.control_endpoint == f"ipc://{layout.root}/run/control.sock"


def test_a_deep_home_moves_sockets_to_a_short_private_dir(tmp_path: Path) -> None:
    deep = tmp_path.joinpath(*["nested-directory-name"] * 6)
    layout = HomeLayout(deep)
    layout.ensure()
    assert not layout.runtime_dir.is_relative_to(deep)
    assert len(str(layout.workers_socket)) <= 100
    assert stat.S_IMODE(layout.runtime_dir.stat().st_mode) == 0o700
    # Two homes never share a runtime dir.
    assert HomeLayout(deep / "other").runtime_dir != layout.runtime_dir
    layout.runtime_dir.rmdir()
