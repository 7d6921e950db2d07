"""The process packages import `protocol/` and never each other (DESIGN §1)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROCESS_PACKAGES = ("supervisor", "worker", "tools_sandbox", "client")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            names.add("<relative>")
    return names


def bastion_packages(names: set[str]) -> set[str]:
    return {name.split(".")[1] for name in names if name.startswith("bastion.") and name.count(".") >= 1}


@pytest.mark.parametrize("package", PROCESS_PACKAGES)
def test_process_package_imports_only_protocol_and_itself(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    for path in files:
        names = imported_modules(path)
        assert "<relative>" not in names, f"{path}: use absolute bastion.* imports"
        foreign = bastion_packages(names) - {package, "protocol"}
        assert not foreign, f"{path.relative_to(ROOT)} imports {sorted(foreign)}"


def test_protocol_imports_nothing_of_the_project() -> None:
    for path in sorted((ROOT / "protocol").rglob("*.py")):
        assert bastion_packages(imported_modules(path)) <= {"protocol"}, path


def test_only_worker_imports_llama_cpp() -> None:
    for package in ("supervisor", "client", "protocol", "tools_sandbox"):
        for path in (ROOT / package).rglob("*.py"):
            assert not any(n == "llama_cpp" or n.startswith("llama_cpp.") for n in imported_modules(path)), path


def test_checker_catches_a_cross_import(tmp_path: Path) -> None:
    offending = tmp_path / "bad.py"
    offending.write_text("from bastion.worker.core import WorkerCore\nimport bastion.protocol\n")
    assert bastion_packages(imported_modules(offending)) == {"worker", "protocol"}
