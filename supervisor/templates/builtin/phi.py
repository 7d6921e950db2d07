"""Microsoft's Phi formats: Phi-3/3.5 (a newline after each role tag) and Phi-4-mini (none)."""

from __future__ import annotations

# Phi-3.5's template; like it, a prompt without a generation prompt ends in EOS, and an
# empty system message is left out.
PHI3 = r"""
{%- for message in messages -%}
{%- if message['role'] == 'tool' -%}
{{- '<|user|>\n' + tool_text(message) + '<|end|>\n' -}}
{%- elif message['role'] != 'system' or message['content'] -%}
{{- '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|assistant|>\n' -}}
{%- else -%}
{{- eos_token -}}
{%- endif -%}
"""

# Phi-4-mini: tools are the functions' JSON list between <|tool|> and <|/tool|> in the
# system turn (its model card's layout; the official template reads them from the system
# message), opening an empty system turn if there is none. A tool result gets the
# model's <|tool_response|> token.
PHI4_MINI = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system = messages[0]['content'] -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set system = none -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- if system is not none or tools -%}
{{- '<|system|>' + (system or '') -}}
{%- if tools -%}
{{- '<|tool|>' + tools | map(attribute='function') | list | tojson + '<|/tool|>' -}}
{%- endif -%}
{{- '<|end|>' -}}
{%- endif -%}
{%- for message in loop_messages -%}
{%- set role = 'tool_response' if message['role'] == 'tool' else message['role'] -%}
{{- '<|' + role + '|>' + message['content'] + '<|end|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|assistant|>' -}}
{%- else -%}
{{- eos_token -}}
{%- endif -%}
"""
