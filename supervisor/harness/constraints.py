"""Which grammar, if any, shapes a run's next model call (constrained decoding).

A run with tools asks the worker to constrain tool calls to the tools'
schemas, written in the syntax the model is prompted to use:

    a template that lists tools itself, ChatML/Qwen     <tool_call>\n{"name", "arguments"}\n</tool_call>
    ... Granite                                          <|tool_call|>[{"name", "arguments"}]
    ... Llama 3 family                                   {"name", "parameters"} (Llama 3.1 JSON calls)
    ... Mistral family                                   [TOOL_CALLS][{"name", "arguments"}]
    any other template (bastion describes the tools)     ```tool_call\n{"name", "arguments"}\n```

The run's tool choice decides how hard: `required` or a named tool makes the
run's first reply that call from its first token; `auto` leaves the reply free
until the model opens a call, then holds the rest of the call to the schema
(a lazy grammar, triggered by the syntax's opening text); `none` offers no tools
at all, so there is nothing to constrain. Later turns of a run are `auto`: a
forced call is answered by its result, and the model then answers freely.

Families whose call syntax puts the tool's name outside the JSON (GPT-OSS
harmony, DeepSeek's special tokens) are constrained in bastion's fenced syntax
when a call is forced, which the parser reads like any other; under `auto`
their own syntax never triggers it, so their calls are parsed unconstrained.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from bastion.protocol.control import ToolChoice, ToolChoiceMode
from bastion.protocol.worker_wire import CallGrammar
from bastion.supervisor.errors import UnknownToolError
from bastion.supervisor.templates.builtin import BuiltinTemplate
from bastion.supervisor.templates.formatter import PromptFormatter
from bastion.supervisor.tools.call_schema import call_schema
from bastion.supervisor.tools.registry import ToolSpec


class CallSyntax(msgspec.Struct, frozen=True, kw_only=True):
    prefix: str
    suffix: str
    arguments_key: str = "arguments"
    trigger: str = ""  # where a lazy grammar takes over, when not at the prefix


FENCED = CallSyntax(prefix="```tool_call\n", suffix="\n```")
_HERMES = CallSyntax(prefix="<tool_call>\n", suffix="\n</tool_call>")
_NATIVE = {
    BuiltinTemplate.CHATML: _HERMES,
    BuiltinTemplate.QWEN25: _HERMES,
    BuiltinTemplate.QWEN3: _HERMES,
    BuiltinTemplate.GRANITE: CallSyntax(prefix="<|tool_call|>[", suffix="]"),
    BuiltinTemplate.LLAMA3: CallSyntax(prefix="", suffix="", arguments_key="parameters", trigger='{"name"'),
    BuiltinTemplate.MISTRAL: CallSyntax(prefix="[TOOL_CALLS][", suffix="]"),
}


def call_syntax(formatter: PromptFormatter) -> CallSyntax:
    """The call syntax the prompt asks the model for."""
    if formatter.supports_tools and formatter.family is not None:
        return _NATIVE.get(formatter.family, FENCED)
    return FENCED


class CallConstraint:
    """The grammar for each model call of one run."""

    def __init__(self, tools: Sequence[ToolSpec], syntax: CallSyntax, choice: ToolChoice) -> None:
        self._tools = list(tools)
        self._syntax = syntax
        self._choice = choice
        if choice.mode is ToolChoiceMode.FUNCTION and choice.name not in {spec.name for spec in self._tools}:
            offered = ", ".join(spec.name for spec in self._tools) or "none"
            raise UnknownToolError(f"tool choice {choice.name!r}: no such tool is offered (offered: {offered})")

    @property
    def forces_a_call(self) -> bool:
        return self._choice.mode in (ToolChoiceMode.REQUIRED, ToolChoiceMode.FUNCTION)

    def for_turn(self, iteration: int) -> CallGrammar | None:
        if not self._tools or self._choice.mode is ToolChoiceMode.NONE:
            return None
        if iteration == 1 and self.forces_a_call:
            tools = [spec for spec in self._tools if self._choice.mode is ToolChoiceMode.REQUIRED
                     or spec.name == self._choice.name]  # fmt: skip
            return self._grammar(tools, lazy=False)
        return self._grammar(self._tools, lazy=True)

    def _grammar(self, tools: Sequence[ToolSpec], *, lazy: bool) -> CallGrammar:
        syntax = self._syntax
        return CallGrammar(schema=call_schema(tools, arguments_key=syntax.arguments_key), prefix=syntax.prefix,
                           suffix=syntax.suffix, lazy=lazy, trigger=syntax.trigger if lazy else "")
