"""The supervisor's exception tree is drawn whole in errors.py, and every
error a client can see is defined there (one place to learn them all)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from bastion.supervisor import errors
from bastion.supervisor.errors import SupervisorError

ROOT = Path(__file__).resolve().parent.parent


def drawn_tree() -> dict[str, str]:
    """Class name -> parent name, read off the drawing in the module docstring."""
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in (errors.__doc__ or "").splitlines():
        match = re.match(r"^(\s*(?:[│ ]\s*)*)(?:├── |└── )?([A-Z]\w+Error)\b", line)
        if not match or not line.startswith("    "):
            continue
        depth = len(match.group(1)) + (4 if ("├── " in line or "└── " in line) else 0)
        name = match.group(2)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            parents[name] = stack[-1][1]
        stack.append((depth, name))
    return parents


def defined_tree() -> dict[str, str]:
    found: dict[str, str] = {}
    for value in vars(errors).values():
        if isinstance(value, type) and issubclass(value, SupervisorError) and value is not SupervisorError:
            found[value.__name__] = value.__bases__[0].__name__
    return found


def test_the_drawing_matches_the_classes() -> None:
    assert drawn_tree() == defined_tree()


def test_no_supervisor_error_is_defined_outside_errors_py() -> None:
    names = set(defined_tree()) | {"SupervisorError"}
    strays = []
    for path in sorted((ROOT / "supervisor").rglob("*.py")):
        if path.name == "errors.py" and path.parent.name == "supervisor":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(base, ast.Name) and base.id in names for base in node.bases
            ):
                strays.append(f"{path.relative_to(ROOT)}: {node.name}")
    assert strays == [], "define client-visible errors in supervisor/errors.py and draw them there"


def test_every_error_carries_a_wire_code() -> None:
    for name in defined_tree():
        error = getattr(errors, name)("x")
        assert error.code is not None and error.message == "x"
