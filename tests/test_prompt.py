"""Choosing and rendering chat templates: detection, fallback, tools, and refusing hostile ones.

The exact output of each built-in is pinned in test_builtin_templates.py."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

import jinja2
import msgspec
import pytest

from bastion.protocol import HomeLayout
from bastion.protocol.worker_wire import ModelDescription
from bastion.supervisor.errors import TemplateError
from bastion.supervisor.models.registry import ModelRegistry
from bastion.supervisor.models.sources import resolve_gguf
from bastion.supervisor.templates.builtin import template_family
from bastion.supervisor.templates.formatter import (
    BuiltinTemplate,
    ChatMessage,
    ChatRole,
    FallbackCause,
    PromptFormatter,
    TemplateFallback,
    TemplateOrigin,
    is_prefix_stable,
)

SYSTEM = ChatMessage(role=ChatRole.SYSTEM, content="You are terse.")
USER = ChatMessage(role=ChatRole.USER, content="Hi")
CALL = ChatMessage(role=ChatRole.ASSISTANT, content='{"name": "clock", "arguments": {}}')
RESULT = ChatMessage(role=ChatRole.TOOL, content='{"time": "12:00"}', tool_name="clock")
ANSWER = ChatMessage(role=ChatRole.ASSISTANT, content="It is noon.")
THANKS = ChatMessage(role=ChatRole.USER, content="Thanks")
CLOCK = {"type": "function", "function": {"name": "clock", "description": "The time", "parameters": {}}}

# GGUF value types (ggml's gguf.h) and the struct formats of the scalar ones.
_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_STRING, _ARRAY = 8, 9


def _value(f: BinaryIO, kind: int) -> Any:
    if kind == _STRING:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n).decode("utf-8", errors="replace")
    if kind == _ARRAY:
        item_kind, count = struct.unpack("<IQ", f.read(12))
        return [_value(f, item_kind) for _ in range(count)]
    fmt = _SCALARS[kind]
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def gguf_metadata(path: Path) -> dict[str, Any]:
    """All key/values of a GGUF v2/v3 file, read with plain Python (test-only)."""
    with open(path, "rb") as f:
        magic, _version, _tensors, kv_count = struct.unpack("<4sIQQ", f.read(24))
        assert magic == b"GGUF"
        meta = {}
        for _ in range(kv_count):
            key = _value(f, _STRING)
            (kind,) = struct.unpack("<I", f.read(4))
            meta[key] = _value(f, kind)
    return meta


def describe(
    architecture: str, chat_template: str = "", bos: str = "<bos>", eos: str = "<eos>", gguf_name: str = ""
) -> ModelDescription:
    return ModelDescription(
        name="m",
        path="/m.gguf",
        architecture=architecture,
        n_ctx=4096,
        n_ctx_train=8192,
        n_vocab=1000,
        n_params=1,
        threads=2,
        has_chat_template=bool(chat_template),
        chat_template=chat_template,
        bos_token=bos,
        eos_token=eos,
        file_size=1,
        load_ms=1.0,
        rss_bytes=1,
        gguf_name=gguf_name,
    )


def as_dicts(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The messages as Hugging Face's apply_chat_template takes them."""
    out = []
    for m in messages:
        d = {"role": m.role.value, "content": m.content}
        if m.tool_name:
            d["name"] = m.tool_name
        out.append(d)
    return out


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> ModelDescription:
    """What a worker would report for SmolLM2, taken from the real GGUF's metadata."""
    layout = HomeLayout(tmp_path_factory.mktemp("home"))
    path = resolve_gguf(ModelRegistry.load(layout).lookup("smollm2-135m"), layout)
    meta = gguf_metadata(path)
    tokens = meta["tokenizer.ggml.tokens"]
    return describe(
        meta["general.architecture"],
        meta["tokenizer.chat_template"],
        bos=tokens[meta["tokenizer.ggml.bos_token_id"]],
        eos=tokens[meta["tokenizer.ggml.eos_token_id"]],
        gguf_name=meta.get("general.name", ""),
    )


def plain_render(description: ModelDescription, messages: list[ChatMessage]) -> str:
    """The GGUF's template rendered by plain jinja2, as transformers would."""
    plain = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(description.chat_template)
    return plain.render(
        messages=as_dicts(messages),
        bos_token=description.bos_token,
        eos_token=description.eos_token,
        add_generation_prompt=True,
    )


# --- the model's own template --------------------------------------------------


def test_smollm2_own_template_renders_as_plain_jinja_does(smollm2: ModelDescription) -> None:
    formatter = PromptFormatter.for_model(smollm2, None)
    ours = formatter.render([SYSTEM, USER])
    assert formatter.source == "gguf (chatml family)"
    assert ours == plain_render(smollm2, [SYSTEM, USER])
    assert ours.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    assert ours.endswith("<|im_start|>assistant\n")


def test_smollm2_multi_turn_with_a_tool_result_renders_as_plain_jinja_does(smollm2: ModelDescription) -> None:
    conversation = [SYSTEM, USER, CALL, RESULT, THANKS]
    rendered = PromptFormatter.for_model(smollm2, None).render_detailed(conversation)
    assert rendered.fallback is None
    assert rendered.text == plain_render(smollm2, conversation)
    assert '<|im_start|>tool\n{"time": "12:00"}<|im_end|>\n<|im_start|>user\nThanks' in rendered.text


def test_smollm2_template_is_prefix_stable_over_six_messages(smollm2: ModelDescription) -> None:
    formatter = PromptFormatter.for_model(smollm2, None)
    conversation = [SYSTEM, USER, CALL, RESULT, ANSWER, THANKS]
    assert is_prefix_stable(formatter, conversation)
    first, second = formatter.render(conversation[:2]), formatter.render(conversation[:4])
    assert second.startswith(first + CALL.content)


def test_smollm2_without_its_template_is_chatml_by_name(smollm2: ModelDescription) -> None:
    bare = msgspec.structs.replace(smollm2, chat_template="", has_chat_template=False)
    formatter = PromptFormatter.for_model(bare, None)
    assert formatter.source == (
        f'builtin:chatml (architecture llama, name "{smollm2.gguf_name}", no template in GGUF)'
    )
    assert formatter.render([SYSTEM, USER]) == PromptFormatter.for_model(smollm2, None).render([SYSTEM, USER])


def test_a_gguf_template_gets_tools_when_it_reads_them() -> None:
    template = (
        "{% if tools %}{{ tools | tojson }}|{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    formatter = PromptFormatter.for_model(describe("llama", template), None)
    rendered = formatter.render_detailed([USER], tools=[CLOCK])
    assert formatter.supports_tools
    assert rendered.tools_advertised
    assert rendered.text == (
        '[{"type": "function", "function": {"name": "clock", "description": "The time", "parameters": {}}}]|Hi'
    )
    assert formatter.render([USER]) == "Hi"


def test_a_template_that_ignores_tools_says_so(smollm2: ModelDescription) -> None:
    formatter = PromptFormatter.for_model(smollm2, None)
    rendered = formatter.render_detailed([USER], tools=[CLOCK])
    assert not formatter.supports_tools
    assert not rendered.tools_advertised
    assert rendered.text == formatter.render([USER])


# --- detection -----------------------------------------------------------------


def test_gemma3_without_a_template_gets_the_gemma_builtin() -> None:
    formatter = PromptFormatter.for_model(describe("gemma3"), None)
    assert formatter.source == "builtin:gemma (architecture gemma3, no template in GGUF)"
    assert formatter.family is BuiltinTemplate.GEMMA
    assert formatter.render([SYSTEM, USER]) == (
        "<bos><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    )


@pytest.mark.parametrize(
    ("architecture", "gguf_name", "expected"),
    [
        ("gemma2", "", BuiltinTemplate.GEMMA),
        ("gemma3", "Gemma 3 270m It", BuiltinTemplate.GEMMA),
        ("llama", "Meta Llama 3.1 8B Instruct", BuiltinTemplate.LLAMA3),
        ("llama", "Llama-3.2-1B-Instruct", BuiltinTemplate.LLAMA3),
        ("llama", "Llama 2 7B Chat", BuiltinTemplate.LLAMA2),
        ("llama", "CodeLlama 7B Instruct", BuiltinTemplate.LLAMA2),
        ("llama", "Mistral 7B Instruct v0.3", BuiltinTemplate.MISTRAL),
        ("llama", "Mixtral 8x7B Instruct v0.1", BuiltinTemplate.MISTRAL),
        ("llama", "OpenHermes 2.5 Mistral 7B", BuiltinTemplate.CHATML),
        ("llama", "SmolLM2 360M Instruct", BuiltinTemplate.CHATML),
        ("llama", "Vicuna 13B v1.5", BuiltinTemplate.VICUNA),
        ("llama", "Alpaca 7B", BuiltinTemplate.ALPACA),
        ("phi3", "", BuiltinTemplate.PHI3),
        ("phi3", "Phi 3.5 Mini Instruct", BuiltinTemplate.PHI3),
        ("deepseek2", "", BuiltinTemplate.DEEPSEEK),
        ("qwen2", "DeepSeek R1 Distill Qwen 7B", BuiltinTemplate.DEEPSEEK_R1),
        ("llama", "DeepSeek-R1-Distill-Llama-8B", BuiltinTemplate.DEEPSEEK_R1),
        ("deepseek2", "DeepSeek V3 0324", BuiltinTemplate.DEEPSEEK),
        ("command-r", "", BuiltinTemplate.COMMAND_R),
        ("cohere2", "", BuiltinTemplate.COMMAND_R),
        ("llama", "c4ai-command-r-v01", BuiltinTemplate.COMMAND_R),
        ("qwen2", "", BuiltinTemplate.CHATML),
        ("qwen2", "Qwen2.5 7B Instruct", BuiltinTemplate.QWEN25),
        ("qwen2", "Qwen2.5-Coder-1.5B-Instruct", BuiltinTemplate.QWEN25),
        ("qwen3", "", BuiltinTemplate.QWEN3),
        ("qwen3moe", "Qwen3 30B A3B", BuiltinTemplate.QWEN3),
        ("qwen3", "Qwen3-0.6B", BuiltinTemplate.QWEN3),
        ("qwen2", "QwQ 32B", BuiltinTemplate.QWEN3),
        ("gpt-oss", "", BuiltinTemplate.GPT_OSS),
        ("gpt-oss", "Gpt Oss 20b", BuiltinTemplate.GPT_OSS),
        ("granite", "", BuiltinTemplate.GRANITE),
        ("granite", "Granite 3.3 2b Instruct", BuiltinTemplate.GRANITE),
        ("granitemoe", "", BuiltinTemplate.GRANITE),
        ("phi3", "Phi 4 Mini Instruct", BuiltinTemplate.PHI4_MINI),
        ("phi3", "Phi-4-mini-instruct", BuiltinTemplate.PHI4_MINI),
        ("smollm3", "", BuiltinTemplate.CHATML),
    ],
)
def test_builtin_is_picked_from_name_and_architecture(
    architecture: str, gguf_name: str, expected: BuiltinTemplate
) -> None:
    formatter = PromptFormatter.for_model(describe(architecture, gguf_name=gguf_name), None)
    assert formatter.choice.origin is TemplateOrigin.BUILTIN
    assert formatter.choice.builtin is expected
    assert formatter.source.startswith(f"builtin:{expected.value} (architecture {architecture}")
    assert formatter.source.endswith("no template in GGUF)")


def test_chatml_is_the_fallback_when_nothing_is_known() -> None:
    formatter = PromptFormatter.for_model(describe("falcon", gguf_name="Falcon 7B"), None)
    assert (
        formatter.source
        == 'builtin:chatml (no template in GGUF, no built-in for architecture falcon, name "Falcon 7B")'
    )
    assert formatter.render([SYSTEM, USER]) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # LLaMA 1's "30B" is not Llama 3.
    assert PromptFormatter.for_model(describe("llama", gguf_name="LLaMA 30B"), None).source == (
        'builtin:chatml (no template in GGUF, no built-in for architecture llama, name "LLaMA 30B")'
    )
    assert PromptFormatter.for_model(describe(""), None).source == (
        "builtin:chatml (no template in GGUF, no built-in for architecture unknown)"
    )


@pytest.mark.parametrize(
    ("template", "family"),
    [
        ("{{ '<|im_start|>' + message['role'] + '\\n' }}", BuiltinTemplate.CHATML),
        ("{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}", BuiltinTemplate.LLAMA3),
        ("{{ bos_token + '[INST] ' + '<<SYS>>\\n' + system_message }}", BuiltinTemplate.LLAMA2),
        ("{{ '[INST] ' + message['content'] + '[/INST]' }}", BuiltinTemplate.MISTRAL),
        ("{{ '<start_of_turn>' + role + '\\n' }}", BuiltinTemplate.GEMMA),
        ("{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}", BuiltinTemplate.PHI3),
        ("{{ '<｜User｜>' + message['content'] }}{{ '<｜Assistant｜>' }}", BuiltinTemplate.DEEPSEEK),
        ("{{ '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' + content }}", BuiltinTemplate.COMMAND_R),
        ("{{ '### Instruction:\\n' + message['content'] }}", BuiltinTemplate.ALPACA),
        ("{{ 'USER: ' + message['content'] }}{{ 'ASSISTANT:' }}", BuiltinTemplate.VICUNA),
        # Qwen 3: <tool_response> results and </think> reasoning; Qwen 2.5: its default system prompt.
        ("{{ '<|im_start|>user' }}{{ '\\n<tool_response>\\n' }}{% set r = c.split('</think>') %}",
         BuiltinTemplate.QWEN3),
        ("{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}",
         BuiltinTemplate.QWEN25),
        ("{{ '<|im_start|>assistant\\n<tool_call>\\n<function=' + name + '>' }}", BuiltinTemplate.CHATML),
        ("{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + t + '<|/tool|><|end|>' }}",
         BuiltinTemplate.PHI4_MINI),
        ("{{'<｜User｜>' + c}}{% set c = c.split('</think>')[-1] %}{{'<｜Assistant｜><think>\\n'}}",
         BuiltinTemplate.DEEPSEEK_R1),
        ("{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] }}",
         BuiltinTemplate.GRANITE),
        ("{{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|end|>' }}",
         BuiltinTemplate.GPT_OSS),
        ("{{ '<|im_start|>' + message['role'] + '<|im_sep|>' }}", None),  # Phi-4: not ChatML's layout
        ("{% for m in messages %}{{ m.content }}{% endfor %}", None),
    ],
)
def test_family_is_read_from_the_template_text(template: str, family: BuiltinTemplate | None) -> None:
    assert template_family(template) is family
    source = PromptFormatter.for_model(describe("llama", template), None).source
    assert source == (f"gguf ({family.value} family)" if family else "gguf (family not recognised)")


def test_override_wins_over_the_gguf_template(smollm2: ModelDescription) -> None:
    by_name = PromptFormatter.for_model(smollm2, "gemma")
    by_enum = PromptFormatter.for_model(smollm2, BuiltinTemplate.LLAMA3)
    assert by_name.source == "override:gemma"
    assert by_enum.source == "override:llama3"
    assert by_name.render([USER]).startswith(f"{smollm2.bos_token}<start_of_turn>user\nHi")


def test_every_builtin_can_be_named_as_an_override() -> None:
    for builtin in BuiltinTemplate:
        assert (
            PromptFormatter.for_model(describe("llama"), builtin.value).source == f"override:{builtin.value}"
        )


def test_unknown_override_name_lists_the_builtins() -> None:
    with pytest.raises(TemplateError) as caught:
        PromptFormatter.for_model(describe("llama"), "llama9")
    assert "'llama9'" in caught.value.message
    for builtin in BuiltinTemplate:
        assert builtin.value in caught.value.message


# --- fallback ------------------------------------------------------------------

# Gemma 1's own template: strict user/model alternation, and no tool role.
GEMMA_STRICT = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
CHATML_NO_TOOLS = (
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported role: ' + m['role']) }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_gguf_template_that_rejects_a_tool_result_falls_back_to_its_family() -> None:
    formatter = PromptFormatter.for_model(describe("gemma", GEMMA_STRICT), None)
    assert formatter.source == "gguf (gemma family)"
    plain = formatter.render_detailed([USER])
    assert plain.fallback is None
    assert plain.text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"

    rendered = formatter.render_detailed([USER, CALL, RESULT])
    assert rendered.fallback == TemplateFallback(
        builtin=BuiltinTemplate.GEMMA,
        cause=FallbackCause.REJECTED,
        detail="Conversation roles must alternate user/assistant/user/assistant/...",
    )
    assert "rejected the conversation" in str(rendered.fallback)
    assert rendered.text == PromptFormatter.for_model(describe("gemma"), "gemma").render([USER, CALL, RESULT])
    assert "<start_of_turn>user\nTool result from clock:\n" in rendered.text


def test_chatml_template_without_a_tool_role_falls_back_and_render_logs_it_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    formatter = PromptFormatter.for_model(describe("qwen2", CHATML_NO_TOOLS), None)
    conversation = [SYSTEM, USER, CALL, RESULT]
    with caplog.at_level("INFO", logger="bastion.supervisor.templates.formatter"):
        first = formatter.render(conversation)
        formatter.render(conversation)
    assert first.endswith('<|im_start|>tool\n{"time": "12:00"}<|im_end|>\n<|im_start|>assistant\n')
    assert [r.getMessage() for r in caplog.records if "Unsupported role: tool" in r.getMessage()] == [
        "gguf (chatml family): the model's own chat template rejected the conversation (Unsupported role: "
        "tool); rendered with the built-in chatml template instead"
    ]


def test_gguf_template_that_errors_falls_back_with_the_error() -> None:
    rendered = PromptFormatter.for_model(describe("llama", "<|im_start|>{{ 1 / 0 }}"), None).render_detailed(
        [USER]
    )
    assert rendered.fallback is not None
    assert rendered.fallback.cause is FallbackCause.FAILED
    assert rendered.fallback.detail == "ZeroDivisionError: division by zero"
    assert rendered.text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_fallback_reports_when_the_stand_in_cannot_take_the_tools() -> None:
    template = "{% if tools %}{{ tools | length }}{% endif %}" + GEMMA_STRICT
    formatter = PromptFormatter.for_model(describe("gemma", template), None)
    assert formatter.supports_tools
    assert formatter.render_detailed([USER], tools=[CLOCK]).tools_advertised
    fell_back = formatter.render_detailed([USER, CALL, RESULT], tools=[CLOCK])
    assert fell_back.fallback is not None
    assert not fell_back.tools_advertised


def test_gguf_template_that_does_not_parse_gives_way_to_its_family() -> None:
    formatter = PromptFormatter.for_model(describe("llama", "<|im_start|>{% for m in %}"), None)
    assert formatter.source == "builtin:chatml (the GGUF's template does not parse, chatml family)"
    assert formatter.render([USER]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_builtin_and_override_never_fall_back() -> None:
    formatter = PromptFormatter.for_model(describe("llama"), "mistral")
    assert formatter.render_detailed([SYSTEM, USER, CALL, RESULT, THANKS]).fallback is None


# --- refusing hostile templates -------------------------------------------------


@pytest.mark.parametrize(
    "hostile",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
        "{{ joiner.__init__.__globals__['__builtins__'] }}",
        "{{ messages.append(1) }}",
        "{{ lipsum.__globals__['os'].popen('id').read() }}",
        "{{ self._TemplateReference__context }}",
        # A known family must not turn a refused template into a quiet fallback.
        "<|im_start|>{{ ''.__class__.__mro__ }}",
        "<start_of_turn>{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
    ],
)
def test_hostile_template_is_refused_not_run(hostile: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    formatter = PromptFormatter.for_model(describe("llama", hostile.replace("{marker}", str(marker))), None)
    with pytest.raises(TemplateError, match="sandbox|failed"):
        formatter.render([USER])
    assert not marker.exists()


def test_template_raise_exception_is_a_template_error() -> None:
    template = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system message required') }}{% endif %}"
    )
    with pytest.raises(TemplateError, match="system message required"):
        PromptFormatter.for_model(describe("llama", template), None).render([USER])


def test_template_that_does_not_parse_fails_when_chosen() -> None:
    with pytest.raises(TemplateError, match="does not parse"):
        PromptFormatter.for_model(describe("llama", "{% for m in %}"), None)


def test_template_runtime_error_is_a_template_error() -> None:
    with pytest.raises(TemplateError, match="ZeroDivisionError"):
        PromptFormatter.for_model(describe("llama", "{{ 1 / 0 }}"), None).render([USER])


def test_huggingface_helpers_are_available() -> None:
    template = (
        "{{ strftime_now('%Y') | length }}|{{ messages[0] | tojson }}|"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}"
    )
    conversation = [ChatMessage(role=ChatRole.USER, content="<b>ü</b>"), SYSTEM]
    rendered = PromptFormatter.for_model(describe("llama", template), None).render(conversation)
    assert rendered == '4|{"role": "user", "content": "<b>ü</b>"}|user'


def test_no_generation_prompt_when_not_asked() -> None:
    formatter = PromptFormatter.for_model(describe("llama"), BuiltinTemplate.CHATML)
    assert not formatter.render([USER], add_generation_prompt=False).endswith("assistant\n")


def test_rendered_structs_are_frozen() -> None:
    rendered = PromptFormatter.for_model(describe("llama"), "chatml").render_detailed([USER])
    with pytest.raises(AttributeError):
        rendered.text = "changed"  # type: ignore[misc]


def test_messages_are_frozen_structs() -> None:
    with pytest.raises(AttributeError):
        USER.content = "changed"  # type: ignore[misc]
    assert msgspec.json.decode(msgspec.json.encode(USER), type=ChatMessage) == USER
