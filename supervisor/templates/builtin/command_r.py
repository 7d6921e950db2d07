"""Cohere's Command-R (and Aya) turns."""

from __future__ import annotations

# Tool results as in its tool-use template: a system turn wrapped in <results>.
COMMAND_R = r"""
{{- bos_token -}}
{%- set tokens = {'system': '<|SYSTEM_TOKEN|>', 'user': '<|USER_TOKEN|>',
                  'assistant': '<|CHATBOT_TOKEN|>'} -%}
{%- for message in messages -%}
{%- if message['role'] == 'tool' -%}
{{- '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|><results>\n' + message['content'] | trim -}}
{{- '</results><|END_OF_TURN_TOKEN|>' -}}
{%- elif message['role'] == 'system' and loop.first -%}
{{- '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' + message['content'] + '<|END_OF_TURN_TOKEN|>' -}}
{%- else -%}
{{- '<|START_OF_TURN_TOKEN|>' + tokens[message['role']] -}}
{{- message['content'] | trim + '<|END_OF_TURN_TOKEN|>' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' -}}
{%- endif -%}
"""
