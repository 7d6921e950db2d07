"""Scripted models for tests: a file of canned replies, used as `scripted:FILE`.

The same file drives a real worker process (end-to-end tests) and the
in-process stand-in workers (tests/inprocess.py); each worker replays the
replies in order from the first, and running out is an error.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

_files = itertools.count(1)


def script(folder: Path, *replies: str, name: str | None = None) -> str:
    """A scripted model of its own (one worker per file name), as a `model` value."""
    path = folder / f"{name or f'script{next(_files)}'}.json"
    path.write_text(json.dumps(list(replies)))
    return f"scripted:{path}"


def tool_call(name: str, **arguments: object) -> str:
    """A reply holding one call in the fenced format bastion advertises."""
    return f"```tool_call\n{json.dumps({'name': name, 'arguments': arguments})}\n```"


def prose(words: int) -> str:
    """A long reply that never repeats itself (a repeating one is cut as a loop)."""
    return " ".join(f"word{i}" for i in range(words))
