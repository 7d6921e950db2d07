"""How the CLI words a model's memory estimate, keep_alive and the memory budget.

Shared by `bastion load`, `bastion status` and the `bastion ps` table, so the
same figure reads the same everywhere. Sizes and durations come from
protocol/quantities.py; nothing here talks to the supervisor.
"""

from __future__ import annotations

from bastion.protocol.control import ModelStatus, StatusReport
from bastion.protocol.quantities import format_bytes, format_duration


def keep_alive_cell(model: ModelStatus) -> str:
    """`5m (4m12s left)`, `5m (in use)` or `never`."""
    if model.keep_alive_s < 0:
        return "never"
    if model.expires_in_s is None:
        return f"{format_duration(model.keep_alive_s)} (in use)"
    return f"{format_duration(model.keep_alive_s)} ({format_duration(round(model.expires_in_s))} left)"


def memory_cell(model: ModelStatus) -> str:
    """The estimate the budget counts for a model (its RSS is what it holds right now)."""
    return format_bytes(model.memory_estimate_bytes) if model.memory_estimate_bytes else "-"


def budget_lines(report: StatusReport) -> list[str]:
    """`bastion status`: what is held against the budget, by whom, and where the budget comes from."""
    lines = [
        f"{format_bytes(report.memory_held_bytes)} of {format_bytes(report.memory_budget_bytes)} budget held "
        f"(estimated); budget: {report.memory_budget_detail}"
    ]
    lines += [f"  {name}: {format_bytes(held)}" for name, held in sorted(report.memory_held_by.items())]
    return lines
