"""The sandboxed tools as the model and the policy see them, derived from
their protocol records (protocol/tool_catalog.py).

The model is shown a `ToolSpec` whose schema is generated from the tool's
argument Struct; a call it makes is converted into that Struct, which is what
the policy inspects and the sandbox runs. Nothing here lists tools by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from bastion.protocol.sandbox_wire import SandboxedArgs
from bastion.protocol.tool_catalog import SandboxedTool, argument_schema
from bastion.supervisor.tools.registry import SandboxTool, ToolSpec


def sandbox_tool(record: SandboxedTool) -> SandboxTool:
    spec = ToolSpec(
        name=record.name,
        description=record.description,
        parameters=argument_schema(record.arguments),
        read_only=not record.writes,
    )
    return SandboxTool(spec=spec, record=record)


def to_arguments(record: SandboxedTool, arguments: Mapping[str, Any]) -> SandboxedArgs:
    """The typed arguments of a call the model made (already schema-checked)."""
    return msgspec.convert(dict(arguments), record.arguments)


def writable_for(record: SandboxedTool, *, allow_write: bool) -> bool:
    """Whether the workspace is mounted writable for a call of this tool: only
    for a tool that writes, and only when the run allows writes."""
    return allow_write and record.writes
