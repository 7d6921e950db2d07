"""Whatever a model writes, parsing stays correct, never raises, and stays fast.

Property tests round-trip a call's argument text through every family's native
frame (markers quoted in the text must not end the call), throw every family's
markers at the parser, and time hostile replies built to make a naive scan
quadratic.
"""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.supervisor.tools.calls import ParseOutcome, ProblemKind, parse_tool_calls, repair_hint
from bastion.supervisor.tools.typed_values import trim_block
from tests.call_samples import TOOLS, tool

SEARCH = tool("web_search", {"query": {"type": "string", "minLength": 1}}, ("query",))
ALL_TOOLS = {**TOOLS, SEARCH.name: SEARCH}


def parse(reply: str) -> ParseOutcome:
    return parse_tool_calls(reply, ALL_TOOLS)


# Frames whose arguments are JSON: {} stands for {"query": ...}.
JSON_FRAMES = [
    "[TOOL_CALLS]web_search[ARGS]{}", "[TOOL_CALLS]web_search[CALL_ID]a1b2c3d4e[ARGS]{}",
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>web_search<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>function<｜tool▁sep｜>web_search\n```json\n{}\n```<｜tool▁call▁end｜>",
    "<|tool_calls_section_begin|><|tool_call_begin|>functions.web_search:0<|tool_call_argument_begin|>{}"
    "<|tool_call_end|><|tool_calls_section_end|>",
    "<|channel|>commentary to=functions.web_search <|constrain|>json<|message|>{}<|call|>",
    ">>>web_search\n{}", "<function=web_search>{}</function>", '<function name="web_search">{}</function>',
    '<|tools_prefix|>[{"web_search": {}}]<|tools_suffix|>',
    '<|START_ACTION|>[{"tool_call_id": "0", "tool_name": "web_search", "parameters": {}}]<|END_ACTION|>',
    '<|tool_call|>[{"name": "web_search", "arguments": {}}]',
    'functools[{"name": "web_search", "arguments": {}}]',
    '<TOOLCALL>[{"name": "web_search", "arguments": {}}]</TOOLCALL>',
    '<seed:tool_call>{"name": "web_search", "arguments": {}}</seed:tool_call>',
]  # fmt: skip
# Frames whose argument is text between tags: {} stands for the query, written between the pads.
TEXT_FRAMES = [
    ("<tool_call>\n<function=web_search>\n<parameter=query>{}</parameter>\n</function>\n</tool_call>", "\n"),
    ("<tool_call>web_search\n<arg_key>query</arg_key>\n<arg_value>{}</arg_value>\n</tool_call>", ""),
    ('<minimax:tool_call><invoke name="web_search"><parameter name="query">{}</parameter></invoke>'
     "</minimax:tool_call>", ""),
]  # fmt: skip
MARKERS = [
    "<tool_call>", "</tool_call>", "<function=", "</function>", "<parameter=", "</parameter>", "<arg_key>",
    "<arg_value>", "</arg_value>", ">>>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "<｜tool▁call▁begin｜>",
    "<｜tool▁sep｜>", "<｜tool▁call▁end｜>", "<|channel|>", "<|message|>", "<|call|>", "<|end|>",
    " to=functions.", "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>",
    "functools[", "<|python_start|>", "<|python_tag|>", "```", "```xml\n", "```tool_code\n", "`", "<think>",
    "</think>", "{", "}", "[", "]", '"', "\n", " ", "web_search", "special_function", "(", ")", "=", "all\n",
    "<|tools_prefix|>", "<|START_ACTION|>",
]  # fmt: skip
_TEXT = st.text(max_size=40) | st.lists(st.sampled_from(MARKERS), max_size=6).map("".join)


@settings(max_examples=300, deadline=None)
@given(_TEXT, st.sampled_from(JSON_FRAMES))
def test_a_native_json_call_round_trips_whatever_its_argument_text(query: str, frame: str) -> None:
    reply = frame.replace("{}", json.dumps({"query": query}, ensure_ascii=False), 1)
    outcome = parse(reply)
    if query:
        assert [(c.name, c.arguments) for c in outcome.calls] == [("web_search", {"query": query})], reply
        assert outcome.problems == ()
    else:  # minLength 1
        assert [p.kind for p in outcome.problems] == [ProblemKind.INVALID_ARGUMENTS]


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(blacklist_characters="<\r", blacklist_categories=("Cs",)), max_size=40),
       st.sampled_from(TEXT_FRAMES))  # fmt: skip
def test_a_text_valued_call_round_trips_its_argument_text(query: str, frame: tuple[str, str]) -> None:
    template, pad = frame
    outcome = parse(template.replace("{}", pad + query + pad, 1))
    expected = trim_block(pad + query + pad)
    if expected:
        assert [(c.name, c.arguments) for c in outcome.calls] == [("web_search", {"query": expected})]
    else:
        assert [p.kind for p in outcome.problems] == [ProblemKind.INVALID_ARGUMENTS]


@settings(max_examples=400, deadline=None)
@given(st.text() | st.lists(st.sampled_from(MARKERS) | st.text(max_size=3), max_size=40).map("".join))
@pytest.mark.filterwarnings("ignore::SyntaxWarning")  # ast.parse's complaints about model text
def test_every_familys_markers_never_make_the_parser_raise(reply: str) -> None:
    outcome = parse(reply)
    assert all(call.name in ALL_TOOLS for call in outcome.calls)
    assert all(problem.message and problem.resembled for problem in outcome.problems)
    assert isinstance(repair_hint(outcome.problems), str)


HOSTILE = {
    "unclosed_tool_call_tags": "<tool_call>" * 20_000,
    "unclosed_function_tags": "<function=a>" * 20_000,
    "unclosed_parameters": "<tool_call><function=x>" + "<parameter=a>" * 20_000,
    "unclosed_glm_values": "<tool_call>x\n" + "<arg_key>a</arg_key><arg_value>" * 10_000,
    "mistral_calls_without_arguments": "[TOOL_CALLS]a[ARGS]{" * 10_000,
    "deepseek_calls_without_separators": "<｜tool▁call▁begin｜>" * 10_000,
    "harmony_headers_without_messages": "<|start|>assistant to=functions.x" * 10_000,
    "harmony_calls_without_ends": "<|channel|>commentary to=functions.x<|message|>{" * 5_000,
    "functionary_segments": ">>>special_function\n{" * 20_000,
    "fences": "```xml\n<function=special_function>\n```\n" * 5_000,
    "quoted_markers_on_one_line": "`<tool_call>`" * 10_000,
    "open_braces": 'a {"name": "x", "arguments": {' * 5_000,
    "pythonic_list": "[" + "f(a=1)," * 20_000 + "]",
    "minimax_invokes": "<minimax:tool_call>" + '<invoke name="x">' * 10_000,
}


@pytest.mark.parametrize("reply", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_reply_is_parsed_in_bounded_time(reply: str) -> None:
    started = time.perf_counter()
    parse(reply)
    # Linear work takes well under a tenth of this on a loaded machine; quadratic work takes minutes.
    assert time.perf_counter() - started < 5.0
