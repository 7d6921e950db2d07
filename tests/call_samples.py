"""The tools the call-format tests call, after the ones llama.cpp's and vLLM's parser tests use.

`special_function(arg1: integer)`, `special_function_with_opt`, `python(code)` and
`complex_function` are llama.cpp's tests/test-chat.cpp tools; `get_weather` and
`register_user` are vLLM's tests/entrypoints/openai/tool_parsers tools.

`CASES` are replies in every family's native format, each citing where its text
comes from: llama.cpp's tests/test-chat.cpp (LC, test_template_output_parsers
or test_template_output_peg_parsers, by the template block it sits in) or
vLLM's tool-parser tests (VL, file::test or constant).
"""

from __future__ import annotations

from typing import Any

from bastion.supervisor.tools.calls import CallFormat, ParseOutcome, parse_tool_calls
from bastion.supervisor.tools.registry import ToolSpec


def tool(name: str, properties: dict[str, Any], required: tuple[str, ...] = ()) -> ToolSpec:
    schema = {"type": "object", "properties": properties, "required": list(required)}
    return ToolSpec(name=name, description=f"{name} (test)", parameters=schema, read_only=True)


INTEGER = {"type": "integer"}
STRING = {"type": "string"}
TOOLS = {spec.name: spec for spec in [
    tool("special_function", {"arg1": INTEGER}, ("arg1",)),
    tool("special_function_with_opt", {"arg1": INTEGER, "arg2": INTEGER}, ("arg1",)),
    tool("python", {"code": STRING}, ("code",)),
    tool("complex_function", {"name": STRING, "age": INTEGER, "active": {"type": "boolean"},
                              "score": {"type": "number"}}, ("name", "age", "active", "score")),
    tool("get_weather", {"city": STRING, "days": INTEGER, "unit": {"enum": ["celsius", "fahrenheit"]}},
         ("city",)),
    tool("register_user", {"name": STRING, "age": INTEGER, "address": {"type": "object"},
                           "role": {"type": ["string", "null"]}, "passed_test": {"type": "boolean"},
                           "aliases": {"type": "array", "items": STRING}}, ("name",)),
    tool("now", {}),
    tool("write_file", {"path": STRING, "content": STRING, "config": {"type": "object"},
                        "tags": {"type": "array"}, "ratio": {"type": "number"}}, ("path",)),
]}  # fmt: skip

ARG1 = ("special_function", {"arg1": 1})

F = CallFormat
LC = "llama.cpp tests/test-chat.cpp"
VL = "vllm tests"
JOHN = ("complex_function", {"name": "John Doe", "age": 30, "active": True, "score": 95.5})
PARIS = ("get_weather", {"city": "Paris"})
LA = ("get_weather", {"city": "LA", "metric": "C"})

# (spec, source, reply, calls, format, prose)
CASES: list[tuple[str, str, str, list[tuple[str, dict[str, Any]]], CallFormat, str]] = [
    ("parses_functionary_v3_1_function_tag_with_json", f"{LC} meetkai-functionary-medium-v3.1",
     '<function=special_function>{"arg1": 1}</function>', [ARG1], F.FUNCTION_TAG, ""),
    ("parses_function_tag_with_a_name_attribute", f"{LC} NousResearch-Hermes-2-Pro",
     '<function name="special_function">\n{"arg1": 1}\n</function>', [ARG1], F.FUNCTION_TAG, ""),
    ("parses_consecutive_function_tags", f"{LC} NousResearch-Hermes-2-Pro, multiple tool calls",
     '<function=special_function>{"arg1": 1}</function>\n'
     '<function=python>{"code":"print(\'hello\')"}</function>',
     [ARG1, ("python", {"code": "print('hello')"})], F.FUNCTION_TAG, ""),
    ("parses_python_tag_code_as_a_call_of_the_python_tool", f"{LC} chat.cpp parse_functionary_v3_1_llama_3_1",
     "<|python_tag|>print('hey')", [("python", {"code": "print('hey')"})], F.PYTHON_TAG, ""),
    ("parses_llama_3_1_builtin_call_syntax", f"{LC} meta-llama-Llama-3.1-8B-Instruct",
     "<|python_tag|>python.call(code=\"print('hey')\")", [("python", {"code": "print('hey')"})],
     F.PYTHON_TAG, ""),
    ("parses_qwen3_coder_parameter_blocks_by_schema_type", f"{LC} Qwen3-Coder, multiple parameters",
     "<tool_call>\n  <function=complex_function>\n    <parameter=name>\n      John Doe\n    </parameter>\n"
     "    <parameter=age>\n      30\n    </parameter>\n    <parameter=active>\n      true\n    </parameter>\n"
     "    <parameter=score>\n      95.5\n    </parameter>\n  </function>\n</tool_call>", [JOHN],
     F.QWEN3_CODER, ""),
    ("parses_qwen3_coder_compact_form", f"{LC} Qwen3-Coder, compact format",
     "<tool_call><function=special_function><parameter=arg1>1</parameter></function></tool_call>",
     [ARG1], F.QWEN3_CODER, ""),
    ("parses_qwen3_coder_call_after_prose", f"{LC} Qwen3-Coder, mixed content",
     "I'll help you search for products. <tool_call>\n  <function=get_weather>\n    <parameter=city>\n"
     "      Paris\n    </parameter>\n  </function>\n</tool_call>", [PARIS], F.QWEN3_CODER,
     "I'll help you search for products."),
    ("parses_seed_oss_tool_call_tags", f"{LC} ByteDance-Seed-OSS",
     "<seed:tool_call>\n<function=special_function>\n<parameter=arg1>\n42\n</parameter>\n</function>\n"
     "</seed:tool_call>", [("special_function", {"arg1": 42})], F.QWEN3_CODER, ""),
    ("parses_nemotron_3_parallel_calls", f"{LC} peg parsers, NVIDIA-Nemotron-3-Nano parallel tool calls",
     "<tool_call>\n<function=special_function>\n<parameter=arg1>\n1\n</parameter>\n</function>\n"
     "</tool_call>\n<tool_call>\n<function=special_function_with_opt>\n<parameter=arg1>\n1\n</parameter>\n"
     "<parameter=arg2>\n2\n</parameter>\n</function>\n</tool_call>",
     [ARG1, ("special_function_with_opt", {"arg1": 1, "arg2": 2})], F.QWEN3_CODER, ""),
    ("parses_glm_4_5_arg_key_value_pairs", f"{LC} GLM-4.6",
     "\n<tool_call>special_function\n<arg_key>arg1</arg_key>\n<arg_value>1</arg_value>\n</tool_call>",
     [ARG1], F.GLM, ""),
    ("parses_glm_4_7_pairs_written_without_newlines", f"{LC} GLM-4.7-Flash",
     "<tool_call>special_function<arg_key>arg1</arg_key><arg_value>1</arg_value></tool_call>",
     [ARG1], F.GLM, ""),
    ("parses_glm_values_by_schema_type_with_content_after", f"{LC} GLM-4.6, streaming complex_function",
     "<tool_call>complex_function\n<arg_key>name</arg_key>\n<arg_value>John Doe</arg_value>\n"
     "<arg_key>age</arg_key>\n<arg_value>30</arg_value>\n"
     "<arg_key>active</arg_key>\n<arg_value>true</arg_value>\n"
     "<arg_key>score</arg_key>\n<arg_value>95.5</arg_value>\n</tool_call>Hello, world!\nWhat's up?",
     [JOHN], F.GLM, "Hello, world!\nWhat's up?"),
    ("parses_minimax_m2_invoke_blocks", f"{LC} MiniMax-M2",
     '<minimax:tool_call>\n<invoke name="special_function">\n<parameter name="arg1">1</parameter>\n'
     "</invoke>\n</minimax:tool_call>", [ARG1], F.MINIMAX, ""),
    ("parses_functionary_v3_2_segments_after_an_all_preamble", f"{LC} meetkai-functionary-medium-v3.2",
     'all\nHello, world!\nnono\nWhat\'s up?\n>>>special_function\n{"arg1": 1}\n', [ARG1], F.FUNCTIONARY,
     "Hello, world!\nnono\nWhat's up?"),
    ("parses_functionary_v3_2_first_segment_without_arrows", f"{LC} meetkai-functionary-medium-v3.2",
     'special_function\n{"arg1": 1} \n                    ', [ARG1], F.FUNCTIONARY, ""),
    ("parses_functionary_v3_2_python_segment_as_code", f"{LC} meetkai-functionary-medium-v3.2",
     "python\n# This is a program:\nprint('hey')",
     [("python", {"code": "# This is a program:\nprint('hey')"})], F.FUNCTIONARY, ""),
    ("parses_llama_3_2_pythonic_list_with_every_literal_type",
     f"{VL} entrypoints/openai/tool_parsers/test_pythonic_tool_parser.py MORE_TYPES_FUNCTION_OUTPUT",
     "[register_user(name='John Doe', age=37, address={'city': 'San Francisco', 'state': 'CA'}, role=None, "
     "passed_test=True, aliases=['John', 'Johnny'])]",
     [("register_user", {"name": "John Doe", "age": 37, "address": {"city": "San Francisco", "state": "CA"},
                         "role": None, "passed_test": True, "aliases": ["John", "Johnny"]})],
     F.PYTHONIC_LIST, ""),
    ("parses_parallel_pythonic_calls", f"{VL} test_llama4_pythonic_tool_parser.py parallel_calls",
     "[get_weather(city='LA',metric='C'),register_user(name='Doe',age=9)]",
     [LA, ("register_user", {"name": "Doe", "age": 9})], F.PYTHONIC_LIST, ""),
    ("parses_escaped_strings_in_pythonic_calls", f"{VL} test_pythonic_tool_parser.py ESCAPED_STRING",
     r"""[get_weather(city='Martha\'s Vineyard', metric='\"cool units\"')]""",
     [("get_weather", {"city": "Martha's Vineyard", "metric": '"cool units"'})], F.PYTHONIC_LIST, ""),
    ("parses_llama_4_python_start_block",
     f"{VL} test_llama4_pythonic_tool_parser.py PYTHON_TAG_FUNCTION_OUTPUT",
     "<|python_start|>[get_weather(city='LA', metric='C')]<|python_end|>", [LA], F.PYTHON_START, ""),
    ("parses_gemma_tool_code_fence",
     "ai.google.dev/gemma/docs/meme-generator (calls wrapped in ```tool_code)",
     'Let me look.\n```tool_code\nget_weather(city="Paris")\n```', [PARIS], F.TOOL_CODE, "Let me look."),
    ("parses_deepseek_r1_fenced_json_call", f"{LC} llama-cpp-deepseek-r1",
     "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>special_function\n```json\n"
     '{"arg1": 1}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>', [ARG1], F.DEEPSEEK, ""),
    ("parses_deepseek_r1_short_calls_opening", f"{LC} llama-cpp-deepseek-r1 (<｜tool▁calls｜>)",
     "<｜tool▁calls｜>function<｜tool▁sep｜>special_function\n```json\n"
     '{"arg1": 1}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>', [ARG1], F.DEEPSEEK, ""),
    ("parses_deepseek_v3_1_calls_after_content", f"{LC} deepseek-ai-DeepSeek-V3.1, multiple tool calls",
     '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}'
     '<｜tool▁call▁end｜><｜tool▁call▁begin｜>special_function<｜tool▁sep｜>{"arg1": 1}<｜tool▁call▁end｜>'
     "<｜tool▁calls▁end｜>", [PARIS, ARG1], F.DEEPSEEK, ""),
    ("parses_gpt_oss_commentary_call", f"{LC} openai-gpt-oss-120b",
     '<|channel|>commentary to=functions.special_function <|constrain|>json<|message|>{"arg1": 1}<|call|>',
     [ARG1], F.HARMONY, ""),
    ("parses_gpt_oss_recipient_in_the_role_header", f"{LC} openai-gpt-oss-120b, tool calling in role header",
     ' to=functions.special_function<|channel|>commentary <|constrain|>json<|message|>{"arg1": 1}',
     [ARG1], F.HARMONY, ""),
    ("parses_gpt_oss_call_on_the_analysis_channel", f"{LC} openai-gpt-oss-120b, role header",
     '<|start|>assistant to=functions.special_function<|channel|>analysis <|constrain|>json<|message|>'
     '{"arg1": 1}', [ARG1], F.HARMONY, ""),
    ("parses_gpt_oss_calls_with_empty_arguments", f"{VL} tool_use/test_openai_tool_parser.py multiple_tools",
     "<|channel|>commentary to=functions.now <|constrain|>json<|message|>{}<|call|>"
     "<|start|>assistant<|channel|>commentary to=functions.now <|constrain|>json<|message|><|call|>",
     [("now", {}), ("now", {})], F.HARMONY, ""),
    ("parses_kimi_k2_section_with_content_after", f"{LC} Kimi-K2-Thinking, extra content",
     '<|tool_calls_section_begin|><|tool_call_begin|>functions.special_function:0<|tool_call_argument_begin|>'
     '{"arg1": 1}<|tool_call_end|><|tool_calls_section_end|>Hello, world!\nWhat\'s up?',
     [ARG1], F.KIMI, "Hello, world!\nWhat's up?"),
    ("parses_kimi_k2_parallel_calls_without_namespace",
     f"{VL} kimi_k2_tool_parser.py (functions.NAME:0 or NAME:0)",
     '<|tool_calls_section_begin|><|tool_call_begin|>get_weather:0<|tool_call_argument_begin|>'
     '{"city": "Paris"}<|tool_call_end|>'
     '<|tool_call_begin|>functions.special_function:1<|tool_call_argument_begin|>{"arg1": 1}<|tool_call_end|>'
     "<|tool_calls_section_end|>", [PARIS, ARG1], F.KIMI, ""),
    ("parses_mistral_nemo_list_with_ids", f"{LC} mistralai-Mistral-Nemo-Instruct-2407",
     '[TOOL_CALLS][{"name": "special_function", "arguments": {"arg1": 1}, "id": "123456789"}]',
     [ARG1], F.MISTRAL, ""),
    ("parses_mistral_call_id_before_args", f"{LC} Mistral-Small-3.2-24B-Instruct-2506",
     '[TOOL_CALLS]special_function[CALL_ID]123456789[ARGS]{"arg1": 1}', [ARG1], F.MISTRAL, ""),
    ("parses_ministral_parallel_named_calls",
     f"{LC} peg parsers, Ministral-3-14B-Reasoning parallel tool calls",
     '[TOOL_CALLS]special_function[ARGS]{"arg1": 1}'
     '[TOOL_CALLS]special_function_with_opt[ARGS]{"arg1": 1, "arg2": 2}',
     [ARG1, ("special_function_with_opt", {"arg1": 1, "arg2": 2})], F.MISTRAL, ""),
    ("parses_mistral_v11_name_then_json", f"{VL} tool_use/test_mistral_tool_parser.py v11_tokenizer",
     '[TOOL_CALLS]get_weather{"city": "San Francisco", "unit": "celsius"}',
     [("get_weather", {"city": "San Francisco", "unit": "celsius"})], F.MISTRAL, ""),
    ("parses_apertus_tool_list_with_content_after", f"{LC} Apertus-8B-Instruct, extra content",
     '<|tools_prefix|>[{"special_function": {"arg1": 1}}]<|tools_suffix|>Hello, world!\nWhat\'s up?',
     [ARG1], F.APERTUS, "Hello, world!\nWhat's up?"),
    ("parses_command_r7b_action_list", f"{LC} CohereForAI-c4ai-command-r7b-12-2024",
     '<|START_ACTION|>[\n    {"tool_call_id": "0", "tool_name": "special_function", '
     '"parameters": {"arg1": 1}}\n]<|END_ACTION|>', [ARG1], F.COMMAND_R, ""),
    ("parses_granite_tool_call_list", f"{LC} ibm-granite-granite-3.3-2B-Instruct",
     '<|tool_call|>[{"name": "special_function", "arguments": {"arg1": 1}}]', [ARG1], F.GRANITE, ""),
    ("parses_phi_4_mini_tool_call_tags", "Phi-4-mini-instruct's template (tests/test_official_templates.py)",
     '<|tool_call|>[{"name": "now", "arguments": {}}]<|/tool_call|>', [("now", {})], F.GRANITE, ""),
    ("parses_granite_arguments_given_as_a_json_string",
     "OpenAI-style arguments string, as Granite writes them",
     '<|tool_call|>[{"name": "special_function", "arguments": "{\\"arg1\\": 1}"}]', [ARG1], F.GRANITE, ""),
    ("parses_phi_4_mini_functools_with_prose_around", f"{VL} test_phi4mini_tool_parser.py surrounding_text",
     'Let me check the weather for you.\nfunctools[{"name": "get_weather", "arguments": {"city": "Paris"}}]\n'
     "Would you like to know more?", [PARIS], F.FUNCTOOLS,
     "Let me check the weather for you.\n\nWould you like to know more?"),
    ("parses_firefunction_v2_functools", f"{LC} fireworks-ai-llama-3-firefunction-v2",
     ' functools[{"name": "special_function", "arguments": {"arg1": 1}}]', [ARG1], F.FUNCTOOLS, ""),
    ("parses_nemotron_v2_toolcall_tag_with_content_after", f"{LC} NVIDIA-Nemotron-Nano-v2",
     '<TOOLCALL>[{"name": "special_function", "arguments": {"arg1": 1}}]</TOOLCALL>'
     "Hello, world!\nWhat's up?", [ARG1], F.JSON_TAG, "Hello, world!\nWhat's up?"),
    ("parses_lfm2_tool_call_start_list", f"{LC} llama-cpp-lfm2",
     'Let me check.<|tool_call_start|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
     "<|tool_call_end|>", [PARIS], F.JSON_TAG, "Let me check."),
    ("parses_apriel_tool_calls_tag", f"{LC} peg parsers, unsloth-Apriel-1.5",
     '<tool_calls>[{"name": "special_function", "arguments": {"arg1": 1}}]</tool_calls>',
     [ARG1], F.JSON_TAG, ""),
    ("parses_hermes_function_call_tag_in_a_json_fence", f"{LC} NousResearch-Hermes-2-Pro",
     '```json\n\n                    <function_call> {"name": "special_function", '
     '"arguments": {"arg1": 1}} \n                    </function_call> \n``` ',
     [ARG1], F.FUNCTION_CALL_TAG, ""),
    ("parses_hermes_response_tag_in_an_xml_fence", f"{LC} NousResearch-Hermes-2-Pro",
     '```xml\n<response>\n    {"name": "special_function", "arguments": {"arg1": 1}}\n</response>\n```',
     [ARG1], F.BARE_JSON, ""),
    ("parses_xlam_json_list", f"{VL} tool_use/test_xlam_tool_parser.py parallel_tool_calls",
     '[{"name": "get_weather", "arguments": {"city": "Dallas"}}, {"name": "get_weather", "arguments": '
     '{"city": "Orlando"}}]', [("get_weather", {"city": "Dallas"}), ("get_weather", {"city": "Orlando"})],
     F.BARE_JSON, ""),
    ("parses_xlam_json_fence_after_prose",
     f"{VL} tool_use/test_xlam_tool_parser.py single_tool_with_json_code_block",
     'I\'ll help you with that.\n```json\n[{"name": "get_weather", "arguments": {"city": "Dallas"}}]\n```',
     [("get_weather", {"city": "Dallas"})], F.FENCED_JSON, "I'll help you with that."),
]  # fmt: skip


def parse(reply: str) -> ParseOutcome:
    return parse_tool_calls(reply, TOOLS)


def calls_of(outcome: ParseOutcome) -> list[tuple[str, dict[str, Any]]]:
    return [(call.name, call.arguments) for call in outcome.calls]
