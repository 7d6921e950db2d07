"""Reading a scripted model's replies: a JSON or YAML list of strings.

`--model scripted:FILE` runs the same worker process and protocol as a real
model, replaying these replies one per generation; it exists for
deterministic tests, evals and bug reports. A file that is not such a list is
an invalid model file, reported like a broken GGUF.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from bastion.worker.engine import InvalidModelFile


def load_script(path: str) -> tuple[str, ...]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidModelFile(f"cannot read the script {path}: {exc}") from exc
    try:
        replies = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise InvalidModelFile(f"{path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: {exc}") from exc
    if not isinstance(replies, list) or not replies or not all(isinstance(r, str) for r in replies):
        raise InvalidModelFile(f"{path} must hold a non-empty list of reply strings")
    return tuple(replies)
