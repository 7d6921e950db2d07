"""Every model family's native tool-call format, as the model writes it, read into typed calls.

Each case cites where its reply text comes from: llama.cpp's tests/test-chat.cpp
(LC, test_template_output_parsers or test_template_output_peg_parsers, by the
template block it sits in) or vLLM's tool-parser tests (VL, file::test or
constant). Tool names and arguments follow those tests (call_samples.py).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from bastion.supervisor.tools.calls import CallFormat, ParseOutcome
from bastion.supervisor.tools.reasoning import ReasoningFormat, split_reasoning
from tests.call_samples import ARG1, CASES, calls_of, parse

F = CallFormat


@pytest.mark.parametrize(("source", "reply", "calls", "fmt", "prose"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])  # fmt: skip
def test_reads_each_family_native_format(
    source: str, reply: str, calls: list[tuple[str, dict[str, Any]]], fmt: CallFormat, prose: str
) -> None:
    outcome = parse(reply)
    assert outcome.problems == (), source
    assert calls_of(outcome) == calls, source
    assert {call.format for call in outcome.calls} == {fmt}, source
    assert outcome.prose == prose, source


@pytest.mark.parametrize("reply", [case[2] for case in CASES], ids=[case[0] for case in CASES])
def test_a_call_quoted_inside_reasoning_is_never_parsed(reply: str) -> None:
    thought = f"<think>I could answer with {reply} but the user only said hello.</think>Hello!"
    split = split_reasoning(thought, ReasoningFormat.THINK_TAGS)
    assert split.content == "Hello!" and reply in split.reasoning
    outcome = parse(split.content)
    assert outcome.calls == () and outcome.problems == ()


# A sample shows the syntax with a tool that does not exist; a reply naming no tool cannot be shown so.
_NAMES_NO_TOOL = "parses_python_tag_code_as_a_call_of_the_python_tool"
SAMPLES = [case for case in CASES if "```" not in case[2] and case[0] != _NAMES_NO_TOOL]
_TOOL_NAME = re.compile(r"(?<![\w|])(?:special_function_with_opt|special_function|complex_function|"
                        r"register_user|get_weather|python|now)(?![\w|])")  # fmt: skip


@pytest.mark.parametrize("reply", [case[2] for case in SAMPLES], ids=[case[0] for case in SAMPLES])
def test_the_same_syntax_shown_in_a_code_sample_is_not_a_call(reply: str) -> None:
    sample = "Here is the format:\n```text\n" + _TOOL_NAME.sub("lookup_stock", reply) + "\n```\nThat is all."
    assert parse(sample) == ParseOutcome(prose=sample.strip())


def test_a_call_quoted_in_inline_code_amid_prose_is_shown_not_made() -> None:
    shown = 'Write `{"name": "special_function", "arguments": {"arg1": 1}}` or `<tool_call>` to call it.'
    assert parse(shown) == ParseOutcome(prose=shown)
    # A reply that is nothing but the call in backticks is still a call.
    alone = parse('`{"name": "special_function", "arguments": {"arg1": 1}}`')
    assert calls_of(alone) == [ARG1] and alone.calls[0].format is F.BARE_JSON


def test_calls_of_different_families_keep_reply_order() -> None:
    reply = ('First <tool_call>{"name": "now", "arguments": {}}</tool_call> then '
             '<function=special_function>{"arg1": 1}</function> and last\n'
             "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
             "</tool_call>")  # fmt: skip
    outcome = parse(reply)
    assert [(call.name, call.format) for call in outcome.calls] == [
        ("now", F.TAGGED), ("special_function", F.FUNCTION_TAG), ("get_weather", F.GLM)
    ]  # fmt: skip
    assert outcome.prose == "First then and last"


def test_special_tokens_around_calls_leave_the_prose() -> None:
    # A split harmony reply: the final answer's header, then a call (LC openai-gpt-oss-120b).
    reply = ("<|start|>assistant<|channel|>final<|message|>Checking now.<|end|>"
             '<|channel|>commentary to=functions.special_function<|message|>{"arg1": 1}<|call|>')  # fmt: skip
    outcome = parse(reply)
    assert calls_of(outcome) == [ARG1] and outcome.prose == "Checking now."
