"""The built-in chat templates, and how to tell which one a model wants.

Owns `BuiltinTemplate`, the Jinja source of each built-in (one module per
family: `chatml`, `llama`, `mistral`, `gemma`, `phi`, `deepseek`, `command_r`,
`granite`, `harmony`, `legacy`), what each deliberately does differently from
its family's official template (`BuiltinTemplate.departures`), and the evidence
that points at one: marker strings in a GGUF's own template (its *family*) and a
model's `general.architecture` and `general.name` when the GGUF has none. It
must not render, parse or choose between a GGUF's template and a built-in: that
is `formatter.py`'s job.

Every source renders under `formatter.py`'s Hugging Face-compatible sandbox
(trim_blocks, lstrip_blocks) with `messages` (dicts of `role`, `content`, for a
tool result `name`, for an assistant turn with separate reasoning
`reasoning_content`), `bos_token`, `eos_token`, `add_generation_prompt` and
`tools` (OpenAI-style function specs, or none). An assistant turn's content is
what the model wrote, tool calls included, so a call renders as the model's own
text rather than from structured `tool_calls`.

Each renders what its family's official template renders (Hugging Face tokenizer
configs, llama.cpp's `models/templates`), byte for byte for a conversation with
a system prompt, tools and a tool call (tests/test_official_templates.py), but
for these departures, all for an agent's transcript and for a prompt prefix that
only grows, so the worker's KV cache keeps matching turn after turn:
- no role-alternation checks: a tool result may follow a user turn, two user
  turns may follow each other;
- a family with no system role gets the system message folded into the first
  user turn (Gemma's own does the same; Llama 2's own uses <<SYS>>);
- a family with no tool role (Llama 2, Gemma, Phi-3, Alpaca, Vicuna) gets a
  tool result as a user-side turn headed `Tool result from NAME:`; Phi-4-mini
  gets its <|tool_response|> token, Command-R its tool-use template's <results>;
- Mistral v3's own template puts the system prompt and [AVAILABLE_TOOLS] before
  the *last* [INST] (and leaves the system prompt out while a tool result is
  last), so both move at every model call and everything after the previous
  user turn is prefilled again. bench/template_placement.py renders a
  10-question agent conversation (bastion's calculator and clock, six tool
  calls, 16 model calls) both ways: the official placement re-prefills 270
  tokens per model call on average against 23 here (SmolLM2's tokenizer, which
  spells Mistral's control tokens out; 844 characters against 51). Here both
  sit at the start, after BOS. A tool result carries no `call_id`: the
  transcript keeps no call ids;
- DeepSeek's templates leave a tool-outputs block open when a user turn follows
  it; here it is closed first;
- gpt-oss: an assistant turn the model wrote in harmony is kept as written,
  analysis included, where the official template drops a tool-call turn's
  analysis once a final answer follows (re-rendering the whole tool loop); a
  nested object or array parameter is declared `object` or `any[]` rather than
  spelled out as the official template does.

Two official formats are not prefix-stable, and the built-ins follow them: Qwen 3
drops the reasoning of the assistant turns before the last user query, and
DeepSeek R1 opens the generation prompt with `<think>` and a newline and keeps
only what follows `</think>` of an earlier reply. Either way what is re-prefilled
is bounded by the last assistant turns since the previous user query. gpt-oss
(always) and Granite (without a system prompt) write today's date, as their own
templates do, so a conversation that crosses midnight is prefilled again once.

ChatML (Qwen/Hermes `<tools>` block), Qwen 2.5, Qwen 3, Llama 3, Mistral,
Phi-4-mini, Granite and gpt-oss advertise `tools`; for the others the caller
describes its tools in the system message.
"""

from __future__ import annotations

import enum
import re

from bastion.supervisor.templates.builtin._shared import TOOL_TEXT
from bastion.supervisor.templates.builtin.chatml import CHATML, QWEN3, QWEN25
from bastion.supervisor.templates.builtin.command_r import COMMAND_R
from bastion.supervisor.templates.builtin.deepseek import DEEPSEEK, DEEPSEEK_R1
from bastion.supervisor.templates.builtin.gemma import GEMMA
from bastion.supervisor.templates.builtin.granite import GRANITE
from bastion.supervisor.templates.builtin.harmony import GPT_OSS
from bastion.supervisor.templates.builtin.legacy import ALPACA, VICUNA
from bastion.supervisor.templates.builtin.llama import LLAMA2, LLAMA3
from bastion.supervisor.templates.builtin.mistral import MISTRAL
from bastion.supervisor.templates.builtin.phi import PHI3, PHI4_MINI

__all__ = ["BUILTIN_SOURCES", "BuiltinTemplate", "builtin_for_model", "template_family"]


class BuiltinTemplate(enum.Enum):
    CHATML = "chatml"
    QWEN25 = "qwen2.5"
    QWEN3 = "qwen3"
    LLAMA3 = "llama3"
    LLAMA2 = "llama2"
    MISTRAL = "mistral"
    GEMMA = "gemma"
    PHI3 = "phi3"
    PHI4_MINI = "phi4-mini"
    DEEPSEEK = "deepseek"
    DEEPSEEK_R1 = "deepseek-r1"
    COMMAND_R = "command-r"
    GRANITE = "granite"
    GPT_OSS = "gpt-oss"
    ALPACA = "alpaca"
    VICUNA = "vicuna"

    @property
    def departures(self) -> tuple[str, ...]:
        """Where this built-in deliberately renders otherwise than its family's official template."""
        return _DEPARTURES.get(self, ())


BUILTIN_SOURCES: dict[BuiltinTemplate, str] = {
    BuiltinTemplate.CHATML: CHATML,
    BuiltinTemplate.QWEN25: QWEN25,
    BuiltinTemplate.QWEN3: QWEN3,
    BuiltinTemplate.LLAMA3: LLAMA3,
    BuiltinTemplate.LLAMA2: TOOL_TEXT + LLAMA2,
    BuiltinTemplate.MISTRAL: MISTRAL,
    BuiltinTemplate.GEMMA: TOOL_TEXT + GEMMA,
    BuiltinTemplate.PHI3: TOOL_TEXT + PHI3,
    BuiltinTemplate.PHI4_MINI: PHI4_MINI,
    BuiltinTemplate.DEEPSEEK: DEEPSEEK,
    BuiltinTemplate.DEEPSEEK_R1: DEEPSEEK_R1,
    BuiltinTemplate.COMMAND_R: COMMAND_R,
    BuiltinTemplate.GRANITE: GRANITE,
    BuiltinTemplate.GPT_OSS: GPT_OSS,
    BuiltinTemplate.ALPACA: TOOL_TEXT + ALPACA,
    BuiltinTemplate.VICUNA: TOOL_TEXT + VICUNA,
}

_NO_TOOL_ROLE = "a tool result is a user turn headed 'Tool result from NAME:' (the format has no tool role)"
_NO_ALTERNATION = "roles need not alternate (the official template refuses a tool result after a user turn)"
_OUTPUTS_CLOSED = (
    "tool outputs are closed with <｜tool▁outputs▁end｜> before a user turn (the official template leaves "
    "them open)"
)

# One line each, as `--show-prompt` prints them.
_DEPARTURES: dict[BuiltinTemplate, tuple[str, ...]] = {
    BuiltinTemplate.LLAMA2: (_NO_TOOL_ROLE, _NO_ALTERNATION),
    BuiltinTemplate.MISTRAL: (
        "the system prompt and [AVAILABLE_TOOLS] sit at the start, where Mistral's template puts them before "
        "the last [INST], moving them every model call (about 250 tokens more to prefill per call in a "
        "10-question agent conversation: bench/template_placement.py)",
        "a tool result carries no call_id (the transcript keeps no call ids)",
        _NO_ALTERNATION,
    ),
    BuiltinTemplate.GEMMA: (_NO_TOOL_ROLE, _NO_ALTERNATION),
    BuiltinTemplate.PHI3: (_NO_TOOL_ROLE,),
    BuiltinTemplate.PHI4_MINI: (
        "a tool result gets <|tool_response|>, where the official template would write <|tool|>, the token "
        "that opens the tool list",
    ),
    BuiltinTemplate.DEEPSEEK: (_OUTPUTS_CLOSED,),
    BuiltinTemplate.DEEPSEEK_R1: (_OUTPUTS_CLOSED,),
    BuiltinTemplate.COMMAND_R: (
        "a tool result is a system turn wrapped in <results>, as in Command-R's tool-use template",
        _NO_ALTERNATION,
    ),
    BuiltinTemplate.GPT_OSS: (
        "an assistant turn written in harmony keeps its analysis, where the official template drops a "
        "tool-call turn's analysis once a final answer follows",
        "nested object and array parameters are declared as `object` and `any[]`",
    ),
    BuiltinTemplate.ALPACA: (_NO_TOOL_ROLE,),
    BuiltinTemplate.VICUNA: (_NO_TOOL_ROLE,),
}


# First match wins. Every marker of a row must appear. A None family marks
# templates that share a marker with a family but are not that format (Phi-4
# and SmolVLM use <|im_start|> without ChatML's layout). Qwen3-Coder writes its
# calls as <function=…>, which neither Qwen built-in lists: plain ChatML.
_TEMPLATE_MARKERS: tuple[tuple[tuple[str, ...], BuiltinTemplate | None], ...] = (
    (("<|im_start|>", "<|im_sep|>"), None),
    (("<|im_start|>", "<end_of_utterance>"), None),
    (("<|im_start|>", "<function="), BuiltinTemplate.CHATML),
    (("<|im_start|>", "<tool_response>", "</think>"), BuiltinTemplate.QWEN3),
    (("<|im_start|>", "You are Qwen, created by Alibaba Cloud"), BuiltinTemplate.QWEN25),
    (("<|im_start|>",), BuiltinTemplate.CHATML),
    (("[INST]", "<<SYS>>"), BuiltinTemplate.LLAMA2),
    (("[INST]",), BuiltinTemplate.MISTRAL),
    (("<|start_header_id|>",), BuiltinTemplate.LLAMA3),
    (("<start_of_turn>",), BuiltinTemplate.GEMMA),
    (("<|/tool|>", "<|end|>"), BuiltinTemplate.PHI4_MINI),
    (("<|user|>", "<|end|>"), BuiltinTemplate.PHI3),
    (("<｜User｜>", "</think>"), BuiltinTemplate.DEEPSEEK_R1),
    (("<｜User｜>",), BuiltinTemplate.DEEPSEEK),
    (("<|START_OF_TURN_TOKEN|>",), BuiltinTemplate.COMMAND_R),
    (("<|start_of_role|>",), BuiltinTemplate.GRANITE),
    (("<|start|>", "<|channel|>"), BuiltinTemplate.GPT_OSS),
    (("### Instruction",), BuiltinTemplate.ALPACA),
    (("USER:",), BuiltinTemplate.VICUNA),
)


def template_family(template: str) -> BuiltinTemplate | None:
    """The built-in whose format a GGUF's own template writes, if recognised."""
    for markers, family in _TEMPLATE_MARKERS:
        if all(marker in template for marker in markers):
            return family
    return None


# Checked before the architecture, since fine-tunes and distillations keep
# their base's architecture but their own format (SmolLM2 and the DeepSeek R1
# distills are `llama`/`qwen2`). Hermes and Dolphin tunes of Mistral use ChatML.
_NAME_RULES: tuple[tuple[re.Pattern[str], BuiltinTemplate], ...] = (
    (re.compile(r"deepseek.*\br1\b|\br1[-_ ]distill"), BuiltinTemplate.DEEPSEEK_R1),
    (re.compile(r"deepseek"), BuiltinTemplate.DEEPSEEK),
    (re.compile(r"command[-_ ]?r|c4ai|\baya\b"), BuiltinTemplate.COMMAND_R),
    (re.compile(r"gpt[-_ ]?oss"), BuiltinTemplate.GPT_OSS),
    (re.compile(r"granite"), BuiltinTemplate.GRANITE),
    (re.compile(r"qwen[-_ ]?3(?!\d)|\bqwq\b"), BuiltinTemplate.QWEN3),
    (re.compile(r"qwen[-_ ]?2[._]5"), BuiltinTemplate.QWEN25),
    (re.compile(r"smollm|qwen|hermes|dolphin"), BuiltinTemplate.CHATML),
    (re.compile(r"mistral|mixtral|ministral|codestral|mathstral"), BuiltinTemplate.MISTRAL),
    (re.compile(r"llama[-_ ]?3(?!\d)"), BuiltinTemplate.LLAMA3),
    (re.compile(r"llama[-_ ]?2(?!\d)|codellama"), BuiltinTemplate.LLAMA2),
    (re.compile(r"phi[-_ ]?4[-_ ]?mini"), BuiltinTemplate.PHI4_MINI),
    (re.compile(r"phi[-_ ]?3"), BuiltinTemplate.PHI3),
    (re.compile(r"gemma"), BuiltinTemplate.GEMMA),
    (re.compile(r"vicuna"), BuiltinTemplate.VICUNA),
    (re.compile(r"alpaca"), BuiltinTemplate.ALPACA),
)

# general.architecture prefixes that settle the format on their own (first match wins).
# `qwen2` is Qwen 2 as well as 2.5, whose default system prompts differ: plain ChatML.
_ARCHITECTURE_RULES: tuple[tuple[str, BuiltinTemplate], ...] = (
    ("gemma", BuiltinTemplate.GEMMA),
    ("phi3", BuiltinTemplate.PHI3),
    ("phimoe", BuiltinTemplate.PHI3),
    ("deepseek", BuiltinTemplate.DEEPSEEK),
    ("command-r", BuiltinTemplate.COMMAND_R),
    ("cohere", BuiltinTemplate.COMMAND_R),
    ("gpt-oss", BuiltinTemplate.GPT_OSS),
    ("granite", BuiltinTemplate.GRANITE),
    ("qwen3", BuiltinTemplate.QWEN3),
    ("qwen", BuiltinTemplate.CHATML),
    ("smollm", BuiltinTemplate.CHATML),
)


def builtin_for_model(architecture: str, gguf_name: str) -> tuple[BuiltinTemplate, str] | None:
    """The built-in for a model whose GGUF has no template, and what gave it away."""
    name = gguf_name.lower()
    for pattern, builtin in _NAME_RULES:
        if pattern.search(name):
            return builtin, f'architecture {architecture or "unknown"}, name "{gguf_name}"'
    for prefix, builtin in _ARCHITECTURE_RULES:
        if architecture.startswith(prefix):
            return builtin, f"architecture {architecture}"
    return None
