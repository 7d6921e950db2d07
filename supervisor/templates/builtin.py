"""The built-in chat templates, and how to tell which one a model wants.

Owns `BuiltinTemplate`, the Jinja source of each built-in, and the evidence
that points at one: marker strings in a GGUF's own template (its *family*) and
a model's `general.architecture` and `general.name` when the GGUF has none.
It must not render, parse or choose between a GGUF's template and a built-in:
that is `formatter.py`'s job.

Every source renders under `formatter.py`'s Hugging Face-compatible sandbox
(trim_blocks, lstrip_blocks) with `messages` (dicts of `role`, `content` and,
for a tool result, `name`), `bos_token`, `eos_token`, `add_generation_prompt`
and `tools` (OpenAI-style function specs, or none).

Each follows its family's published template (Hugging Face tokenizer configs,
llama.cpp's `llama-chat.cpp`) with the same departures throughout, all for an
agent's transcript and for a prompt prefix that only grows:
- no role-alternation checks: a tool result may follow a user turn;
- a family with no system role gets the first system message folded into the
  first user turn (Mistral v3's own template folds it into the *last* one and
  puts `[AVAILABLE_TOOLS]` before the last user turn; both move every turn,
  so here both sit at the start);
- a family with no tool role gets a tool result as a user-side turn headed
  `Tool result from NAME:`.
Only ChatML (Qwen/Hermes `<tools>` block), Llama 3 (3.1 JSON functions) and
Mistral (`[AVAILABLE_TOOLS]`) advertise `tools`; for the others the caller
describes its tools in the system message.
"""

from __future__ import annotations

import enum
import re


class BuiltinTemplate(enum.Enum):
    CHATML = "chatml"
    LLAMA3 = "llama3"
    LLAMA2 = "llama2"
    MISTRAL = "mistral"
    GEMMA = "gemma"
    PHI3 = "phi3"
    DEEPSEEK = "deepseek"
    COMMAND_R = "command-r"
    ALPACA = "alpaca"
    VICUNA = "vicuna"


# Prepended to the sources of the families without a tool role: the label makes a tool's
# output distinguishable from something the user typed.
_TOOL_TEXT = r"""
{%- macro tool_text(message) -%}
{{- 'Tool result' + (' from ' + message['name'] if message['name'] is defined else '') + ':\n' -}}
{{- message['content'] | trim -}}
{%- endmacro -%}
"""

_CHATML = r"""
{%- if tools -%}
{{- '<|im_start|>system\n' -}}
{%- if messages and messages[0]['role'] == 'system' -%}
{{- messages[0]['content'] + '\n\n' -}}
{%- endif -%}
{{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
{%- for tool in tools -%}
{{- '\n' + tool | tojson -}}
{%- endfor -%}
{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments '
    'within <tool_call></tool_call> XML tags:\n<tool_call>\n'
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if not (tools and loop.first and message['role'] == 'system') -%}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

# Llama 3.0's turns; with tools, Llama 3.1's JSON function calling, listed in
# the system turn (its `tools_in_user_message=false` layout) and answered in
# the `ipython` role.
_LLAMA3 = r"""
{{- bos_token -}}
{%- if tools -%}
{{- '<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n\n' -}}
{{- 'You have access to the following functions. To call a function, please respond with JSON for a '
    'function call. Respond in the format {"name": function name, "parameters": dictionary of '
    'argument name and its value}. Do not use variables.\n\n' -}}
{%- for tool in tools -%}
{{- tool | tojson(indent=4) + '\n\n' -}}
{%- endfor -%}
{%- if messages and messages[0]['role'] == 'system' -%}
{{- messages[0]['content'] | trim -}}
{%- endif -%}
{{- '<|eot_id|>' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if not (tools and loop.first and message['role'] == 'system') -%}
{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] -%}
{{- '<|start_header_id|>' + role + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%}
"""

# Llama 2 has no turn for anything but user and assistant, so consecutive
# user-side messages (a tool result, then the user) share one [INST] block.
_LLAMA2 = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system_prefix = '<<SYS>>\n' + messages[0]['content'] | trim + '\n<</SYS>>\n\n' -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set system_prefix = '' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
{%- if message['role'] == 'assistant' -%}
{{- ' ' + message['content'] | trim + ' ' + eos_token -}}
{%- else -%}
{%- if loop.previtem is defined and loop.previtem['role'] != 'assistant' -%}
{{- '\n\n' -}}
{%- else -%}
{{- bos_token + '[INST] ' + (system_prefix if loop.first else '') -}}
{%- endif -%}
{{- tool_text(message) if message['role'] == 'tool' else message['content'] | trim -}}
{%- if loop.nextitem is not defined or loop.nextitem['role'] == 'assistant' -%}
{{- ' [/INST]' -}}
{%- endif -%}
{%- endif -%}
{%- endfor -%}
"""

# Mistral's v3 layout (Mistral 7B v0.3, Mixtral 8x22B): its control tokens
# carry tools and tool results.
_MISTRAL = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system_prefix = messages[0]['content'] + '\n\n' -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set system_prefix = '' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{{- bos_token -}}
{%- if tools -%}
{{- '[AVAILABLE_TOOLS] ' + tools | tojson + '[/AVAILABLE_TOOLS]' -}}
{%- endif -%}
{%- for message in loop_messages -%}
{%- if message['role'] == 'assistant' -%}
{{- ' ' + message['content'] | trim + eos_token -}}
{%- elif message['role'] == 'tool' -%}
{%- if message['name'] is defined -%}
{%- set result = {'name': message['name'], 'content': message['content']} -%}
{%- else -%}
{%- set result = {'content': message['content']} -%}
{%- endif -%}
{{- '[TOOL_RESULTS] ' + result | tojson + '[/TOOL_RESULTS]' -}}
{%- else -%}
{{- '[INST] ' + (system_prefix if loop.first else '') + message['content'] + '[/INST]' -}}
{%- endif -%}
{%- endfor -%}
"""

_GEMMA = r"""
{{- bos_token -}}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set first_user_prefix = '' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}
{{- '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') -}}
{{- tool_text(message) if message['role'] == 'tool' else message['content'] | trim -}}
{{- '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<start_of_turn>model\n' -}}
{%- endif -%}
"""

# Phi-3.5's template; like it, a prompt without a generation prompt ends in EOS.
_PHI3 = r"""
{%- for message in messages -%}
{%- if message['role'] == 'tool' -%}
{{- '<|user|>\n' + tool_text(message) + '<|end|>\n' -}}
{%- else -%}
{{- '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|assistant|>\n' -}}
{%- else -%}
{{- eos_token -}}
{%- endif -%}
"""

# DeepSeek V3/R1: the system prompt bare after BOS; consecutive tool results
# share one outputs block, and the reply after them has no Assistant token.
_DEEPSEEK = r"""
{{- bos_token -}}
{%- if messages and messages[0]['role'] == 'system' -%}
{{- messages[0]['content'] -}}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- set ns = namespace(in_outputs=false) -%}
{%- for message in loop_messages -%}
{%- if message['role'] == 'tool' -%}
{{- '\n' if ns.in_outputs else '<｜tool▁outputs▁begin｜>' -}}
{{- '<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' -}}
{%- set ns.in_outputs = true -%}
{%- else -%}
{%- if ns.in_outputs -%}
{{- '<｜tool▁outputs▁end｜>' -}}
{%- endif -%}
{%- if message['role'] == 'assistant' -%}
{{- ('' if ns.in_outputs else '<｜Assistant｜>') + message['content'] + '<｜end▁of▁sentence｜>' -}}
{%- else -%}
{{- '<｜User｜>' + message['content'] -}}
{%- endif -%}
{%- set ns.in_outputs = false -%}
{%- endif -%}
{%- endfor -%}
{%- if ns.in_outputs -%}
{{- '<｜tool▁outputs▁end｜>' -}}
{%- elif add_generation_prompt -%}
{{- '<｜Assistant｜>' -}}
{%- endif -%}
"""

# Command-R's turns; tool results as in its tool-use template, a system turn
# wrapped in <results>.
_COMMAND_R = r"""
{{- bos_token -}}
{%- set tokens = {'system': '<|SYSTEM_TOKEN|>', 'user': '<|USER_TOKEN|>',
                  'assistant': '<|CHATBOT_TOKEN|>'} -%}
{%- for message in messages -%}
{%- if message['role'] == 'tool' -%}
{{- '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|><results>\n' + message['content'] | trim -}}
{{- '</results><|END_OF_TURN_TOKEN|>' -}}
{%- else -%}
{{- '<|START_OF_TURN_TOKEN|>' + tokens[message['role']] -}}
{{- message['content'] | trim + '<|END_OF_TURN_TOKEN|>' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' -}}
{%- endif -%}
"""

_ALPACA = r"""
{{- bos_token -}}
{%- if messages and messages[0]['role'] == 'system' -%}
{{- messages[0]['content'] | trim + '\n\n' -}}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
{%- if message['role'] == 'assistant' -%}
{{- '### Response:\n' + message['content'] | trim + eos_token + '\n\n' -}}
{%- else -%}
{{- '### Instruction:\n' -}}
{{- tool_text(message) if message['role'] == 'tool' else message['content'] | trim -}}
{{- '\n\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '### Response:\n' -}}
{%- endif -%}
"""

# Vicuna v1.1 with one turn per line, as llama.cpp renders it.
_VICUNA = r"""
{{- bos_token -}}
{%- if messages and messages[0]['role'] == 'system' -%}
{{- messages[0]['content'] | trim + '\n\n' -}}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
{%- if message['role'] == 'assistant' -%}
{{- 'ASSISTANT: ' + message['content'] | trim + eos_token + '\n' -}}
{%- else -%}
{{- 'USER: ' -}}
{{- tool_text(message) if message['role'] == 'tool' else message['content'] | trim -}}
{{- '\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- 'ASSISTANT:' -}}
{%- endif -%}
"""

BUILTIN_SOURCES: dict[BuiltinTemplate, str] = {
    BuiltinTemplate.CHATML: _CHATML,
    BuiltinTemplate.LLAMA3: _LLAMA3,
    BuiltinTemplate.LLAMA2: _TOOL_TEXT + _LLAMA2,
    BuiltinTemplate.MISTRAL: _MISTRAL,
    BuiltinTemplate.GEMMA: _TOOL_TEXT + _GEMMA,
    BuiltinTemplate.PHI3: _TOOL_TEXT + _PHI3,
    BuiltinTemplate.DEEPSEEK: _DEEPSEEK,
    BuiltinTemplate.COMMAND_R: _COMMAND_R,
    BuiltinTemplate.ALPACA: _TOOL_TEXT + _ALPACA,
    BuiltinTemplate.VICUNA: _TOOL_TEXT + _VICUNA,
}


# First match wins. Every marker of a row must appear. A None family marks
# templates that share a marker with a family but are not that format (Phi-4
# and SmolVLM use <|im_start|> without ChatML's layout).
_TEMPLATE_MARKERS: tuple[tuple[tuple[str, ...], BuiltinTemplate | None], ...] = (
    (("<|im_start|>", "<|im_sep|>"), None),
    (("<|im_start|>", "<end_of_utterance>"), None),
    (("<|im_start|>",), BuiltinTemplate.CHATML),
    (("[INST]", "<<SYS>>"), BuiltinTemplate.LLAMA2),
    (("[INST]",), BuiltinTemplate.MISTRAL),
    (("<|start_header_id|>",), BuiltinTemplate.LLAMA3),
    (("<start_of_turn>",), BuiltinTemplate.GEMMA),
    (("<|user|>", "<|end|>"), BuiltinTemplate.PHI3),
    (("<｜User｜>",), BuiltinTemplate.DEEPSEEK),
    (("<|START_OF_TURN_TOKEN|>",), BuiltinTemplate.COMMAND_R),
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
    (re.compile(r"deepseek"), BuiltinTemplate.DEEPSEEK),
    (re.compile(r"command[-_ ]?r|c4ai|\baya\b"), BuiltinTemplate.COMMAND_R),
    (re.compile(r"smollm|qwen|hermes|dolphin"), BuiltinTemplate.CHATML),
    (re.compile(r"mistral|mixtral|ministral|codestral|mathstral"), BuiltinTemplate.MISTRAL),
    (re.compile(r"llama[-_ ]?3(?!\d)"), BuiltinTemplate.LLAMA3),
    (re.compile(r"llama[-_ ]?2(?!\d)|codellama"), BuiltinTemplate.LLAMA2),
    (re.compile(r"phi[-_ ]?3"), BuiltinTemplate.PHI3),
    (re.compile(r"gemma"), BuiltinTemplate.GEMMA),
    (re.compile(r"vicuna"), BuiltinTemplate.VICUNA),
    (re.compile(r"alpaca"), BuiltinTemplate.ALPACA),
)

# general.architecture prefixes that settle the format on their own.
_ARCHITECTURE_RULES: tuple[tuple[str, BuiltinTemplate], ...] = (
    ("gemma", BuiltinTemplate.GEMMA),
    ("phi3", BuiltinTemplate.PHI3),
    ("phimoe", BuiltinTemplate.PHI3),
    ("deepseek", BuiltinTemplate.DEEPSEEK),
    ("command-r", BuiltinTemplate.COMMAND_R),
    ("cohere", BuiltinTemplate.COMMAND_R),
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
