"""Formats older than chat templates, with no official Jinja: Alpaca and Vicuna v1.1."""

from __future__ import annotations

ALPACA = r"""
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
VICUNA = r"""
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
