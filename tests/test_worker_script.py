"""Scripted models read their replies from JSON or YAML; anything else is an invalid model file."""

from __future__ import annotations

from pathlib import Path

import pytest

from bastion.worker.engine import InvalidModelFile
from bastion.worker.script import load_script


def test_reads_a_yaml_list_of_replies(tmp_path: Path) -> None:
    path = tmp_path / "replies.yaml"
    path.write_text("- first reply\n- |\n  a block\n  of two lines\n")
    assert load_script(str(path)) == ("first reply", "a block\nof two lines\n")


def test_reads_a_json_list_of_replies(tmp_path: Path) -> None:
    path = tmp_path / "replies.json"
    path.write_text('["one", "two"]')
    assert load_script(str(path)) == ("one", "two")


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("broken.json", "[", "not valid JSON"),
        ("broken.yaml", "- [unclosed", "not valid YAML"),
        ("mapping.yaml", "reply: hi", "list of reply strings"),
        ("empty.json", "[]", "list of reply strings"),
        ("numbers.json", "[1, 2]", "list of reply strings"),
    ],
)
def test_anything_else_is_an_invalid_model_file(tmp_path: Path, name: str, text: str, needle: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InvalidModelFile, match=needle):
        load_script(str(path))


def test_a_missing_script_is_an_invalid_model_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelFile, match="cannot read"):
        load_script(str(tmp_path / "absent.yaml"))
