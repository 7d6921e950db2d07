"""DeepSeek's formats: V3 (and V2.5) and the R1 reasoning models, R1's distills included.

Both put the system prompt bare after BOS; consecutive tool results share one
outputs block, and the reply after them has no Assistant token.
"""

from __future__ import annotations

_BODY = r"""
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
{%- if message['role'] == 'assistant' and ns.in_outputs -%}
{{- message['content'] + '<｜end▁of▁sentence｜>' -}}
{%- elif message['role'] == 'assistant' -%}
{{- '<｜Assistant｜>' + reply(message['content']) + '<｜end▁of▁sentence｜>' -}}
{%- else -%}
{{- '<｜User｜>' + message['content'] -}}
{%- endif -%}
{%- set ns.in_outputs = false -%}
{%- endif -%}
{%- endfor -%}
{%- if ns.in_outputs -%}
{{- '<｜tool▁outputs▁end｜>' -}}
{%- elif add_generation_prompt -%}
{{- '<｜Assistant｜>' + generation_prefix -}}
{%- endif -%}
"""

DEEPSEEK = r"""
{%- macro reply(content) -%}{{- content -}}{%- endmacro -%}
{%- set generation_prefix = '' -%}
""" + _BODY

# R1: the model is prompted straight into its reasoning, and an earlier reply keeps only
# what follows its </think>; a reply after tool outputs is kept whole, as R1's own does.
DEEPSEEK_R1 = r"""
{%- macro reply(content) -%}{{- content.split('</think>')[-1] -}}{%- endmacro -%}
{%- set generation_prefix = '<think>\n' -%}
""" + _BODY
