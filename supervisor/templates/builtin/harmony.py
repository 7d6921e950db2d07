"""OpenAI's harmony format (gpt-oss): a system message, a developer message, channels.

The system message names the model, the knowledge cutoff, today's date and the
reasoning effort (`reasoning_effort`, medium unless given); the conversation's
system prompt becomes the developer message's `# Instructions`, and tools its
`# Tools`, as TypeScript-like declarations in `namespace functions`.

An assistant turn is either plain text, the final answer, written on the `final`
channel; or, when it holds `<|channel|>`, harmony the model wrote itself after
`<|start|>assistant` (an analysis message, a `to=functions.NAME` call, a final
message), which is kept as written but for a closing <|return|>, written <|end|>
as a past final message is. A tool result speaks as `functions.NAME`.
"""

from __future__ import annotations

# A JSON schema as a TypeScript type: the shapes tools' parameters use.
_TYPES = r"""
{%- macro ts_type(spec) -%}
{%- set kind = spec['type'] if spec['type'] is defined else none -%}
{%- if kind == 'array' -%}
{%- set item = spec['items']['type'] if spec['items'] is defined and spec['items']['type'] is defined
    else none -%}
{{- {'string': 'string[]', 'number': 'number[]', 'integer': 'number[]', 'boolean': 'boolean[]'}.get(item,
    'any[]') + (' | null' if spec['nullable'] else '') -}}
{%- elif kind is iterable and kind is not string and kind is not none -%}
{{- kind | join(' | ') -}}
{%- elif kind == 'string' and spec['enum'] -%}
{{- '"' + spec['enum'] | join('" | "') + '"' -}}
{%- elif kind == 'string' -%}
{{- 'string' + (' | null' if spec['nullable'] else '') -}}
{%- elif kind in ['number', 'integer'] -%}
{{- 'number' -}}
{%- elif kind == 'boolean' -%}
{{- 'boolean' -}}
{%- elif kind == 'object' -%}
{{- 'object' -}}
{%- else -%}
{{- 'any' -}}
{%- endif -%}
{%- endmacro -%}
{%- macro declaration(function) -%}
{%- if function['description'] -%}
{{- '// ' + function['description'] + '\n' -}}
{%- endif -%}
{{- 'type ' + function['name'] + ' = ' -}}
{%- set parameters = function['parameters'] if function['parameters'] is defined else {} -%}
{%- if parameters and parameters['properties'] -%}
{{- '(_: {\n' -}}
{%- for name, spec in parameters['properties'].items() -%}
{%- if spec['description'] -%}
{{- '// ' + spec['description'] + '\n' -}}
{%- endif -%}
{{- name + ('' if name in (parameters['required'] or []) else '?') + ': ' + ts_type(spec) -}}
{%- if spec['default'] is defined -%}
{{- ', // default: ' + (spec['default'] | string if spec['enum'] else spec['default'] | tojson) -}}
{%- endif -%}
{{- ',\n' -}}
{%- endfor -%}
{{- '}) => any;\n\n' -}}
{%- else -%}
{{- '() => any;\n\n' -}}
{%- endif -%}
{%- endmacro -%}
"""

GPT_OSS = _TYPES + r"""
{{- '<|start|>system<|message|>' -}}
{{- (model_identity if model_identity is defined
     else 'You are ChatGPT, a large language model trained by OpenAI.') + '\n' -}}
{{- 'Knowledge cutoff: 2024-06\nCurrent date: ' + strftime_now('%Y-%m-%d') + '\n\n' -}}
{{- 'Reasoning: ' + (reasoning_effort if reasoning_effort is defined else 'medium') + '\n\n' -}}
{{- '# Valid channels: analysis, commentary, final. Channel must be included for every message.' -}}
{%- if tools -%}
{{- "\nCalls to these tools must go to the commentary channel: 'functions'." -}}
{%- endif -%}
{{- '<|end|>' -}}
{%- if messages and messages[0]['role'] in ['system', 'developer'] -%}
{%- set instructions = messages[0]['content'] -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set instructions = '' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- if instructions or tools -%}
{{- '<|start|>developer<|message|>' -}}
{%- if instructions -%}
{{- '# Instructions\n\n' + instructions + '\n\n' -}}
{%- endif -%}
{%- if tools -%}
{{- '# Tools\n\n## functions\n\nnamespace functions {\n\n' -}}
{%- for tool in tools -%}
{{- declaration(tool['function']) -}}
{%- endfor -%}
{{- '} // namespace functions' -}}
{%- endif -%}
{{- '<|end|>' -}}
{%- endif -%}
{%- for message in loop_messages -%}
{%- if message['role'] == 'assistant' and '<|channel|>' in message['content'] -%}
{%- set raw = message['content'] -%}
{%- set raw = raw[:-10] + '<|end|>' if raw.endswith('<|return|>') else raw -%}
{{- '<|start|>assistant' + raw -}}
{%- elif message['role'] == 'assistant' and loop.last and not add_generation_prompt -%}
{%- if message['reasoning_content'] is defined -%}
{{- '<|start|>assistant<|channel|>analysis<|message|>' + message['reasoning_content'] + '<|end|>' -}}
{%- endif -%}
{{- '<|start|>assistant<|channel|>final<|message|>' + message['content'] + '<|return|>' -}}
{%- elif message['role'] == 'assistant' -%}
{{- '<|start|>assistant<|channel|>final<|message|>' + message['content'] + '<|end|>' -}}
{%- elif message['role'] == 'tool' -%}
{{- '<|start|>functions' + ('.' + message['name'] if message['name'] is defined else '') -}}
{{- ' to=assistant<|channel|>commentary<|message|>' + message['content'] | tojson + '<|end|>' -}}
{%- else -%}
{{- '<|start|>' + message['role'] + '<|message|>' + message['content'] + '<|end|>' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|start|>assistant' -}}
{%- endif -%}
"""
