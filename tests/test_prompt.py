"""Choosing and rendering chat templates, and refusing hostile ones."""

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
from bastion.supervisor.model_sources import resolve_gguf
from bastion.supervisor.prompt import BuiltinTemplate, ChatMessage, ChatRole, PromptFormatter
from bastion.supervisor.registry import ModelRegistry

SYSTEM = ChatMessage(role=ChatRole.SYSTEM, content="You are terse.")
USER = ChatMessage(role=ChatRole.USER, content="Hi")

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
    architecture: str, chat_template: str = "", bos: str = "<bos>", eos: str = "<eos>"
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
    )


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
    )


def test_smollm2_own_template_renders_as_plain_jinja_does(smollm2: ModelDescription) -> None:
    formatter = PromptFormatter.for_model(smollm2, None)
    ours = formatter.render([SYSTEM, USER])
    plain = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(smollm2.chat_template)
    expected = plain.render(
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
        bos_token=smollm2.bos_token,
        eos_token=smollm2.eos_token,
        add_generation_prompt=True,
    )
    assert formatter.source == "gguf"
    assert ours == expected
    assert ours.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    assert ours.endswith("<|im_start|>assistant\n")


def test_gemma_builtin_folds_system_into_first_user_turn() -> None:
    formatter = PromptFormatter.for_model(describe("gemma3"), None)
    assert formatter.source == "builtin:gemma (architecture gemma3, no template in GGUF)"
    assert formatter.render([SYSTEM, USER]) == (
        "<bos><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    )


def test_gemma_builtin_multi_turn_golden() -> None:
    formatter = PromptFormatter.for_model(describe("gemma2"), None)
    conversation = [
        USER,
        ChatMessage(role=ChatRole.ASSISTANT, content="Hello. "),
        ChatMessage(role=ChatRole.TOOL, content='{"ok": true}'),
    ]
    assert formatter.render(conversation, add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        '<start_of_turn>user\n{"ok": true}<end_of_turn>\n'
    )


def test_chatml_is_the_fallback_for_other_architectures() -> None:
    formatter = PromptFormatter.for_model(describe("qwen2"), None)
    expected_source = "builtin:chatml (no template in GGUF, no built-in for architecture qwen2)"
    assert formatter.source == expected_source
    assert formatter.render([SYSTEM, USER]) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_override_wins_over_the_gguf_template(smollm2: ModelDescription) -> None:
    by_name = PromptFormatter.for_model(smollm2, "gemma")
    by_enum = PromptFormatter.for_model(smollm2, BuiltinTemplate.CHATML)
    assert by_name.source == "override:gemma"
    assert by_enum.source == "override:chatml"
    assert by_name.render([USER]).startswith(f"{smollm2.bos_token}<start_of_turn>user\nHi")


def test_unknown_override_name_lists_the_builtins() -> None:
    with pytest.raises(TemplateError, match="chatml"):
        PromptFormatter.for_model(describe("llama"), "llama9")


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


def test_messages_are_frozen_structs() -> None:
    with pytest.raises(AttributeError):
        USER.content = "changed"  # type: ignore[misc]
    assert msgspec.json.decode(msgspec.json.encode(USER), type=ChatMessage) == USER
