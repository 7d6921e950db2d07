"""ChatML and the Qwen formats built on it (Qwen 2.5, Qwen 3).

All three list tools the way Qwen's templates do: a `# Tools` section with a
`<tools>` block of JSON specs in the system turn, and `<tool_call>` instructions.
Generic ChatML (SmolLM2, Hermes, Dolphin) answers tools in a `tool` turn; Qwen
wraps results in `<tool_response>` inside a user turn, consecutive ones together.
"""

from __future__ import annotations

# The `# Tools` section, after the system prompt and its blank line; closes the system turn.
_TOOLS = r"""
{%- macro tools_section(tools) -%}
{{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
{%- for tool in tools -%}
{{- '\n' + tool | tojson -}}
{%- endfor -%}
{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments '
    'within <tool_call></tool_call> XML tags:\n<tool_call>\n'
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- endmacro -%}
"""

# One `<tool_response>` in the user turn that holds a run of consecutive results.
_TOOL_RESPONSE = r"""
{%- macro tool_response(message, loop) -%}
{%- if loop.previtem is not defined or loop.previtem['role'] != 'tool' -%}
{{- '<|im_start|>user' -}}
{%- endif -%}
{{- '\n<tool_response>\n' + message['content'] + '\n</tool_response>' -}}
{%- if loop.nextitem is not defined or loop.nextitem['role'] != 'tool' -%}
{{- '<|im_end|>\n' -}}
{%- endif -%}
{%- endmacro -%}
"""

CHATML = _TOOLS + r"""
{%- if tools -%}
{{- '<|im_start|>system\n' -}}
{%- if messages and messages[0]['role'] == 'system' -%}
{{- messages[0]['content'] + '\n\n' -}}
{%- endif -%}
{{- tools_section(tools) -}}
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

# Qwen 2.5: a default system prompt when the conversation has none.
QWEN25 = _TOOLS + _TOOL_RESPONSE + r"""
{%- set has_system = messages and messages[0]['role'] == 'system' -%}
{%- set system = messages[0]['content'] if has_system
    else 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' -%}
{%- if tools -%}
{{- '<|im_start|>system\n' + system + '\n\n' + tools_section(tools) -}}
{%- else -%}
{{- '<|im_start|>system\n' + system + '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if message['role'] == 'tool' -%}
{{- tool_response(message, loop) -}}
{%- elif not (loop.first and has_system) -%}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

# Qwen 3: an assistant turn after the last user query keeps its reasoning as a <think>
# block (the last one always gets the block, empty if need be); earlier turns lose it.
# The reasoning is `reasoning_content`, or else what the content holds before </think>.
QWEN3 = _TOOLS + _TOOL_RESPONSE + r"""
{%- set has_system = messages and messages[0]['role'] == 'system' -%}
{%- if tools -%}
{{- '<|im_start|>system\n' + (messages[0]['content'] + '\n\n' if has_system else '') -}}
{{- tools_section(tools) -}}
{%- elif has_system -%}
{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' -}}
{%- endif -%}
{%- set query = namespace(last=messages | length - 1) -%}
{%- for message in messages -%}
{%- if message['role'] == 'user' and not (message['content'].startswith('<tool_response>')
                                          and message['content'].endswith('</tool_response>')) -%}
{%- set query.last = loop.index0 -%}
{%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
{%- if message['role'] == 'assistant' -%}
{%- set content = message['content'] -%}
{%- set reasoning = '' -%}
{%- if message['reasoning_content'] is defined -%}
{%- set reasoning = message['reasoning_content'] -%}
{%- elif '</think>' in content -%}
{%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}
{%- set content = content.split('</think>')[-1].lstrip('\n') -%}
{%- endif -%}
{{- '<|im_start|>assistant\n' -}}
{%- if loop.index0 > query.last and (loop.last or reasoning) -%}
{{- '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') -}}
{%- else -%}
{{- content -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- elif message['role'] == 'tool' -%}
{{- tool_response(message, loop) -}}
{%- elif not (loop.first and has_system) -%}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- if enable_thinking is defined and enable_thinking is false -%}
{{- '<think>\n\n</think>\n\n' -}}
{%- endif -%}
{%- endif -%}
"""
