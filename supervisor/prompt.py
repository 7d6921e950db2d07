"""Turning a conversation into the prompt text a model expects.

Owns the chat message type the harness builds conversations from, the built-in
chat templates, the choice between a model's own template and a built-in, and
rendering. Every template, built-in or read from a GGUF, is Jinja source run in
a sandbox: a GGUF's `tokenizer.chat_template` is untrusted input, so one that
reaches for Python internals raises TemplateError instead of running.

The Jinja environment matches what Hugging Face `apply_chat_template` provides
(trim_blocks, lstrip_blocks, loopcontrols, `raise_exception`, `strftime_now`,
a `tojson` that does not HTML-escape), so a model's template renders here as it
does in transformers.

Adding a built-in is adding a `BuiltinTemplate` member and its source in
`_BUILTIN_SOURCES` (and an architecture in `_ARCHITECTURE_DEFAULTS` if it is the
natural default for one). This module must not tokenize or talk to workers.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import msgspec
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from bastion.protocol.sessions import ChatRole
from bastion.protocol.worker_wire import ModelDescription
from bastion.supervisor.errors import TemplateError


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: ChatRole
    content: str
    tool_name: str = ""  # for TOOL messages: which tool produced this result


class BuiltinTemplate(enum.Enum):
    CHATML = "chatml"
    GEMMA = "gemma"


class TemplateOrigin(enum.Enum):
    OVERRIDE = "override"  # the model's registry entry (or the user) named a built-in
    GGUF = "gguf"  # the model's own tokenizer.chat_template
    BUILTIN = "builtin"  # the GGUF has none; picked from the architecture


class TemplateChoice(msgspec.Struct, frozen=True, kw_only=True):
    origin: TemplateOrigin
    builtin: BuiltinTemplate | None = None  # None only for GGUF
    reason: str = ""

    def __str__(self) -> str:
        label = self.origin.value if self.builtin is None else f"{self.origin.value}:{self.builtin.value}"
        return f"{label} ({self.reason})" if self.reason else label


_CHATML = """\
{%- for message in messages -%}
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ '<|im_start|>assistant\n' }}
{%- endif -%}
"""

# Gemma's own template, except that tool results become user turns (Gemma has
# no tool role) and the user/model alternation is not enforced: an agent's
# transcript may hold a tool result right after a user turn.
_GEMMA = """\
{{ bos_token }}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set first_user_prefix = '' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}
{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}
{{- message['content'] | trim }}
{{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ '<start_of_turn>model\n' }}
{%- endif -%}
"""

_BUILTIN_SOURCES: dict[BuiltinTemplate, str] = {
    BuiltinTemplate.CHATML: _CHATML,
    BuiltinTemplate.GEMMA: _GEMMA,
}

# general.architecture values whose models ship without a template often
# enough that the right built-in matters; anything else falls back to ChatML.
_ARCHITECTURE_DEFAULTS: dict[str, BuiltinTemplate] = {
    "gemma": BuiltinTemplate.GEMMA,
    "gemma2": BuiltinTemplate.GEMMA,
    "gemma3": BuiltinTemplate.GEMMA,
    "gemma3n": BuiltinTemplate.GEMMA,
}
_FALLBACK = BuiltinTemplate.CHATML


class _TemplateRaised(Exception):
    """A template called raise_exception(): the conversation, not the template, is at fault."""


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """A sandbox where touching an unsafe attribute fails at once.

    Jinja's sandbox hands back an Undefined for `''.__class__` that only raises
    when used further, and renders as an empty string when printed; a template
    that probes for internals should fail loudly rather than half-succeed."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


def _raise_exception(message: str) -> NoReturn:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # transformers' tojson: plain json.dumps, no HTML escaping (prompts are not HTML).
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _environment() -> jinja2.Environment:
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class PromptFormatter:
    """Renders conversations for one model with the template chosen for it."""

    def __init__(self, template_source: str, choice: TemplateChoice, bos_token: str, eos_token: str) -> None:
        self.choice = choice
        self._bos_token = bos_token
        self._eos_token = eos_token
        try:
            self._template = _environment().from_string(template_source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(
                f"chat template ({choice}) does not parse: line {exc.lineno}: {exc.message}"
            ) from exc

    @classmethod
    def for_model(
        cls, description: ModelDescription, override: BuiltinTemplate | str | None = None
    ) -> PromptFormatter:
        """The override if given, else the GGUF's own template, else a built-in for the architecture."""
        choice = choose_template(description, override)
        source = description.chat_template if choice.builtin is None else _BUILTIN_SOURCES[choice.builtin]
        return cls(source, choice, description.bos_token, description.eos_token)

    @property
    def source(self) -> str:
        """Which template renders, and why: `gguf`, `override:chatml`, `builtin:gemma (...)`."""
        return str(self.choice)

    def render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
        context = {
            "messages": [{"role": m.role.value, "content": m.content} for m in messages],
            "bos_token": self._bos_token,
            "eos_token": self._eos_token,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._template.render(context)
        except _TemplateRaised as exc:
            raise TemplateError(f"chat template ({self.source}) rejected the conversation: {exc}") from exc
        except SecurityError as exc:
            raise TemplateError(
                f"chat template ({self.source}) tried to reach outside its sandbox and was stopped: {exc}"
            ) from exc
        # The template is untrusted code: whatever else it raises is its own failure.
        except Exception as exc:
            raise TemplateError(f"chat template ({self.source}) failed: {type(exc).__name__}: {exc}") from exc


def choose_template(
    description: ModelDescription, override: BuiltinTemplate | str | None
) -> TemplateChoice:
    if override is not None:
        return TemplateChoice(origin=TemplateOrigin.OVERRIDE, builtin=_builtin(override))
    if description.chat_template.strip():
        return TemplateChoice(origin=TemplateOrigin.GGUF)
    arch = description.architecture
    if arch in _ARCHITECTURE_DEFAULTS:
        return TemplateChoice(
            origin=TemplateOrigin.BUILTIN,
            builtin=_ARCHITECTURE_DEFAULTS[arch],
            reason=f"architecture {arch}, no template in GGUF",
        )
    return TemplateChoice(
        origin=TemplateOrigin.BUILTIN,
        builtin=_FALLBACK,
        reason=f"no template in GGUF, no built-in for architecture {arch or 'unknown'}",
    )


def _builtin(name: BuiltinTemplate | str) -> BuiltinTemplate:
    if isinstance(name, BuiltinTemplate):
        return name
    try:
        return BuiltinTemplate(name)
    except ValueError:
        known = ", ".join(t.value for t in BuiltinTemplate)
        raise TemplateError(f"no built-in chat template named {name!r}; known: {known}") from None
