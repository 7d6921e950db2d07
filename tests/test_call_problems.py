"""Text that looks like a call but cannot be read, and text that only shows call syntax.

A region marked in a family's own call syntax that cannot be read is a MALFORMED
problem whose message names the format it resembled, never silence; syntax
shown in a code sample or quoted in inline code is prose. Malformed replies
are variations on the positive cases of test_call_formats.py (same sources);
the phi4 ones are vLLM's tests/entrypoints/openai/tool_parsers/test_phi4mini_tool_parser.py
malformed_input_outputs.
"""

from __future__ import annotations

import pytest

from bastion.supervisor.tools.calls import CallFormat, ParseOutcome, ProblemKind, repair_hint
from tests.call_samples import ARG1, calls_of, parse

F = CallFormat

# (spec, reply, format resembled, what the message must say)
MALFORMED: list[tuple[str, str, CallFormat, str]] = [
    ("qwen3_coder_parameter_left_open_at_the_end",
     "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar",
     F.QWEN3_CODER, "looks like a Qwen3-Coder <function=...><parameter=...> call, "
                    "but the <parameter=city> block is not closed"),
    ("qwen3_coder_text_between_parameters",
     "<tool_call><function=get_weather>city is Paris</function></tool_call>",
     F.FUNCTION_TAG, "looks like a <function=NAME> call, but the arguments of get_weather are not JSON"),
    ("qwen3_coder_stray_text_after_a_parameter",
     "<tool_call><function=get_weather><parameter=city>Paris</parameter> and then</function></tool_call>",
     F.QWEN3_CODER, "'and then' stands outside any <parameter> block"),
    ("seed_oss_parameter_left_open",
     "<seed:tool_call>\n<function=special_function>\n<parameter=arg1>\n4",
     F.QWEN3_CODER, "the <parameter=arg1> block is not closed"),
    ("glm_key_without_value",
     "<tool_call>get_weather\n<arg_key>city</arg_key>\n</tool_call>",
     F.GLM, "looks like a GLM <tool_call>NAME<arg_key>...</arg_key> call, but <arg_key>city</arg_key> has no "
            "<arg_value>"),
    ("glm_value_left_open_at_the_end",
     "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Par",
     F.GLM, "the <arg_value> of city is not closed"),
    ("minimax_without_an_invoke",
     "<minimax:tool_call>\nget_weather Paris\n</minimax:tool_call>",
     F.MINIMAX, 'looks like a MiniMax <invoke name=...> call, but it holds no <invoke name="..."> block'),
    ("function_tag_with_words_for_arguments",
     "<function=special_function>one</function>",
     F.FUNCTION_TAG, "the arguments of special_function are not JSON"),
    ("functionary_segment_of_a_known_tool_without_json",
     "all\nSure.\n>>>special_function\nplease use one\n",
     F.FUNCTIONARY,
     "looks like a Functionary v3.2 >>>NAME call, but what follows >>>special_function is not a JSON"),
    ("deepseek_call_without_a_separator",
     "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>special_function {\"arg1\": 1}<｜tool▁call▁end｜>",
     F.DEEPSEEK, "looks like a DeepSeek <｜tool▁call▁begin｜> call, but no tool name and <｜tool▁sep｜>"),
    ("deepseek_arguments_that_are_not_json",
     "<｜tool▁call▁begin｜>function<｜tool▁sep｜>special_function\n```json\narg1 = 1\n```<｜tool▁call▁end｜>",
     F.DEEPSEEK, "the arguments of special_function are not JSON"),
    ("harmony_header_that_never_reaches_its_message",
     "<|channel|>commentary to=functions.special_function <|constrain|>json",
     F.HARMONY,
     "looks like a GPT-OSS harmony to=functions.NAME call, but its header never reaches <|message|>"),
    ("harmony_arguments_that_are_not_json",
     "<|channel|>commentary to=functions.special_function<|message|>foo<|call|>",
     F.HARMONY, "the arguments of functions.special_function are not JSON"),
    ("kimi_call_id_without_arguments",
     "<|tool_calls_section_begin|><|tool_call_begin|>"
     "functions.special_function:0{\"arg1\": 1}<|tool_call_end|>",
     F.KIMI, "looks like a Kimi K2 <|tool_call_begin|> call, but the call id is not followed by"),
    ("mistral_named_call_with_broken_arguments",
     "[TOOL_CALLS]special_function[ARGS]arg1 is one",
     F.MISTRAL,
     "looks like a Mistral [TOOL_CALLS] call, but the arguments after special_function[ARGS] are not JSON"),
    ("mistral_marker_with_text", "[TOOL_CALLS] not json", F.MISTRAL,
     "it is not valid JSON, even after repair"),
    ("apertus_list_of_words", "<|tools_prefix|>[special_function]<|tools_suffix|>",
     F.APERTUS, "looks like an Apertus <|tools_prefix|> call, but"),
    ("command_r_action_without_a_tool", '<|START_ACTION|>[{"tool_call_id": "0"}]<|END_ACTION|>',
     F.COMMAND_R, "looks like a Command R7B <|START_ACTION|> call, but it holds no tool call"),
    ("granite_empty_list", "<|tool_call|>[]", F.GRANITE,
     "looks like a Granite/Phi-4-mini <|tool_call|> call, but its list of"),
    ("phi4_functools_with_invalid_json", "functools[ This is just text ]", F.FUNCTOOLS,
     "looks like a Phi-4/Firefunction"),
    ("phi4_functools_with_string_arguments",
     'functools[{"name": "special_function", "arguments": "not a dict"}]',
     F.FUNCTOOLS, "it holds no tool call"),
    ("llama_4_python_start_with_statements", "<|python_start|>import os<|python_end|>",
     F.PYTHON_START,
     "looks like a Llama 4 <|python_start|> call, but it is neither JSON nor a Python-style call"),
    ("gemma_tool_code_that_is_not_a_call", "```tool_code\nfor city in cities: print(city)\n```",
     F.TOOL_CODE, "looks like a Gemma ```tool_code block, but it is not a Python-style call"),
    ("lfm2_tool_call_start_with_words", "<|tool_call_start|>weather please<|tool_call_end|>",
     F.JSON_TAG, "looks like an LFM2 <|tool_call_start|> call"),
    ("function_call_tag_with_words", "<function_call>the weather</function_call>",
     F.FUNCTION_CALL_TAG, "looks like a <function_call> call"),
    ("hermes_tool_call_with_words", "<tool_call>the calculator please</tool_call>",
     F.TAGGED, "looks like a Hermes/Qwen <tool_call> call, but it is not valid JSON"),
]  # fmt: skip


@pytest.mark.parametrize(("reply", "fmt", "message"), [case[1:] for case in MALFORMED],
                         ids=[case[0] for case in MALFORMED])  # fmt: skip
def test_unreadable_call_is_a_problem_naming_the_format_it_resembled(
    reply: str, fmt: CallFormat, message: str
) -> None:
    outcome = parse(reply)
    assert outcome.calls == ()
    [problem] = outcome.problems
    assert problem.kind is ProblemKind.MALFORMED and problem.resembled is fmt
    assert message in problem.message
    assert problem.message in repair_hint(outcome.problems)


def test_parameter_value_that_does_not_fit_its_type_is_invalid_arguments() -> None:
    reply = ("<tool_call><function=get_weather><parameter=city>Paris</parameter>"
             "<parameter=days>three</parameter></function></tool_call>")  # fmt: skip
    [problem] = parse(reply).problems
    assert problem.kind is ProblemKind.INVALID_ARGUMENTS and problem.resembled is F.QWEN3_CODER
    assert problem.message == "get_weather: $.arguments.days: expected integer, got string"


def test_unknown_tool_in_a_native_format_names_the_format() -> None:
    [problem] = parse('[TOOL_CALLS]get_time[ARGS]{"city": "Tokyo"}').problems
    assert problem.kind is ProblemKind.UNKNOWN_TOOL and problem.name == "get_time"
    assert problem.resembled is F.MISTRAL and problem.message == "there is no tool named 'get_time'"


def test_an_unknown_tool_in_a_pythonic_reply_is_a_problem_not_prose() -> None:
    # The Llama 3.2 form of VL test_pythonic_tool_parser.py, calling a tool the run does not have.
    [problem] = parse("[get_time(city='Tokyo')]").problems
    assert problem.kind is ProblemKind.UNKNOWN_TOOL and problem.resembled is F.PYTHONIC_LIST


# Text that shows call syntax without making a call: it all stays prose.
NOT_CALLS = [
    ("plain_prose_that_shows_the_syntax_in_a_fence_is_not_a_call",
     "Here is the format:\n```xml\n<function=NAME>\n<parameter=KEY>value</parameter>\n</function>\n```"),
    ("a_json_fence_showing_a_hermes_call_of_a_made_up_tool_is_not_a_call",
     'Qwen writes calls like this:\n```\n<tool_call>\n'
     '{"name": "get_stock_price", "arguments": {"symbol": "X"}}\n'
     "</tool_call>\n```"),
    ("a_python_fence_with_a_def_is_code_even_when_it_calls_a_tool",
     '```python\ndef forecast():\n    return get_weather(city="Paris")\n```'),
    ("an_xml_fence_mixing_markup_and_explanation_is_a_sample",
     "```xml\n<!-- the model writes: -->\n<tool_call>special_function\n<arg_key>arg1</arg_key>\n<arg_value>1"
     "</arg_value>\n</tool_call>\n```"),
    ("markup_quoted_in_inline_code_is_a_mention",
     "Qwen3-Coder wraps calls in `<tool_call>` and writes `<function=NAME>` then `</function>`."),
    ("harmony_and_kimi_tokens_quoted_in_inline_code_are_mentions",
     "GPT-OSS ends a call with `<|call|>`; Kimi starts one with `<|tool_call_begin|>`."),
    ("arrows_in_prose_are_not_a_functionary_segment", "Type this:\n>>>help\nand press enter."),
    ("a_first_line_naming_no_tool_is_not_a_functionary_call", 'Summary\n{"points": 3}'),
    ("a_python_list_of_calls_inside_prose_is_not_a_pythonic_reply",
     "You could write [get_weather(city='Paris')] in Python."),
    ("a_list_of_calls_with_positional_arguments_to_unknown_functions_is_code", "[print('hi'), len(x)]"),
    ("the_word_functools_in_prose_is_not_a_call", "Use functools.partial or functools.reduce here."),
]  # fmt: skip


@pytest.mark.parametrize("reply", [case[1] for case in NOT_CALLS], ids=[case[0] for case in NOT_CALLS])
def test_syntax_that_is_only_shown_is_prose(reply: str) -> None:
    assert parse(reply) == ParseOutcome(prose=reply.strip())


def test_native_markup_of_an_available_tool_in_any_fence_is_a_call() -> None:
    # LC NousResearch-Hermes-2-Pro: ```xml and ```json fences around a call are only wrapping.
    reply = "```xml\n<function=special_function>\n<parameter=arg1>\n1\n</parameter>\n</function>\n```"
    outcome = parse(reply)
    assert calls_of(outcome) == [ARG1] and outcome.prose == ""


def test_a_json_fence_calling_an_unknown_tool_still_gets_a_suggestion() -> None:
    # ```json is how small models call when told to: a misspelt name there is an attempt, not a sample.
    [problem] = parse('```json\n{"name": "special_functon", "arguments": {"arg1": 1}}\n```').problems
    assert problem.kind is ProblemKind.UNKNOWN_TOOL
    assert problem.hint.startswith("Did you mean special_function?")
