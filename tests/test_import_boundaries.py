"""The process packages import `protocol/` and never each other (DESIGN §1)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROCESS_PACKAGES = ("supervisor", "worker", "tools_sandbox", "client", "gateway")


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


# The supervisor may load a model's vocabulary, never its weights (DESIGN §1).
VOCAB_ONLY_MODULE = Path("supervisor/models/tokenizer.py")


def imports_llama_cpp(path: Path) -> bool:
    return any(n == "llama_cpp" or n.startswith("llama_cpp.") for n in imported_modules(path))


def test_only_worker_and_the_vocab_counter_import_llama_cpp() -> None:
    for package in ("supervisor", "client", "protocol", "tools_sandbox", "gateway"):
        for path in (ROOT / package).rglob("*.py"):
            if path.relative_to(ROOT) == VOCAB_ONLY_MODULE:
                continue
            assert not imports_llama_cpp(path), path


def vocab_only_violations(path: Path) -> list[str]:
    """Ways `path` could load a model's weights: a `Llama(...)` without a literal
    `vocab_only=True`, or a lower-level loader that bypasses `Llama` entirely."""
    source = path.read_text()
    calls = [
        node
        for node in ast.walk(ast.parse(source, filename=str(path)))
        if isinstance(node, ast.Call)
        and (
            (isinstance(node.func, ast.Attribute) and node.func.attr == "Llama")
            or (isinstance(node.func, ast.Name) and node.func.id == "Llama")
        )
    ]
    problems = [] if calls else ["imports llama_cpp but builds no Llama"]
    for call in calls:
        flag = next((kw.value for kw in call.keywords if kw.arg == "vocab_only"), None)
        if not (isinstance(flag, ast.Constant) and flag.value is True):
            problems.append(f"line {call.lineno}: Llama(...) without vocab_only=True")
    for loader in ("llama_model_load_from_file", "llama_load_model_from_file", "LlamaModel("):
        if loader in source:
            problems.append(f"uses {loader}")
    return problems


def test_supervisor_loads_llama_cpp_models_vocab_only() -> None:
    path = ROOT / VOCAB_ONLY_MODULE
    assert imports_llama_cpp(path), "the exception is stale: drop it"
    assert vocab_only_violations(path) == []


def test_vocab_only_check_catches_a_full_load(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import llama_cpp\nllama_cpp.Llama(model_path='m.gguf', vocab_only=True)\n")
    assert vocab_only_violations(module) == []
    module.write_text("import llama_cpp\nllama_cpp.Llama(model_path='m.gguf', vocab_only=flag)\n")
    assert vocab_only_violations(module) == ["line 2: Llama(...) without vocab_only=True"]
    module.write_text("from llama_cpp import Llama\nLlama(model_path='m.gguf')\n")
    assert vocab_only_violations(module) == ["line 2: Llama(...) without vocab_only=True"]
    module.write_text("import llama_cpp\nllama_cpp.llama_model_load_from_file(b'm.gguf', p)\n")
    assert vocab_only_violations(module) == [
        "imports llama_cpp but builds no Llama",
        "uses llama_model_load_from_file",
    ]


def test_checker_catches_a_cross_import(tmp_path: Path) -> None:
    offending = tmp_path / "bad.py"
    offending.write_text("from bastion.worker.core import WorkerCore\nimport bastion.protocol\n")
    assert bastion_packages(imported_modules(offending)) == {"worker", "protocol"}
