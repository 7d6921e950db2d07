"""Constrained decoding, the supervisor's side: which grammar shapes each model
call of a run (harness/constraints.py) and the schema of a call (tools/call_schema.py).
The worker's side, with the real model, is in test_worker_grammar.py."""

from __future__ import annotations

import pytest

from bastion.protocol.control import ToolChoice, ToolChoiceMode
from bastion.protocol.worker_wire import ModelDescription
from bastion.supervisor.errors import UnknownToolError
from bastion.supervisor.harness.constraints import FENCED, CallConstraint, call_syntax
from bastion.supervisor.templates.builtin import BuiltinTemplate
from bastion.supervisor.templates.formatter import PromptFormatter
from bastion.supervisor.tools.call_schema import call_schema
from bastion.supervisor.tools.registry import ToolRegistry
from bastion.supervisor.tools.schema import validate

TOOLS = ToolRegistry.builtin().select(["calculator", "clock"])


def formatter(template: str | None = None, chat_template: str = "") -> PromptFormatter:
    description = ModelDescription(
        name="m", path="", architecture="llama", n_ctx=4096, n_ctx_train=4096, n_vocab=1, n_params=1, threads=1,
        has_chat_template=bool(chat_template), chat_template=chat_template, bos_token="<s>", eos_token="</s>",
        file_size=0, load_ms=0.0, rss_bytes=0,
    )  # fmt: skip
    return PromptFormatter.for_model(description, template)


def choice(mode: ToolChoiceMode, name: str = "") -> ToolChoice:
    return ToolChoice(mode=mode, name=name)


def test_a_call_schema_accepts_a_call_of_each_tool_and_nothing_else() -> None:
    schema = call_schema(TOOLS)
    assert validate({"name": "calculator", "arguments": {"expression": "1+1"}}, schema) == []
    assert validate({"name": "clock", "arguments": {}}, schema) == []
    assert validate({"name": "calculator", "arguments": {}}, schema)  # expression is required
    assert validate({"name": "weather", "arguments": {}}, schema)
    llama = call_schema(TOOLS[:1], arguments_key="parameters")
    assert llama["required"] == ["name", "parameters"]


def test_the_syntax_follows_what_the_prompt_teaches() -> None:
    assert call_syntax(formatter("chatml")).prefix == "<tool_call>\n"  # the ChatML built-in lists tools
    assert call_syntax(formatter("llama3")).arguments_key == "parameters"
    assert call_syntax(formatter("mistral")).prefix == "[TOOL_CALLS]["
    # A template that cannot list tools: bastion describes them and asks for its fenced block.
    assert call_syntax(formatter("gemma")) is FENCED
    plain = formatter(chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    assert not plain.supports_tools and call_syntax(plain) is FENCED
    assert BuiltinTemplate.CHATML is formatter("chatml").family


def test_required_forces_the_first_reply_only_then_calls_are_held_to_the_schema() -> None:
    constraint = CallConstraint(TOOLS, FENCED, choice(ToolChoiceMode.REQUIRED))
    first, later = constraint.for_turn(1), constraint.for_turn(2)
    assert first is not None and not first.lazy and first.prefix == "```tool_call\n" and first.suffix == "\n```"
    assert later is not None and later.lazy and later.start == "```tool_call\n"
    assert first.schema == call_schema(TOOLS)


def test_a_named_tool_forces_a_call_of_that_tool() -> None:
    constraint = CallConstraint(TOOLS, FENCED, choice(ToolChoiceMode.FUNCTION, "clock"))
    first = constraint.for_turn(1)
    assert first is not None and first.schema == call_schema(TOOLS[1:]) and constraint.forces_a_call


def test_auto_only_arms_a_lazy_grammar_and_none_constrains_nothing() -> None:
    auto = CallConstraint(TOOLS, FENCED, choice(ToolChoiceMode.AUTO))
    grammar = auto.for_turn(1)
    assert grammar is not None and grammar.lazy and not auto.forces_a_call
    assert CallConstraint(TOOLS, FENCED, choice(ToolChoiceMode.NONE)).for_turn(1) is None
    assert CallConstraint([], FENCED, choice(ToolChoiceMode.AUTO)).for_turn(1) is None


def test_a_bare_json_syntax_is_triggered_where_its_json_begins() -> None:
    constraint = CallConstraint(TOOLS, call_syntax(formatter("llama3")), choice(ToolChoiceMode.AUTO))
    grammar = constraint.for_turn(1)
    assert grammar is not None and grammar.prefix == "" and grammar.start == '{"name"'


def test_naming_a_tool_the_run_does_not_offer_is_a_usage_error() -> None:
    with pytest.raises(UnknownToolError, match="weather.*calculator, clock"):
        CallConstraint(TOOLS, FENCED, choice(ToolChoiceMode.FUNCTION, "weather"))
