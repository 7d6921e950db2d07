"""Each built-in chat template, pinned: the exact prompt for an agent's
conversation, tools where the family lists them, and a prefix that only grows.

What each renders against its family's official template is pinned in
test_official_templates.py."""

from __future__ import annotations

from datetime import datetime

import pytest

from bastion.protocol.worker_wire import ModelDescription
from bastion.supervisor.templates import formatter as formatter_module
from bastion.supervisor.templates.builtin import BUILTIN_SOURCES
from bastion.supervisor.templates.formatter import (
    BuiltinTemplate,
    ChatMessage,
    ChatRole,
    PromptFormatter,
    is_prefix_stable,
)

SYSTEM = ChatMessage(role=ChatRole.SYSTEM, content="You are terse.")
USER = ChatMessage(role=ChatRole.USER, content="Time?")
CALL = ChatMessage(role=ChatRole.ASSISTANT, content='{"name": "clock", "arguments": {}}')
RESULT = ChatMessage(role=ChatRole.TOOL, content='{"time": "12:00"}', tool_name="clock")
ANSWER = ChatMessage(role=ChatRole.ASSISTANT, content="Noon.")
THANKS = ChatMessage(role=ChatRole.USER, content="Thanks")
CONVERSATION = [SYSTEM, USER, CALL, RESULT, THANKS]
SIX = [SYSTEM, USER, CALL, RESULT, ANSWER, THANKS]
CLOCK = {
    "type": "function",
    "function": {
        "name": "clock",
        "description": "The time",
        "parameters": {"type": "object", "properties": {}},
    },
}

# Each family's real BOS/EOS token text, as a worker would report it.
TOKENS = {
    BuiltinTemplate.CHATML: ("<|im_start|>", "<|im_end|>"),
    BuiltinTemplate.QWEN25: ("", "<|im_end|>"),
    BuiltinTemplate.QWEN3: ("", "<|im_end|>"),
    BuiltinTemplate.LLAMA3: ("<|begin_of_text|>", "<|eot_id|>"),
    BuiltinTemplate.LLAMA2: ("<s>", "</s>"),
    BuiltinTemplate.MISTRAL: ("<s>", "</s>"),
    BuiltinTemplate.GEMMA: ("<bos>", "<eos>"),
    BuiltinTemplate.PHI3: ("<s>", "<|endoftext|>"),
    BuiltinTemplate.PHI4_MINI: ("<|endoftext|>", "<|endoftext|>"),
    BuiltinTemplate.DEEPSEEK: ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    BuiltinTemplate.DEEPSEEK_R1: ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    BuiltinTemplate.COMMAND_R: ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>"),
    BuiltinTemplate.GRANITE: ("<|end_of_text|>", "<|end_of_text|>"),
    BuiltinTemplate.GPT_OSS: ("<|startoftext|>", "<|return|>"),
    BuiltinTemplate.ALPACA: ("<s>", "</s>"),
    BuiltinTemplate.VICUNA: ("<s>", "</s>"),
}

GOLDEN = {
    BuiltinTemplate.CHATML: (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nTime?<|im_end|>\n"
        '<|im_start|>assistant\n{"name": "clock", "arguments": {}}<|im_end|>\n'
        '<|im_start|>tool\n{"time": "12:00"}<|im_end|>\n'
        "<|im_start|>user\nThanks<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    # Qwen wraps a tool result in <tool_response> in a user turn.
    BuiltinTemplate.QWEN25: (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nTime?<|im_end|>\n"
        '<|im_start|>assistant\n{"name": "clock", "arguments": {}}<|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"time": "12:00"}\n</tool_response><|im_end|>\n'
        "<|im_start|>user\nThanks<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    BuiltinTemplate.QWEN3: (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nTime?<|im_end|>\n"
        '<|im_start|>assistant\n{"name": "clock", "arguments": {}}<|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"time": "12:00"}\n</tool_response><|im_end|>\n'
        "<|im_start|>user\nThanks<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    # Llama 3.1's dated system header, and a tool result as JSON (a string result is quoted).
    BuiltinTemplate.LLAMA3: (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nTime?<|eot_id|>"
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "clock", "arguments": {}}<|eot_id|>'
        '<|start_header_id|>ipython<|end_header_id|>\n\n"{\\"time\\": \\"12:00\\"}"<|eot_id|>'
        "<|start_header_id|>user<|end_header_id|>\n\nThanks<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    BuiltinTemplate.LLAMA2: (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nTime? [/INST]"
        ' {"name": "clock", "arguments": {}} </s>'
        '<s>[INST] Tool result from clock:\n{"time": "12:00"}\n\nThanks [/INST]'
    ),
    BuiltinTemplate.MISTRAL: (
        "<s>[INST] You are terse.\n\nTime?[/INST]"
        ' {"name": "clock", "arguments": {}}</s>'
        '[TOOL_RESULTS] {"content": {"time": "12:00"}}[/TOOL_RESULTS]'
        "[INST] Thanks[/INST]"
    ),
    BuiltinTemplate.GEMMA: (
        "<bos><start_of_turn>user\nYou are terse.\n\nTime?<end_of_turn>\n"
        '<start_of_turn>model\n{"name": "clock", "arguments": {}}<end_of_turn>\n'
        '<start_of_turn>user\nTool result from clock:\n{"time": "12:00"}<end_of_turn>\n'
        "<start_of_turn>user\nThanks<end_of_turn>\n"
        "<start_of_turn>model\n"
    ),
    BuiltinTemplate.PHI3: (
        "<|system|>\nYou are terse.<|end|>\n"
        "<|user|>\nTime?<|end|>\n"
        '<|assistant|>\n{"name": "clock", "arguments": {}}<|end|>\n'
        '<|user|>\nTool result from clock:\n{"time": "12:00"}<|end|>\n'
        "<|user|>\nThanks<|end|>\n"
        "<|assistant|>\n"
    ),
    BuiltinTemplate.PHI4_MINI: (
        "<|system|>You are terse.<|end|><|user|>Time?<|end|>"
        '<|assistant|>{"name": "clock", "arguments": {}}<|end|>'
        '<|tool_response|>{"time": "12:00"}<|end|>'
        "<|user|>Thanks<|end|><|assistant|>"
    ),
    BuiltinTemplate.DEEPSEEK: (
        "<｜begin▁of▁sentence｜>You are terse."
        "<｜User｜>Time?"
        '<｜Assistant｜>{"name": "clock", "arguments": {}}<｜end▁of▁sentence｜>'
        '<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{"time": "12:00"}<｜tool▁output▁end｜><｜tool▁outputs▁end｜>'
        "<｜User｜>Thanks"
        "<｜Assistant｜>"
    ),
    BuiltinTemplate.DEEPSEEK_R1: (
        "<｜begin▁of▁sentence｜>You are terse."
        "<｜User｜>Time?"
        '<｜Assistant｜>{"name": "clock", "arguments": {}}<｜end▁of▁sentence｜>'
        '<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{"time": "12:00"}<｜tool▁output▁end｜><｜tool▁outputs▁end｜>'
        "<｜User｜>Thanks"
        "<｜Assistant｜><think>\n"
    ),
    BuiltinTemplate.COMMAND_R: (
        "<BOS_TOKEN>"
        "<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>You are terse.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Time?<|END_OF_TURN_TOKEN|>"
        '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>{"name": "clock", "arguments": {}}<|END_OF_TURN_TOKEN|>'
        '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|><results>\n{"time": "12:00"}</results><|END_OF_TURN_TOKEN|>'
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Thanks<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
    ),
    BuiltinTemplate.GRANITE: (
        "<|start_of_role|>system<|end_of_role|>You are terse.<|end_of_text|>\n"
        "<|start_of_role|>user<|end_of_role|>Time?<|end_of_text|>\n"
        '<|start_of_role|>assistant<|end_of_role|>{"name": "clock", "arguments": {}}<|end_of_text|>\n'
        '<|start_of_role|>tool<|end_of_role|>{"time": "12:00"}<|end_of_text|>\n'
        "<|start_of_role|>user<|end_of_role|>Thanks<|end_of_text|>\n"
        "<|start_of_role|>assistant<|end_of_role|>"
    ),
    # Plain reply text is the final channel; the date is the pinned clock's.
    BuiltinTemplate.GPT_OSS: (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\nCurrent date: 2025-08-05\n\nReasoning: medium\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
        "<|start|>developer<|message|># Instructions\n\nYou are terse.\n\n<|end|>"
        "<|start|>user<|message|>Time?<|end|>"
        '<|start|>assistant<|channel|>final<|message|>{"name": "clock", "arguments": {}}<|end|>'
        "<|start|>functions.clock to=assistant<|channel|>commentary<|message|>"
        '"{\\"time\\": \\"12:00\\"}"<|end|>'
        "<|start|>user<|message|>Thanks<|end|>"
        "<|start|>assistant"
    ),
    BuiltinTemplate.ALPACA: (
        "<s>You are terse.\n\n"
        "### Instruction:\nTime?\n\n"
        '### Response:\n{"name": "clock", "arguments": {}}</s>\n\n'
        '### Instruction:\nTool result from clock:\n{"time": "12:00"}\n\n'
        "### Instruction:\nThanks\n\n"
        "### Response:\n"
    ),
    BuiltinTemplate.VICUNA: (
        "<s>You are terse.\n\n"
        "USER: Time?\n"
        'ASSISTANT: {"name": "clock", "arguments": {}}</s>\n'
        'USER: Tool result from clock:\n{"time": "12:00"}\n'
        "USER: Thanks\n"
        "ASSISTANT:"
    ),
}


# The families whose official format drops an earlier reply's reasoning from later prompts,
# so the prompt a reply was generated from is not a prefix of the next: see
# test_official_templates.py for what that costs.
NOT_PREFIX_STABLE = {BuiltinTemplate.DEEPSEEK_R1}
# What the model writes before its reply text, where the prompt does not end with it.
REPLY_HEADER = {BuiltinTemplate.GPT_OSS: "<|channel|>final<|message|>"}


@pytest.fixture(autouse=True)
def pinned_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """gpt-oss (and Granite without a system prompt) write today's date: pin it."""
    monkeypatch.setattr(formatter_module, "_strftime_now", lambda fmt: datetime(2025, 8, 5).strftime(fmt))


def formatter(builtin: BuiltinTemplate) -> PromptFormatter:
    bos, eos = TOKENS[builtin]
    description = ModelDescription(
        name="m", path="/m.gguf", architecture="llama", n_ctx=4096, n_ctx_train=4096, n_vocab=1, n_params=1,
        threads=1, has_chat_template=False, chat_template="", bos_token=bos, eos_token=eos, file_size=1,
        load_ms=1.0, rss_bytes=1,
    )  # fmt: skip
    return PromptFormatter.for_model(description, builtin)


def test_every_builtin_has_a_source_and_a_golden() -> None:
    assert set(BUILTIN_SOURCES) == set(BuiltinTemplate) == set(GOLDEN) == set(TOKENS)


@pytest.mark.parametrize("builtin", list(BuiltinTemplate), ids=lambda b: b.value)
def test_builtin_renders_an_agent_conversation_exactly(builtin: BuiltinTemplate) -> None:
    assert formatter(builtin).render(CONVERSATION) == GOLDEN[builtin]


STABLE = [b for b in BuiltinTemplate if b not in NOT_PREFIX_STABLE]


@pytest.mark.parametrize("builtin", STABLE, ids=lambda b: b.value)
def test_builtin_prompt_only_grows_over_six_messages(builtin: BuiltinTemplate) -> None:
    f = formatter(builtin)
    assert is_prefix_stable(f, SIX)
    # Turn by turn: each prompt the model answered, then its reply, begin the next prompt.
    for k in (2, 4):
        asked, reply = f.render(SIX[:k]), REPLY_HEADER.get(builtin, "") + SIX[k].content
        later = f.render(SIX[: k + 2])
        assert later.startswith(asked)
        assert later[len(asked) :].lstrip(" ").startswith(reply), builtin


@pytest.mark.parametrize("builtin", STABLE, ids=lambda b: b.value)
def test_builtin_prompt_only_grows_with_tools(builtin: BuiltinTemplate) -> None:
    assert is_prefix_stable(formatter(builtin), SIX, tools=[CLOCK])


def test_builtin_without_a_system_message_starts_with_the_user() -> None:
    assert formatter(BuiltinTemplate.MISTRAL).render([USER]) == "<s>[INST] Time?[/INST]"
    assert formatter(BuiltinTemplate.LLAMA2).render([USER]) == "<s>[INST] Time? [/INST]"
    assert formatter(BuiltinTemplate.GEMMA).render([USER]) == (
        "<bos><start_of_turn>user\nTime?<end_of_turn>\n<start_of_turn>model\n"
    )


def test_tool_result_without_a_name_is_still_labelled() -> None:
    nameless = ChatMessage(role=ChatRole.TOOL, content="42")
    assert (
        formatter(BuiltinTemplate.PHI3)
        .render([USER, CALL, nameless])
        .endswith("<|user|>\nTool result:\n42<|end|>\n<|assistant|>\n")
    )
    assert (
        formatter(BuiltinTemplate.MISTRAL)
        .render([USER, CALL, nameless])
        .endswith('[TOOL_RESULTS] {"content": "42"}[/TOOL_RESULTS]')
    )


def test_deepseek_reply_after_tool_outputs_has_no_assistant_token() -> None:
    f = formatter(BuiltinTemplate.DEEPSEEK)
    asked = f.render([USER, CALL, RESULT, RESULT])
    assert asked.endswith(
        '<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{"time": "12:00"}<｜tool▁output▁end｜>\n'
        '<｜tool▁output▁begin｜>{"time": "12:00"}<｜tool▁output▁end｜><｜tool▁outputs▁end｜>'
    )
    assert (
        f.render([USER, CALL, RESULT, RESULT, ANSWER], add_generation_prompt=False)
        == asked + "Noon.<｜end▁of▁sentence｜>"
    )


def test_phi3_without_a_generation_prompt_ends_in_eos() -> None:
    assert formatter(BuiltinTemplate.PHI3).render([USER, ANSWER], add_generation_prompt=False) == (
        "<|user|>\nTime?<|end|>\n<|assistant|>\nNoon.<|end|>\n<|endoftext|>"
    )


# --- tools, for the families that list them ----------------------------------------


def test_only_the_families_with_a_tool_format_list_tools_themselves() -> None:
    listing = {b for b in BuiltinTemplate if formatter(b).supports_tools}
    assert listing == {
        BuiltinTemplate.CHATML, BuiltinTemplate.QWEN25, BuiltinTemplate.QWEN3, BuiltinTemplate.LLAMA3,
        BuiltinTemplate.MISTRAL, BuiltinTemplate.PHI4_MINI, BuiltinTemplate.GRANITE, BuiltinTemplate.GPT_OSS,
    }  # fmt: skip


def test_chatml_lists_tools_in_the_system_turn() -> None:
    rendered = formatter(BuiltinTemplate.CHATML).render_detailed([SYSTEM, USER], tools=[CLOCK])
    assert rendered.tools_advertised
    assert rendered.text == (
        "<|im_start|>system\nYou are terse.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "clock", "description": "The time", '
        '"parameters": {"type": "object", "properties": {}}}}\n'
        "</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nTime?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chatml_opens_a_system_turn_for_tools_when_there_is_none() -> None:
    text = formatter(BuiltinTemplate.CHATML).render([USER], tools=[CLOCK])
    assert text.startswith("<|im_start|>system\n# Tools\n\n")
    assert text.endswith("</tool_call><|im_end|>\n<|im_start|>user\nTime?<|im_end|>\n<|im_start|>assistant\n")


def test_llama3_lists_tools_as_json_functions_in_the_first_user_turn() -> None:
    # Llama 3.1's own layout (tools_in_user_message): the first user turn does not move.
    text = formatter(BuiltinTemplate.LLAMA3).render([SYSTEM, USER], tools=[CLOCK])
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
        "Given the following functions, please respond with a JSON for a function call with its proper "
        "arguments that best answers the given prompt.\n\n"
        'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
        "value}.Do not use variables.\n\n"
        '{\n    "type": "function",\n    "function": {\n        "name": "clock",\n'
        '        "description": "The time",\n        "parameters": {\n            "type": "object",\n'
        '            "properties": {}\n        }\n    }\n}\n\n'
        "Time?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_mistral_lists_tools_before_the_first_instruction() -> None:
    text = formatter(BuiltinTemplate.MISTRAL).render([SYSTEM, USER], tools=[CLOCK])
    assert text == (
        '<s>[AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "clock", "description": "The time", '
        '"parameters": {"type": "object", "properties": {}}}}][/AVAILABLE_TOOLS]'
        "[INST] You are terse.\n\nTime?[/INST]"
    )


def test_families_without_a_tool_listing_ignore_tools() -> None:
    f = formatter(BuiltinTemplate.GEMMA)
    rendered = f.render_detailed([SYSTEM, USER], tools=[CLOCK])
    assert not rendered.tools_advertised
    assert rendered.text == f.render([SYSTEM, USER])
