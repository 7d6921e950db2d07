"""One record per sandboxed tool (protocol/tool_catalog.py), and everything
every process derives from it: the schema the model sees, the trust flags, the
policy's file tools, the sandbox's file tools and its write refusal."""

from __future__ import annotations

import typing

import msgspec
import pytest

from bastion.protocol.sandbox_wire import SandboxedArgs, ShellArgs, ToolArguments, tool_name
from bastion.protocol.tool_catalog import (
    FILE_TOOLS,
    SANDBOXED_TOOLS,
    WRITE_TOOLS,
    ToolKind,
    TrustFlag,
    argument_schema,
    sandboxed_tool,
    tool_of,
)
from bastion.supervisor.errors import TrustFlagError, UnknownToolError
from bastion.supervisor.tools.registry import BuiltinTool, SandboxTool, ToolRegistry
from bastion.supervisor.tools.schema import check_schema
from bastion.tools_sandbox.file_tools.job import FileToolArgs

_PATH = {"type": "string", "description": "a path relative to the workspace"}

# What the model is shown for each tool, written out: a change to an argument
# Struct that changes what the model reads must show up here.
EXPECTED_SCHEMAS = {
    "shell": {"type": "object", "properties": {"command": {"type": "string"},
                                               "timeout_s": {"type": "number", "minimum": 1}},
              "required": ["command"], "additionalProperties": False},
    "read_file": {"type": "object", "properties": {"path": _PATH, "offset": {"type": "integer", "minimum": 0},
                                                   "limit": {"type": "integer", "minimum": 1}},
                  "required": ["path"], "additionalProperties": False},
    "list_dir": {"type": "object", "properties": {"path": _PATH}, "required": [], "additionalProperties": False},
    "glob": {"type": "object", "properties": {"pattern": {"type": "string"}}, "required": ["pattern"],
             "additionalProperties": False},
    "grep": {"type": "object", "properties": {"pattern": {"type": "string"}, "path": _PATH, "glob": {"type": "string"}},
             "required": ["pattern"], "additionalProperties": False},
    "edit_file": {"type": "object", "properties": {"path": _PATH, "old": {"type": "string"}, "new": {"type": "string"}},
                  "required": ["path", "old", "new"], "additionalProperties": False},
    "write_file": {"type": "object", "properties": {"path": _PATH, "content": {"type": "string"}},
                   "required": ["path", "content"], "additionalProperties": False},
}  # fmt: skip


def test_every_argument_struct_has_exactly_one_record() -> None:
    structs = set(typing.get_args(SandboxedArgs))
    assert {tool.arguments for tool in SANDBOXED_TOOLS} == structs
    assert len(SANDBOXED_TOOLS) == len(structs)


@pytest.mark.parametrize("tool", SANDBOXED_TOOLS, ids=lambda tool: tool.name)
def test_the_schema_is_generated_from_the_struct_as_the_model_expects_it(tool) -> None:
    schema = argument_schema(tool.arguments)
    assert schema == EXPECTED_SCHEMAS[tool.name]
    # Key order is what the model reads, so it is part of the contract too.
    assert msgspec.json.encode(schema) == msgspec.json.encode(EXPECTED_SCHEMAS[tool.name])
    check_schema(schema)


def test_optional_fields_are_left_out_rather_than_null() -> None:
    for tool in SANDBOXED_TOOLS:
        for name, prop in argument_schema(tool.arguments)["properties"].items():
            assert "anyOf" not in prop and prop.get("type") != "null", (tool.name, name)


def test_a_record_finds_its_tool_by_name_and_by_arguments() -> None:
    shell = sandboxed_tool("shell")
    assert shell is not None and shell.arguments is ShellArgs
    assert tool_of(ShellArgs(command="ls")) is shell and tool_name(ShellArgs(command="ls")) == "shell"
    assert sandboxed_tool("calculator") is None


def test_the_derived_sets_follow_the_records() -> None:
    assert FILE_TOOLS == {tool.name for tool in SANDBOXED_TOOLS if tool.kind is ToolKind.FILE}
    assert WRITE_TOOLS == {"write_file", "edit_file"}
    # The sandbox's file-tool program accepts exactly the file tools' Structs.
    file_structs = {tool.arguments for tool in SANDBOXED_TOOLS if tool.kind is ToolKind.FILE}
    assert set(typing.get_args(FileToolArgs)) == file_structs
    assert {tool.name for tool in SANDBOXED_TOOLS if tool.enabled_by is TrustFlag.ALLOW_WRITE} == WRITE_TOOLS
    # Whatever can change the workspace is off until a flag turns it on.
    assert all(tool.enabled_by is not None for tool in SANDBOXED_TOOLS if tool.writes)


def test_the_registry_offers_files_by_its_flags_in_a_stable_order() -> None:
    registry = ToolRegistry.standard()
    read_only = [t.spec.name for t in registry.for_run(["files"], allow_shell=False, allow_write=False)]
    assert read_only == ["read_file", "list_dir", "glob", "grep"]
    writable = [t.spec.name for t in registry.for_run(["files", "clock"], allow_shell=False, allow_write=True)]
    assert writable == ["read_file", "list_dir", "glob", "grep", "edit_file", "write_file", "clock"]
    both = registry.for_run(["calculator", "shell"], allow_shell=True, allow_write=False)
    assert [type(t) for t in both] == [BuiltinTool, SandboxTool]


def test_a_tool_whose_flag_is_off_is_refused_not_dropped() -> None:
    registry = ToolRegistry.standard()
    with pytest.raises(TrustFlagError, match="--allow-shell"):
        registry.for_run(["shell"], allow_shell=False, allow_write=True)
    with pytest.raises(TrustFlagError, match="write_file writes files.*--allow-write"):
        registry.for_run(["write_file"], allow_shell=True, allow_write=False)


def test_an_unknown_tool_names_what_is_available() -> None:
    with pytest.raises(UnknownToolError, match=r"teleport.*available: .*calculator.*files"):
        ToolRegistry.standard().for_run(["calculator", "teleport"], allow_shell=False, allow_write=False)


def test_a_new_record_is_a_new_tool_without_touching_any_table() -> None:
    class FetchArgs(ToolArguments, tag="fetch_url"):
        url: str

    from bastion.protocol.sandbox_wire import ConfinementLevel
    from bastion.protocol.tool_catalog import SandboxedTool
    from bastion.supervisor.tools.sandboxed import sandbox_tool

    record = SandboxedTool(arguments=FetchArgs, description="Fetch a URL.", kind=ToolKind.SHELL, writes=False,
                           required_level=ConfinementLevel.STRONG)
    registry = ToolRegistry.standard()
    registry.add(sandbox_tool(record))
    [tool] = registry.for_run(["fetch_url"], allow_shell=False, allow_write=False)
    assert tool.spec.parameters["required"] == ["url"] and tool.spec.read_only
