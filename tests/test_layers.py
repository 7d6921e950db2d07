"""The supervisor's subpackages form layers: each imports only those below it.

    shell      __main__, daemon, core
    control    answers to client requests
    harness    the agent loop and what it works on
    models     trust
    tools      templates      processes      store
    base       errors, config, runs

A module may import its own subpackage and any lower layer, never a layer at
its own level or above (supervisor/__init__.py draws the same map).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUPERVISOR = ROOT / "supervisor"

BASE_MODULES = {"errors", "config", "runs"}
SHELL_MODULES = {"__main__", "daemon", "core"}
RANK = {
    "shell": 5,
    "control": 4,
    "harness": 3,
    "models": 2, "trust": 2,
    "tools": 1, "templates": 1, "processes": 1, "store": 1,
    "base": 0,
}  # fmt: skip


def unit_of(dotted: str) -> str | None:
    """The layer unit of a `bastion.supervisor...` module name (None: not the supervisor's)."""
    parts = dotted.split(".")
    if parts[:2] != ["bastion", "supervisor"] or len(parts) < 3:
        return None
    head = parts[2]
    if head in BASE_MODULES:
        return "base"
    if head in SHELL_MODULES:
        return "shell"
    return head


def unit_of_file(path: Path) -> str:
    relative = path.relative_to(SUPERVISOR)
    if len(relative.parts) == 1:
        unit = unit_of(f"bastion.supervisor.{relative.stem}")
        assert unit is not None
        return unit
    return relative.parts[0]


def imported(path: Path) -> set[str]:
    """Every bastion.supervisor module `path` imports, at any level (TYPE_CHECKING included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "bastion.supervisor":  # `from bastion.supervisor import store`
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.startswith("bastion.supervisor.")}


def violations(path: Path) -> list[str]:
    own = unit_of_file(path)
    found = []
    for name in sorted(imported(path)):
        unit = unit_of(name)
        if unit is None or unit == own or unit not in RANK:
            continue
        if RANK[unit] >= RANK[own]:
            found.append(f"{path.relative_to(ROOT)} ({own}) imports {name} ({unit})")
    return found


def supervisor_files() -> list[Path]:
    return sorted(p for p in SUPERVISOR.rglob("*.py") if p.name != "__init__.py" or p.parent != SUPERVISOR)


def test_every_subpackage_has_a_layer() -> None:
    packages = {p.parent.name for p in SUPERVISOR.glob("*/__init__.py")}
    assert packages - RANK.keys() == set(), "give the new subpackage a layer here and in supervisor/__init__.py"
    modules = {p.stem for p in SUPERVISOR.glob("*.py")} - {"__init__"}
    assert modules <= BASE_MODULES | SHELL_MODULES, "a top-level module belongs to the shell or the base"


@pytest.mark.parametrize("path", supervisor_files(), ids=lambda p: str(p.relative_to(SUPERVISOR)))
def test_imports_only_lower_layers(path: Path) -> None:
    assert violations(path) == []


def test_the_check_catches_an_upward_and_a_sideways_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "supervisor"
    (fake / "tools").mkdir(parents=True)
    offending = fake / "tools" / "bad.py"
    offending.write_text(
        "from bastion.supervisor.harness.loop import AgentLoop\n"
        "from bastion.supervisor import store\n"
        "from bastion.supervisor.errors import SupervisorError\n"
        "from bastion.supervisor.tools.schema import validate\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "SUPERVISOR", fake)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert violations(offending) == [
        "supervisor/tools/bad.py (tools) imports bastion.supervisor.harness.loop (harness)",
        "supervisor/tools/bad.py (tools) imports bastion.supervisor.store (store)",
    ]
