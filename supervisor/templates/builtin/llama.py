"""Meta's formats: Llama 3.1 (also 3.2 and 3.3) and Llama 2."""

from __future__ import annotations

# Llama 3.1's template: a system turn that always carries the knowledge and today's dates
# (`date_string`, "26 Jul 2024" unless given, so the prompt does not change with the clock);
# with tools, "Environment: ipython" there and the JSON function list in the first user
# turn (its default `tools_in_user_message`). A tool result goes in the `ipython` role as
# JSON, so a string result is quoted, as the official template renders it.
LLAMA3 = r"""
{%- macro turn(message) -%}
{%- if message['role'] == 'tool' -%}
{{- '<|start_header_id|>ipython<|end_header_id|>\n\n' + message['content'] | tojson + '<|eot_id|>' -}}
{%- else -%}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim -}}
{{- '<|eot_id|>' -}}
{%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system = messages[0]['content'] | trim -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set system = '' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' + ('Environment: ipython\n' if tools else '') -}}
{{- 'Cutting Knowledge Date: December 2023\nToday Date: ' -}}
{{- (date_string if date_string is defined else '26 Jul 2024') + '\n\n' + system + '<|eot_id|>' -}}
{%- for message in loop_messages -%}
{%- if tools and loop.first -%}
{{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
{{- 'Given the following functions, please respond with a JSON for a function call with its proper '
    'arguments that best answers the given prompt.\n\n'
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
    'value}.Do not use variables.\n\n' -}}
{%- for tool in tools -%}
{{- tool | tojson(indent=4) + '\n\n' -}}
{%- endfor -%}
{%- if message['role'] == 'user' -%}
{{- message['content'] | trim + '<|eot_id|>' -}}
{%- else -%}
{{- '<|eot_id|>' + turn(message) -}}
{%- endif -%}
{%- else -%}
{{- turn(message) -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%}
"""

# Llama 2 has no turn for anything but user and assistant, so consecutive
# user-side messages (a tool result, then the user) share one [INST] block.
LLAMA2 = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system_prefix = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set system_prefix = '' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
{%- if message['role'] == 'assistant' -%}
{{- ' ' + message['content'] | trim + ' ' + eos_token -}}
{%- else -%}
{%- set text = tool_text(message) if message['role'] == 'tool' else message['content'] -%}
{%- if loop.previtem is defined and loop.previtem['role'] != 'assistant' -%}
{{- '\n\n' + text | trim -}}
{%- else -%}
{{- bos_token + '[INST] ' + ((system_prefix if loop.first else '') + text) | trim -}}
{%- endif -%}
{%- if loop.nextitem is not defined or loop.nextitem['role'] == 'assistant' -%}
{{- ' [/INST]' -}}
{%- endif -%}
{%- endif -%}
{%- endfor -%}
"""
