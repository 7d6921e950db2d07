"""IBM Granite 3.x (`<|start_of_role|>…<|end_of_role|>…<|end_of_text|>`), after Granite 3.3's template."""

from __future__ import annotations

# Without a system message the official default stands in, with today's date as the
# official template writes it; tools are listed, indented JSON, in an `available_tools` turn.
GRANITE = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system = messages[0]['content'] -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set system = "Knowledge Cutoff Date: April 2024. Today's Date: " + strftime_now('%B %d, %Y')
    + '. You are Granite, developed by IBM.' -%}
{%- if tools -%}
{%- set system = system + " You are a helpful assistant with access to the following tools. When a tool "
    "is required to answer the user's query, respond only with <|tool_call|> followed by a JSON list of "
    "tools used. If a tool does not exist in the provided list of tools, notify the user that you do not "
    "have the ability to fulfill the request." -%}
{%- else -%}
{%- set system = system + ' You are a helpful AI assistant.' -%}
{%- endif -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{{- '<|start_of_role|>system<|end_of_role|>' + system + '<|end_of_text|>\n' -}}
{%- if tools -%}
{{- '<|start_of_role|>available_tools<|end_of_role|>' + tools | tojson(indent=4) + '<|end_of_text|>\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt and loop_messages -%}
{{- '<|start_of_role|>assistant<|end_of_role|>' -}}
{%- endif -%}
"""
