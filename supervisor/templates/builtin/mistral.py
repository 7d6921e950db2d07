"""Mistral's v3 layout (Mistral 7B v0.3, Mixtral 8x22B, Codestral, Mathstral).

Its control tokens carry the tools ([AVAILABLE_TOOLS]), the model's calls
([TOOL_CALLS], kept as the model wrote them) and their results ([TOOL_RESULTS]).
"""

from __future__ import annotations

# A result is `{"content": …}` as v3 writes it: JSON kept as JSON, other text quoted.
MISTRAL = r"""
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
{%- set reply = message['content'] | trim -%}
{{- ('' if reply.startswith('[TOOL_CALLS]') else ' ') + reply + eos_token -}}
{%- elif message['role'] == 'tool' -%}
{%- set result = message['content'] | trim -%}
{%- set result = result if result[:1] in ['{', '['] else result | tojson -%}
{{- '[TOOL_RESULTS] {"content": ' + result + '}[/TOOL_RESULTS]' -}}
{%- else -%}
{{- '[INST] ' + (system_prefix if loop.first else '') + message['content'] + '[/INST]' -}}
{%- endif -%}
{%- endfor -%}
"""
