"""Jinja shared by several built-ins: the labelled tool result of the families with no tool role."""

from __future__ import annotations

# Prepended to the sources of the families without a tool role: the label makes a tool's
# output distinguishable from something the user typed.
TOOL_TEXT = r"""
{%- macro tool_text(message) -%}
{{- 'Tool result' + (' from ' + message['name'] if message['name'] is defined else '') + ':\n' -}}
{{- message['content'] | trim -}}
{%- endmacro -%}
"""
