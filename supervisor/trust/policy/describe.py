"""The effective policy as text, for `bastion policy show`.

Owns the layout of that text: the files, the hash, the default, the
protected paths and every rule, each with the `file:line` it came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bastion.supervisor.trust.policy.model import PolicySpec, ProtectedPath, Rule


def describe_policy(spec: PolicySpec, protected: Sequence[ProtectedPath], protected_files: Sequence[Path],
                    digest: str) -> str:
    lines = [f"policy   {spec.files[0] if spec.files else '(none)'}"]
    lines += [f"includes {file}" for file in spec.files[1:]]
    lines.append(f"hash     {digest}")
    origin = str(spec.default_source) if spec.default_source else "built in"
    lines.append(f"default  {spec.default.value}  ({origin})")
    lines.append("")
    lines.append("Every matching rule counts: deny beats ask beats allow; when none matches, the default.")
    lines.append("A shell command is split into simple commands, each decided alone; one that matches no")
    lines.append("rule, or a part that cannot be analysed, is at least ask.")
    lines.append("")
    lines.append("protected (denied unless a rule names them):")
    for entry in protected:
        where = entry.label or str(entry.source)
        lines.append(f"  {entry.pattern.text:<40} {where}")
    for file in protected_files:
        lines.append(f"  {str(file):<40} bastion's own file")
    lines.append("")
    lines.append("rules:")
    width = max((len(str(rule.source)) for rule in spec.rules), default=0)
    for rule in spec.rules:
        first, *rest = _what(rule)
        indent = " " * (width + 11)
        lines.append(f"  {str(rule.source):<{width}}  {rule.decision.value:<5}  {first}")
        lines += [indent + line for line in rest]
        if rule.note:
            lines.append(f"{indent}# {rule.note}")
    if not spec.rules:
        lines.append("  (none)")
    return "\n".join(lines) + "\n"


def _what(rule: Rule) -> list[str]:
    lines = ["tools " + ", ".join(rule.tools)]
    if rule.commands:
        lines += _packed("commands ", [repr(c.text) for c in rule.commands])
    if rule.paths:
        lines += _packed("paths ", [p.text for p in rule.paths])
    return lines


def _packed(label: str, items: list[str], width: int = 88) -> list[str]:
    """Items on lines of about `width`, never split inside one (patterns hold spaces)."""
    lines = [label]
    for index, item in enumerate(items):
        piece = item + ("," if index < len(items) - 1 else "")
        if len(lines[-1]) + len(piece) + 1 > width and lines[-1].strip():
            lines.append(" " * len(label))
        lines[-1] += piece if lines[-1].endswith(" ") or not lines[-1].strip() else " " + piece
    return lines
