"""Turning a conversation into the prompt text a model expects.

Owns the chat message type the harness builds conversations from, the choice
between a model's own template and a built-in (`builtin/` holds
those and the evidence for each), rendering, and the fallback when a model's
own template refuses a conversation. Every template, built-in or read from a
GGUF, is Jinja source run in a sandbox: a GGUF's `tokenizer.chat_template` is
untrusted input, so one that reaches for Python internals raises TemplateError
instead of running, and is never replaced by a built-in.

The Jinja environment matches what Hugging Face `apply_chat_template` provides
(trim_blocks, lstrip_blocks, loopcontrols, `raise_exception`, `strftime_now`,
a `tojson` that does not HTML-escape, `tools` always defined), so a model's
template renders here as it does in transformers.

The choice, in order (`TemplateChoice`, shown as `PromptFormatter.source`):

    override           a built-in named by the registry entry or --template
    gguf               the GGUF's own template; its family (ChatML, Llama 3, ...)
                       is read from its text, for the fallback below
    builtin            the GGUF has none (or one that does not parse, when its
                       family is known): from its general.name, then its
                       architecture, else ChatML

When the GGUF's own template raises while rendering (a `raise_exception` over
role alternation or a `tool` role, or any other error) and its family is
known, the family's built-in renders instead and `Rendered.fallback` says so.
This module must not tokenize or talk to workers.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.meta
import msgspec
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from bastion.protocol.sessions import ChatRole
from bastion.protocol.worker_wire import ModelDescription
from bastion.supervisor.errors import TemplateError
from bastion.supervisor.templates.builtin import (
    BUILTIN_SOURCES,
    BuiltinTemplate,
    builtin_for_model,
    template_family,
)

__all__ = [
    "BuiltinTemplate",
    "ChatMessage",
    "ChatRole",
    "FallbackCause",
    "PromptFormatter",
    "Rendered",
    "TemplateChoice",
    "TemplateFallback",
    "TemplateOrigin",
    "choose_template",
    "is_prefix_stable",
]

log = logging.getLogger(__name__)


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: ChatRole
    content: str
    tool_name: str = ""  # for TOOL messages: which tool produced this result
    # An assistant turn's reasoning, kept apart from its content; templates see it as
    # `reasoning_content` (Hugging Face's name) and keep or drop it as the model's own does.
    reasoning: str = ""


class TemplateOrigin(enum.Enum):
    OVERRIDE = "override"  # the model's registry entry (or the user) named a built-in
    GGUF = "gguf"  # the model's own tokenizer.chat_template
    BUILTIN = "builtin"  # the GGUF has none usable; picked from its name and architecture
    SERVER = "server"  # a remote model in chat mode: its server applies its own template (see for_remote_chat)


class TemplateChoice(msgspec.Struct, frozen=True, kw_only=True):
    origin: TemplateOrigin
    builtin: BuiltinTemplate | None = None  # None only for GGUF
    family: BuiltinTemplate | None = None  # the format written; for GGUF, None when not recognised
    reason: str = ""

    def __str__(self) -> str:
        label = self.origin.value if self.builtin is None else f"{self.origin.value}:{self.builtin.value}"
        return f"{label} ({self.reason})" if self.reason else label


class FallbackCause(enum.Enum):
    REJECTED = "rejected"  # the template called raise_exception() on this conversation
    FAILED = "failed"  # the template raised an error of its own


class TemplateFallback(msgspec.Struct, frozen=True, kw_only=True):
    """The GGUF's own template could not render a conversation; a built-in did."""

    builtin: BuiltinTemplate
    cause: FallbackCause
    detail: str  # the template's own message

    def __str__(self) -> str:
        what = "rejected the conversation" if self.cause is FallbackCause.REJECTED else "failed"
        return (
            f"the model's own chat template {what} ({self.detail}); "
            f"rendered with the built-in {self.builtin.value} template instead"
        )


class Rendered(msgspec.Struct, frozen=True, kw_only=True):
    text: str
    tools_advertised: bool = False  # tools were given and the template that rendered took them
    fallback: TemplateFallback | None = None


class _TemplateRaised(Exception):
    """A template called raise_exception(): the conversation, not the template, is at fault."""


class _RenderFailed(Exception):
    """A template could not render; whether a built-in may stand in is the caller's call."""

    def __init__(self, cause: FallbackCause, detail: str) -> None:
        super().__init__(detail)
        self.cause = cause
        self.detail = detail


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


class _Template:
    """One parsed template and whether it reads `tools`."""

    def __init__(self, source: str, label: str) -> None:
        env = _environment()
        try:
            self._template = env.from_string(source)
            self.supports_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(
                f"chat template ({label}) does not parse: line {exc.lineno}: {exc.message}"
            ) from exc
        self._label = label

    def render(self, context: Mapping[str, Any]) -> str:
        try:
            return self._template.render(context)
        except _TemplateRaised as exc:
            raise _RenderFailed(FallbackCause.REJECTED, str(exc)) from exc
        except SecurityError as exc:
            raise TemplateError(
                f"chat template ({self._label}) tried to reach outside its sandbox and was stopped: {exc}"
            ) from exc
        # The template is untrusted code: whatever else it raises is its own failure.
        except Exception as exc:
            raise _RenderFailed(FallbackCause.FAILED, f"{type(exc).__name__}: {exc}") from exc


class PromptFormatter:
    """Renders conversations for one model with the template chosen for it."""

    def __init__(self, template_source: str, choice: TemplateChoice, bos_token: str, eos_token: str) -> None:
        self.choice = choice
        self._bos_token = bos_token
        self._eos_token = eos_token
        self._template = _Template(template_source, str(choice))
        self.template_text = template_source  # the Jinja source that renders (read for its markers)
        # Only a model's own template is stood in for; a built-in that fails is a bug to surface.
        stand_in = choice.family if choice.origin is TemplateOrigin.GGUF else None
        self._fallback = (
            None if stand_in is None else (stand_in, _Template(BUILTIN_SOURCES[stand_in], stand_in.value))
        )
        self._logged: set[str] = set()

    @classmethod
    def for_model(
        cls, description: ModelDescription, override: BuiltinTemplate | str | None = None
    ) -> PromptFormatter:
        """The override if given, else the GGUF's own template, else a built-in for the model."""
        choice = choose_template(description, override)
        if choice.builtin is None:
            try:
                return cls(description.chat_template, choice, description.bos_token, description.eos_token)
            except TemplateError as exc:
                if choice.family is None:
                    raise
                log.warning("%s; using the built-in %s template", exc, choice.family.value)
                choice = TemplateChoice(
                    origin=TemplateOrigin.BUILTIN, builtin=choice.family, family=choice.family,
                    reason=f"the GGUF's template does not parse, {choice.family.value} family",
                )  # fmt: skip
        assert choice.builtin is not None
        return cls(BUILTIN_SOURCES[choice.builtin], choice, description.bos_token, description.eos_token)

    @classmethod
    def for_remote_chat(cls) -> PromptFormatter:
        """For a remote model in chat mode: the "prompt" is the conversation itself, as JSON
        (`{"messages": [...], "tools": [...]}`), which the model's worker sends as messages; the
        server formats it. Budgets count that text (a little more than the server will), and
        `--show-prompt` shows what is sent."""
        choice = TemplateChoice(origin=TemplateOrigin.SERVER, reason="bastion sends the messages; the server formats "
                                                                     "them with its own template")  # fmt: skip
        return cls(REMOTE_CHAT_SOURCE, choice, "", "")

    @property
    def source(self) -> str:
        """Which template renders, and why: `gguf (chatml family)`, `override:llama3`, `builtin:gemma (…)`."""
        return str(self.choice)

    @property
    def family(self) -> BuiltinTemplate | None:
        """The prompt format written, None for a GGUF template of no known family."""
        return self.choice.family

    @property
    def departures(self) -> tuple[str, ...]:
        """Where the built-in that renders deliberately differs from its family's official template
        (one line each, for `--show-prompt`); empty for a model's own template."""
        return () if self.choice.builtin is None else self.choice.builtin.departures

    @property
    def supports_tools(self) -> bool:
        """Whether the template lists `tools` itself; if not, the caller describes them in the system turn."""
        return self._template.supports_tools

    def render(
        self,
        messages: Sequence[ChatMessage],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """The prompt text alone. A fallback is only logged (at INFO, once per formatter and
        message): context planning renders fragments that may trip a strict template without the
        real prompt doing so; report the real prompt's fallback from `render_detailed`."""
        rendered = self.render_detailed(messages, tools=tools, add_generation_prompt=add_generation_prompt)
        if rendered.fallback is not None and rendered.fallback.detail not in self._logged:
            self._logged.add(rendered.fallback.detail)
            log.info("%s: %s", self.source, rendered.fallback)
        return rendered.text

    def render_detailed(
        self,
        messages: Sequence[ChatMessage],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> Rendered:
        """The prompt, whether `tools` made it in, and whether a built-in had to stand in.

        `tools` are OpenAI-style function specs
        (`{"type": "function", "function": {"name", "description", "parameters"}}`)."""
        context = {
            "messages": [_as_dict(m) for m in messages],
            "tools": list(tools) if tools else None,
            "bos_token": self._bos_token,
            "eos_token": self._eos_token,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            text = self._template.render(context)
        except _RenderFailed as failure:
            if self._fallback is None:
                what = "rejected the conversation" if failure.cause is FallbackCause.REJECTED else "failed"
                raise TemplateError(f"chat template ({self.source}) {what}: {failure.detail}") from failure
            return self._stand_in(context, bool(tools), failure)
        return Rendered(text=text, tools_advertised=bool(tools) and self.supports_tools)

    def _stand_in(self, context: Mapping[str, Any], has_tools: bool, failure: _RenderFailed) -> Rendered:
        assert self._fallback is not None
        builtin, template = self._fallback
        try:
            text = template.render(context)
        except _RenderFailed as again:
            raise TemplateError(
                f"built-in chat template {builtin.value} failed as a fallback: {again.detail}"
            ) from again
        return Rendered(
            text=text,
            tools_advertised=has_tools and template.supports_tools,
            fallback=TemplateFallback(builtin=builtin, cause=failure.cause, detail=failure.detail),
        )


def _as_dict(message: ChatMessage) -> dict[str, str]:
    # Hugging Face's shape: a tool result names its tool under "name", reasoning is `reasoning_content`.
    shaped = {"role": message.role.value, "content": message.content}
    if message.role is ChatRole.TOOL and message.tool_name:
        shaped["name"] = message.tool_name
    if message.reasoning:
        shaped["reasoning_content"] = message.reasoning
    return shaped


# The conversation as the JSON document a chat-mode remote model's worker sends (see for_remote_chat).
REMOTE_CHAT_SOURCE = '{{ {"messages": messages, "tools": tools} | tojson }}'


def choose_template(description: ModelDescription, override: BuiltinTemplate | str | None) -> TemplateChoice:
    if override is not None:
        builtin = _builtin(override)
        return TemplateChoice(origin=TemplateOrigin.OVERRIDE, builtin=builtin, family=builtin)
    if description.chat_template.strip():
        family = template_family(description.chat_template)
        reason = f"{family.value} family" if family else "family not recognised"
        return TemplateChoice(origin=TemplateOrigin.GGUF, family=family, reason=reason)
    match = builtin_for_model(description.architecture, description.gguf_name)
    if match is not None:
        builtin, evidence = match
        return TemplateChoice(
            origin=TemplateOrigin.BUILTIN, builtin=builtin, family=builtin,
            reason=f"{evidence}, no template in GGUF",
        )  # fmt: skip
    architecture = description.architecture or "unknown"
    named = f', name "{description.gguf_name}"' if description.gguf_name else ""
    return TemplateChoice(
        origin=TemplateOrigin.BUILTIN, builtin=BuiltinTemplate.CHATML, family=BuiltinTemplate.CHATML,
        reason=f"no template in GGUF, no built-in for architecture {architecture}{named}",
    )  # fmt: skip


def _builtin(name: BuiltinTemplate | str) -> BuiltinTemplate:
    if isinstance(name, BuiltinTemplate):
        return name
    try:
        return BuiltinTemplate(name)
    except ValueError:
        known = ", ".join(t.value for t in BuiltinTemplate)
        raise TemplateError(f"no built-in chat template named {name!r}; known: {known}") from None


def is_prefix_stable(
    formatter: PromptFormatter,
    messages: Sequence[ChatMessage],
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> bool:
    """Whether every prompt the model answered stays a prefix of what follows.

    For each assistant reply at k, the prompt it was generated from
    (messages[:k] with a generation prompt) must begin every later rendering
    (messages[:n] for n > k, with and without a generation prompt): the
    worker's KV cache then reuses all of it on the next turn."""
    for k, message in enumerate(messages):
        if message.role is not ChatRole.ASSISTANT:
            continue
        asked = formatter.render(messages[:k], tools=tools)
        for n in range(k + 1, len(messages) + 1):
            for add_generation_prompt in (False, True):
                later = formatter.render(
                    messages[:n], tools=tools, add_generation_prompt=add_generation_prompt
                )
                if not later.startswith(asked):
                    return False
    return True
