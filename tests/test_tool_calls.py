"""Reading tool calls out of small-model replies: every format they use, near-JSON, and what is not a call."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.supervisor.tools.calls import (
    CallFormat,
    CallProblem,
    ParseOutcome,
    ProblemKind,
    parse_tool_calls,
    repair_hint,
)
from bastion.supervisor.tools.registry import ToolRegistry, ToolSpec

SEARCH = ToolSpec(
    name="web_search",
    description="Search the web.",
    parameters={
        "type": "object",
        "properties": {
            "query": {"type": "string", "minLength": 1},
            "limit": {"type": "integer", "minimum": 1, "maximum": 20},
            "exact": {"type": ["boolean", "null"]},
        },
        "required": ["query"],
        "additionalProperties": False,
    },
    read_only=True,
)
_BUILTINS = ToolRegistry.builtin()
TOOLS = {spec.name: spec for spec in [*_BUILTINS.select(_BUILTINS.names()), SEARCH]}

CALC_2_2 = ("calculator", {"expression": "2+2"})
CLOCK = ("clock", {})
PARIS = ("clock", {"timezone": "Europe/Paris"})


def parse(reply: str) -> ParseOutcome:
    return parse_tool_calls(reply, TOOLS)


# (spec name, reply, expected calls, expected format, expected prose)
CASES: list[tuple[str, str, list[tuple[str, dict[str, Any]]], CallFormat, str]] = [
    ("parses_fenced_tool_call",
     '```tool_call\n{"name": "calculator", "arguments": {"expression": "2+2"}}\n```',
     [CALC_2_2], CallFormat.FENCED, ""),
    ("parses_one_line_fenced_tool_call",
     '```tool_call {"name": "calculator", "arguments": {"expression": "2+2"}}```',
     [CALC_2_2], CallFormat.FENCED, ""),
    ("parses_fenced_tool_block",
     '```tool\n{"name": "clock", "arguments": {}}\n```',
     [CLOCK], CallFormat.FENCED, ""),
    ("parses_json_fence_with_prose_around_it",
     'Sure, let me check.\n```json\n{"name": "clock", "arguments": {"timezone": "Europe/Paris"}}\n```\nOne moment.',
     [PARIS], CallFormat.FENCED_JSON, "Sure, let me check.\n\nOne moment."),
    ("parses_unlabelled_fence_holding_a_call",
     '```\n{"name": "clock", "arguments": {}}\n```',
     [CLOCK], CallFormat.FENCED_JSON, ""),
    ("parses_bare_json_object_reply",
     '{"name": "calculator", "arguments": {"expression": "2+2"}}',
     [CALC_2_2], CallFormat.BARE_JSON, ""),
    ("parses_bare_call_with_prose_before_and_after",
     'I need the time first. {"name": "clock", "arguments": {}} Then I will answer.',
     [CLOCK], CallFormat.BARE_JSON, "I need the time first. Then I will answer."),
    ("parses_two_fenced_calls_in_one_reply",
     '```tool_call\n{"name": "clock", "arguments": {}}\n```\n```tool_call\n'
     '{"name": "calculator", "arguments": {"expression": "2+2"}}\n```',
     [CLOCK, CALC_2_2], CallFormat.FENCED, ""),
    ("parses_two_calls_in_one_fence",
     '```tool_call\n{"name": "clock", "arguments": {}}\n{"name": "calculator", "arguments": {"expression": "2+2"}}\n```',
     [CLOCK, CALC_2_2], CallFormat.FENCED, ""),
    ("parses_json_array_of_calls",
     '[{"name": "clock", "arguments": {}}, {"name": "calculator", "arguments": {"expression": "2+2"}}]',
     [CLOCK, CALC_2_2], CallFormat.BARE_JSON, ""),
    ("parses_hermes_tool_call_tags",
     '<tool_call>\n{"name": "clock", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+2"}}\n</tool_call>',
     [PARIS, CALC_2_2], CallFormat.TAGGED, ""),
    ("parses_hermes_tag_left_open_at_the_end",
     'Checking.\n<tool_call>\n{"name": "clock", "arguments": {}}',
     [CLOCK], CallFormat.TAGGED, "Checking."),
    ("parses_hermes_tag_wrapping_a_fence",
     '<tool_call>\n```json\n{"name": "clock", "arguments": {}}\n```\n</tool_call>',
     [CLOCK], CallFormat.TAGGED, ""),
    ("parses_smollm_tag_holding_an_array",
     '<tool_call>[{"name": "clock", "arguments": {}}, {"name": "calculator", "arguments": {"expression": "2+2"}}]'
     "</tool_call>",
     [CLOCK, CALC_2_2], CallFormat.TAGGED, ""),
    ("parses_llama_python_tag_json",
     '<|python_tag|>{"name": "calculator", "parameters": {"expression": "2+2"}}<|eom_id|>',
     [CALC_2_2], CallFormat.PYTHON_TAG, ""),
    ("parses_llama_python_tag_call_syntax",
     '<|python_tag|>web_search.call(query="bastion agent runtime", limit=3)<|eom_id|>',
     [("web_search", {"query": "bastion agent runtime", "limit": 3})], CallFormat.PYTHON_TAG, ""),
    ("parses_mistral_tool_calls_array",
     '[TOOL_CALLS] [{"name": "clock", "arguments": {"timezone": "Europe/Paris"}}]</s>',
     [PARIS], CallFormat.MISTRAL, ""),
    ("parses_mistral_named_args_form",
     '[TOOL_CALLS]calculator[ARGS]{"expression": "2+2"}',
     [CALC_2_2], CallFormat.MISTRAL, ""),
    ("parses_openai_function_shape_with_string_arguments",
     '{"type": "function", "function": {"name": "calculator", "arguments": "{\\"expression\\": \\"2+2\\"}"}}',
     [CALC_2_2], CallFormat.BARE_JSON, ""),
    ("parses_name_and_parameters_shape",
     '{"name": "clock", "parameters": {"timezone": "Europe/Paris"}}',
     [PARIS], CallFormat.BARE_JSON, ""),
    ("parses_tool_and_args_shape",
     '{"tool": "calculator", "args": {"expression": "2+2"}}',
     [CALC_2_2], CallFormat.BARE_JSON, ""),
    ("parses_tool_calls_wrapper",
     '{"tool_calls": [{"id": "c1", "type": "function", "function": {"name": "clock", "arguments": {}}}]}',
     [CLOCK], CallFormat.BARE_JSON, ""),
    ("parses_a_name_only_reply_for_a_tool_without_required_arguments",
     '{"name": "clock"}',
     [CLOCK], CallFormat.BARE_JSON, ""),
    ("matches_a_tool_name_written_in_another_case",
     '```tool_call\n{"name": "Calculator", "arguments": {"expression": "2+2"}}\n```',
     [CALC_2_2], CallFormat.FENCED, ""),
    ("reads_past_a_closing_tag_quoted_in_an_argument",
     '<tool_call>{"name": "web_search", "arguments": {"query": "</tool_call> vs <tool_call>"}}</tool_call>',
     [("web_search", {"query": "</tool_call> vs <tool_call>"})], CallFormat.TAGGED, ""),
    ("reads_past_a_fence_quoted_in_an_argument",
     '```tool_call\n{"name": "web_search", "arguments": {"query": "```python"}}\n```\nDone.',
     [("web_search", {"query": "```python"})], CallFormat.FENCED, "Done."),
    ("reads_a_bare_call_quoting_a_marker",
     '{"name": "web_search", "arguments": {"query": "what does [TOOL_CALLS] mean"}}',
     [("web_search", {"query": "what does [TOOL_CALLS] mean"})], CallFormat.BARE_JSON, ""),
    ("drops_null_for_an_optional_argument",
     '```tool_call\n{"name": "clock", "arguments": {"timezone": null}}\n```',
     [CLOCK], CallFormat.FENCED, ""),
]  # fmt: skip

# Near-JSON that small models write, each needing the repair pass.
REPAIRED: list[tuple[str, str, list[tuple[str, dict[str, Any]]], CallFormat]] = [
    ("repairs_trailing_commas",
     '```tool_call\n{"name": "calculator", "arguments": {"expression": "2+2",},}\n```',
     [CALC_2_2], CallFormat.FENCED),
    ("repairs_single_quotes",
     "{'name': 'web_search', 'arguments': {'query': 'what's new in \"bastion\"'}}",
     [("web_search", {"query": 'what\'s new in "bastion"'})], CallFormat.BARE_JSON),
    ("repairs_raw_newlines_and_tabs_in_strings",
     '<tool_call>{"name": "web_search", "arguments": {"query": "line one\nline\ttwo"}}</tool_call>',
     [("web_search", {"query": "line one\nline\ttwo"})], CallFormat.TAGGED),
    ("repairs_python_literals",
     '```tool_call\n{"name": "web_search", "arguments": {"query": "x", "exact": True}}\n```',
     [("web_search", {"query": "x", "exact": True})], CallFormat.FENCED),
    ("repairs_python_none",
     '```tool_call\n{"name": "web_search", "arguments": {"query": "x", "exact": None}}\n```',
     [("web_search", {"query": "x", "exact": None})], CallFormat.FENCED),
    ("repairs_unquoted_keys",
     '{name: "clock", arguments: {timezone: "Europe/Paris"}}',
     [PARIS], CallFormat.BARE_JSON),
    ("repairs_a_missing_final_brace",
     '```tool_call\n{"name": "calculator", "arguments": {"expression": "2+2"}\n```',
     [CALC_2_2], CallFormat.FENCED),
    ("repairs_a_missing_final_brace_before_prose",
     '{"name": "calculator", "arguments": {"expression": "2+2"} I will wait for the result.',
     [CALC_2_2], CallFormat.BARE_JSON),
    ("repairs_a_reply_cut_off_inside_a_string",
     '<tool_call>{"name": "web_search", "arguments": {"query": "local models',
     [("web_search", {"query": "local models"})], CallFormat.TAGGED),
    ("repairs_near_json_string_arguments",
     '{"function": {"name": "calculator", "arguments": "{\'expression\': \'2+2\',}"}}',
     [CALC_2_2], CallFormat.BARE_JSON),
]  # fmt: skip


@pytest.mark.parametrize(("reply", "calls", "fmt", "prose"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])  # fmt: skip
def test_reads_calls_in_every_format(
    reply: str, calls: list[tuple[str, dict[str, Any]]], fmt: CallFormat, prose: str
) -> None:
    outcome = parse(reply)
    assert outcome.problems == ()
    assert [(call.name, call.arguments) for call in outcome.calls] == calls
    assert {call.format for call in outcome.calls} == {fmt}
    assert not any(call.repaired for call in outcome.calls)
    assert outcome.prose == prose


@pytest.mark.parametrize(("reply", "calls", "fmt"), [case[1:] for case in REPAIRED],
                         ids=[case[0] for case in REPAIRED])  # fmt: skip
def test_repairs_near_json(reply: str, calls: list[tuple[str, dict[str, Any]]], fmt: CallFormat) -> None:
    outcome = parse(reply)
    assert outcome.problems == ()
    assert [(call.name, call.arguments) for call in outcome.calls] == calls
    assert all(call.format is fmt and call.repaired for call in outcome.calls)


NOT_CALLS = [
    ("plain_prose_yields_no_calls", "The capital of France is Paris."),
    ("empty_reply_yields_no_calls", ""),
    ("prose_mentioning_json_yields_no_calls", 'You can answer in JSON, e.g. with a "name" field and {braces}.'),
    ("sentence_with_braces_yields_no_calls", "In set notation, {1, 2, 3} has three elements; {x | x > 0} is open."),
    ("json_code_sample_is_not_a_call", 'Here is the data:\n```json\n{"city": "Paris", "temp": 21}\n```'),
    ("json_array_of_records_is_not_a_call", '[{"id": 1, "title": "a"}, {"id": 2, "title": "b"}]'),
    ("object_with_a_name_field_in_prose_is_not_a_call", 'The record {"name": "Ada", "born": 1815} is complete.'),
    ("a_list_of_named_records_is_not_a_call", '[{"name": "Ada"}, {"name": "Bob"}]'),
    ("a_tool_name_alone_inside_prose_is_not_a_call", 'Try {"name": "clock"} if you like.'),
    ("a_tool_description_is_not_a_call", '{"name": "calculator", "description": "does sums"}'),
    ("python_fence_is_prose_even_with_a_call_inside",
     '```python\nrequests.post(url, json={"name": "clock", "arguments": {}})\n```'),
    ("broken_json_in_prose_is_just_text", 'Results: {"name": "x", "arguments": {oops'),
]  # fmt: skip


@pytest.mark.parametrize("reply", [case[1] for case in NOT_CALLS], ids=[case[0] for case in NOT_CALLS])
def test_text_that_is_not_a_call_yields_nothing(reply: str) -> None:
    assert parse(reply) == ParseOutcome(prose=reply.strip())


def test_unknown_tool_is_a_problem_whose_hint_lists_the_tools() -> None:
    reply = '```tool_call\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```'
    outcome = parse(reply)
    assert outcome.calls == ()
    [problem] = outcome.problems
    assert problem.kind is ProblemKind.UNKNOWN_TOOL and problem.name == "get_weather"
    assert "no tool named 'get_weather'" in problem.message
    assert "Available tools: clock, calculator, web_search." in problem.hint
    assert problem.raw == reply and outcome.prose == ""


def test_a_misspelt_tool_name_gets_a_suggestion() -> None:
    [problem] = parse('{"name": "calculater", "arguments": {"expression": "1"}}').problems
    assert problem.hint.startswith("Did you mean calculator?")


def test_invalid_arguments_are_a_problem_naming_the_path_and_the_schema() -> None:
    [problem] = parse(
        '<tool_call>{"name": "calculator", "arguments": {"expression": 4}}</tool_call>'
    ).problems
    assert problem.kind is ProblemKind.INVALID_ARGUMENTS and problem.name == "calculator"
    assert problem.message == "calculator: $.arguments.expression: expected string, got number"
    assert problem.hint == 'calculator takes {"expression": string (required)}.'


def test_missing_required_argument_is_invalid_arguments() -> None:
    [problem] = parse('{"name": "web_search", "arguments": {"limit": 99}}').problems
    assert problem.kind is ProblemKind.INVALID_ARGUMENTS
    assert "$.arguments.query: required property is missing" in problem.message
    assert "$.arguments.limit: must be <= 20, got 99" in problem.message
    assert '"query": string (required)' in problem.hint and '"limit": integer' in problem.hint


@pytest.mark.parametrize(
    "reply",
    [
        "```tool_call\ncalculator(expression=2+2)\n```",
        '```tool_call\n{"name": "calculator", "arguments": {"expression": "2+2"} oops }\n```',
        "<tool_call>the calculator please</tool_call>",
        '```tool_call\n{"city": "Paris"}\n```',
        "```tool_call\n```",
        "[TOOL_CALLS] not json",
        "<|python_tag|>import os; os.system('rm -rf /')",
    ],
    ids=["call_syntax_in_a_json_block", "junk_inside_the_object", "words_in_tags", "object_that_is_not_a_call",
         "empty_block", "mistral_marker_with_text", "python_tag_with_statements"],
)  # fmt: skip
def test_malformed_marked_call_is_a_problem_with_the_expected_format(reply: str) -> None:
    outcome = parse(reply)
    assert outcome.calls == ()
    [problem] = outcome.problems
    assert problem.kind is ProblemKind.MALFORMED and problem.name == ""
    assert '```tool_call\n{"name": "TOOL_NAME", "arguments": {...}}\n```' in problem.hint
    assert problem.raw == reply


def test_calls_and_problems_keep_reply_order_across_formats() -> None:
    reply = (
        'First <tool_call>{"name": "clock", "arguments": {}}</tool_call> then\n'
        '```tool_call\n{"name": "nope", "arguments": {}}\n```\n'
        'and {"name": "calculator", "arguments": {"expression": "2+2"}} last\n'
        '<|python_tag|>{"name": "web_search", "parameters": {"query": "q"}}'
    )
    outcome = parse(reply)
    assert [(call.name, call.format) for call in outcome.calls] == [
        ("clock", CallFormat.TAGGED), ("calculator", CallFormat.BARE_JSON), ("web_search", CallFormat.PYTHON_TAG),
    ]  # fmt: skip
    assert [problem.name for problem in outcome.problems] == ["nope"]
    assert outcome.prose == "First then\n\nand last"


def test_a_valid_and_an_invalid_call_in_one_reply_give_one_of_each() -> None:
    outcome = parse('[{"name": "clock", "arguments": {}}, {"name": "clock", "arguments": {"tz": "UTC"}}]')
    assert [call.name for call in outcome.calls] == ["clock"]
    assert [problem.kind for problem in outcome.problems] == [ProblemKind.INVALID_ARGUMENTS]


def test_each_call_keeps_the_text_it_came_from() -> None:
    call_text = '{"name": "clock", "arguments": {}}'
    [call] = parse(f"Let me look. {call_text}").calls
    assert call.raw == call_text


def test_no_tools_means_no_parsing() -> None:
    reply = '```tool_call\n{"name": "clock", "arguments": {}}\n```'
    assert parse_tool_calls(reply, {}) == ParseOutcome(prose=reply)


def test_repair_hint_is_one_short_message_naming_each_problem() -> None:
    problems = parse(
        '```tool_call\n{"name": "get_weather", "arguments": {}}\n```\n'
        '```tool_call\n{"name": "calculator", "arguments": {}}\n```'
    ).problems
    hint = repair_hint(problems)
    assert hint.startswith("Your tool calls were not run.")
    assert "no tool named 'get_weather'" in hint and "Available tools: clock, calculator, web_search." in hint
    assert "$.arguments.expression: required property is missing" in hint
    assert hint.endswith("Reply with a corrected ```tool_call``` block, or answer without a tool.")
    assert len(hint) < 600
    assert repair_hint([]) == ""


def test_outcomes_are_frozen_structs() -> None:
    outcome = parse('{"name": "clock", "arguments": {}}')
    with pytest.raises(AttributeError):
        outcome.prose = "x"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        outcome.calls[0].name = "x"  # type: ignore[misc]
    assert isinstance(outcome.calls, tuple) and isinstance(CallProblem, type)


_FRAGMENTS = st.sampled_from([
    "```", "```tool_call\n", "```json\n", "<tool_call>", "</tool_call>", "<|python_tag|>", "<|eom_id|>",
    "[TOOL_CALLS]", "[ARGS]", "{", "}", "[", "]", '"', "'", ":", ",", '"name"', '"arguments"', "clock",
    "calculator", "True", "None", "\n", " ", "\\", "(", ")", "=", ".call", "1e", "nope",
    # Every other family's markers (test_call_formats.py).
    "<function=", "<function name=", "</function>", "<parameter=", "</parameter>", "<arg_key>", "</arg_key>",
    "<arg_value>", "</arg_value>", "<seed:tool_call>", "<minimax:tool_call>", '<invoke name="', ">>>", "all\n",
    "[CALL_ID]", "<|python_start|>", "<|python_end|>", "```tool_code\n", "<｜tool▁calls▁begin｜>",
    "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>", "function", "<|channel|>", "<|start|>",
    "<|message|>", " to=functions.", "commentary", "<|constrain|>", "<|call|>", "<|end|>",
    "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>", ":0", "<|tools_prefix|>",
    "<|START_ACTION|>", "<|tool_call|>", "functools[", "<TOOLCALL>", "<function_call>", "`",
])  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.text() | st.lists(_FRAGMENTS | st.text(max_size=3), max_size=40).map("".join))
@pytest.mark.filterwarnings("ignore::SyntaxWarning")  # ast.parse's complaints about model text
def test_parser_never_raises_on_arbitrary_text(reply: str) -> None:
    outcome = parse(reply)
    assert all(call.name in TOOLS for call in outcome.calls)
    assert isinstance(repair_hint(outcome.problems), str)


_FRAMES = ["```tool_call\n{}\n```", "<tool_call>{}</tool_call>", "{}", "```json\n{}\n```", "[TOOL_CALLS][{}]",
           "<|python_tag|>{}<|eom_id|>", "Sure. {} Done."]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60) | st.lists(_FRAGMENTS, max_size=8).map("".join), st.sampled_from(_FRAMES))
def test_a_well_formed_call_round_trips_whatever_its_argument_text(query: str, frame: str) -> None:
    call = json.dumps({"name": "web_search", "arguments": {"query": query}}, ensure_ascii=False)
    outcome = parse(frame.replace("{}", call))
    if query:
        assert [(c.name, c.arguments) for c in outcome.calls] == [("web_search", {"query": query})]
        assert outcome.problems == ()
    else:  # minLength 1
        assert [p.kind for p in outcome.problems] == [ProblemKind.INVALID_ARGUMENTS]


def test_parses_a_pythonic_call_of_a_known_tool_in_a_fence() -> None:
    from bastion.supervisor.tools.registry import ToolSpec

    write = ToolSpec(name="write_file", description="w", read_only=False, parameters={
        "type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
        "required": ["path", "content"]})
    outcome = parse_tool_calls('```\nwrite_file("hello.txt", "hi there")\n```\nThis saves it.', {"write_file": write})
    [call] = outcome.calls
    assert call.name == "write_file" and call.arguments == {"path": "hello.txt", "content": "hi there"}
    assert call.format.value == "pythonic" and outcome.prose == "This saves it."


def test_python_code_that_calls_no_known_tool_is_prose() -> None:
    from bastion.supervisor.tools.registry import ToolSpec

    write = ToolSpec(name="write_file", description="w", read_only=False, parameters={
        "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]})
    outcome = parse_tool_calls('```python\nprint("hello")\n```', {"write_file": write})
    assert outcome.calls == () and outcome.problems == ()
