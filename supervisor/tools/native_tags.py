"""Calls between a model family's own opening and closing tags.

Owns the readers of tag-delimited call regions and the markers that start them:
    <tool_call>...</tool_call>            Hermes, Qwen 2.5/3 (JSON); Qwen3-Coder, GLM (XML inside)
    <seed:tool_call>...                   Seed-OSS (XML inside)
    <minimax:tool_call>...                MiniMax M2 (<invoke> inside)
    <|python_tag|>...<|eom_id|>           Llama 3.1 (JSON, `name.call(a=1)`, or raw code for the python tool)
    <|python_start|>...<|python_end|>     Llama 4 (pythonic list, or JSON)
    <|tool_call|>[...]<|/tool_call|>      Granite 3, Phi-4-mini
    <|START_ACTION|>[...]<|END_ACTION|>   Command R7B
    <|tools_prefix|>[...]<|tools_suffix|> Apertus ({"NAME": {args}})
    functools[...]                        Phi-4-mini, Firefunction v2
    <function_call>, <functioncall>       Hermes variants, Glaive
    <tool_calls>, <TOOLCALL>, <|tool_call_start|>   Jamba/Apriel, Nemotron, LFM2
A region ends at its closing tag, read past any JSON so a tag quoted in an
argument is not taken for it; or where the next call of the same kind starts;
or, with neither, where its JSON ends (what follows is prose) or the reply ends.
Everything between the tags is a call or Trouble naming the format.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from bastion.protocol.agent_events import CallFormat
from bastion.supervisor.tools.call_regions import ReadContext, Reader, Region
from bastion.supervisor.tools.call_shapes import (
    Finding,
    Found,
    Shape,
    Trouble,
    json_calls,
    pythonic_calls,
    shape_of,
    single_key_shape,
    unfence,
)
from bastion.supervisor.tools.near_json import decode_values, past_json
from bastion.supervisor.tools.tool_index import ToolIndex
from bastion.supervisor.tools.xml_calls import (
    QWEN3_CODER,
    function_blocks,
    glm_call,
    looks_like_glm,
    minimax_calls,
)

BodyReader = Callable[["_Tag", str, str, ToolIndex, bool], list[Finding]]


@dataclass(frozen=True)
class _Tag:
    fmt: CallFormat
    what: str  # how a problem names it
    closers: tuple[str, ...]  # end the body and belong to the region
    stops: tuple[str, ...]  # end the body without belonging to it: the next call's marker
    body: BodyReader


def _json_body(tag: _Tag, body: str, raw: str, tools: ToolIndex, closed: bool) -> list[Finding]:
    return json_calls(body, tag.fmt, tag.what, raw)


def _apertus_body(tag: _Tag, body: str, raw: str, tools: ToolIndex, closed: bool) -> list[Finding]:
    return json_calls(
        body, tag.fmt, tag.what, raw, read=lambda value: shape_of(value) or single_key_shape(value)
    )


def _tool_call_body(tag: _Tag, body: str, raw: str, tools: ToolIndex, closed: bool) -> list[Finding]:
    """<tool_call> holds JSON (Hermes, Qwen), <function=...> blocks (Qwen3-Coder) or NAME<arg_key>...
    (GLM); <seed:tool_call> holds Seed-OSS's <function=...> blocks."""
    stripped = unfence(body)
    what = QWEN3_CODER if tag.fmt is CallFormat.TAGGED else tag.what
    if stripped.startswith("<function"):
        return function_blocks(stripped, raw, tools, closed=closed, what=what)
    if stripped.startswith(("{", "[")):
        return json_calls(body, tag.fmt, tag.what, raw)
    if stripped.startswith("<parameter"):
        reason = "its <parameter> blocks are not inside a <function=NAME>"
        return [Trouble(CallFormat.QWEN3_CODER, what, reason, raw)]
    if looks_like_glm(stripped) or "<arg_key>" in stripped:
        return [glm_call(stripped, raw, tools, closed=closed)]
    return json_calls(body, tag.fmt, tag.what, raw)


def _minimax_body(tag: _Tag, body: str, raw: str, tools: ToolIndex, closed: bool) -> list[Finding]:
    return minimax_calls(body, raw, tools, closed=closed)


def _python_body(tag: _Tag, body: str, raw: str, tools: ToolIndex, closed: bool) -> list[Finding]:
    """JSON, or calls written like Python; after <|python_tag|>, raw code goes to the python tool."""
    text = unfence(body)
    decoded = decode_values(text)
    if not isinstance(decoded, str):
        return json_calls(text, tag.fmt, tag.what, raw)
    shapes = pythonic_calls(text, tools.positional_names)
    if shapes is not None:
        return [Found(shape, tag.fmt, raw) for shape in shapes]
    code_tool = tools.code_parameter() if tag.fmt is CallFormat.PYTHON_TAG and text else None
    if code_tool is not None:
        # Llama 3.1's code interpreter and Functionary v3.1 write the code itself after the tag.
        return [Found(Shape(code_tool[0], {code_tool[1]: text}), tag.fmt, raw)]
    return [Trouble(tag.fmt, tag.what, f"it is neither JSON nor a Python-style call ({decoded})", raw)]


def _tags(*entries: tuple[str, CallFormat, str, tuple[str, ...], BodyReader]) -> dict[str, _Tag]:
    """Marker -> tag; a region also ends where the next call of its kind starts: at its own marker."""
    return {marker: _Tag(fmt, what, closers, (_NEXT_CALL.get(marker, marker),), body)
            for marker, fmt, what, closers, body in entries}  # fmt: skip


_NEXT_CALL = {"functools": "functools["}  # the word alone is too common to end a region
_TAGS = _tags(
    ("<tool_call>", CallFormat.TAGGED, "a Hermes/Qwen <tool_call> call", ("</tool_call>",), _tool_call_body),
    ("<seed:tool_call>", CallFormat.QWEN3_CODER, "a Seed-OSS <seed:tool_call> call", ("</seed:tool_call>",),
     _tool_call_body),
    ("<minimax:tool_call>", CallFormat.MINIMAX, "a MiniMax <minimax:tool_call> call",
     ("</minimax:tool_call>",), _minimax_body),
    ("<|python_tag|>", CallFormat.PYTHON_TAG, "a Llama 3.1 <|python_tag|> call", ("<|eom_id|>", "<|eot_id|>"),
     _python_body),
    ("<|python_start|>", CallFormat.PYTHON_START, "a Llama 4 <|python_start|> call", ("<|python_end|>",),
     _python_body),
    ("<|tool_call|>", CallFormat.GRANITE, "a Granite/Phi-4-mini <|tool_call|> call",
     ("<|/tool_call|>", "<|end_of_text|>"), _json_body),
    ("<|START_ACTION|>", CallFormat.COMMAND_R, "a Command R7B <|START_ACTION|> call", ("<|END_ACTION|>",),
     _json_body),
    ("<|tools_prefix|>", CallFormat.APERTUS, "an Apertus <|tools_prefix|> call", ("<|tools_suffix|>",),
     _apertus_body),
    # Its marker is read in native_named.py, which tries NAME[ARGS]{...} first.
    ("[TOOL_CALLS]", CallFormat.MISTRAL, "a Mistral [TOOL_CALLS] call", ("</s>",), _json_body),
    ("functools", CallFormat.FUNCTOOLS, "a Phi-4/Firefunction functools[...] call", (), _json_body),
    ("<function_call>", CallFormat.FUNCTION_CALL_TAG, "a <function_call> call", ("</function_call>",),
     _json_body),
    ("<functioncall>", CallFormat.FUNCTION_CALL_TAG, "a <functioncall> call", ("</functioncall>",),
     _json_body),
    ("<tool_calls>", CallFormat.JSON_TAG, "a Jamba <tool_calls> call", ("</tool_calls>",), _json_body),
    ("<TOOLCALL>", CallFormat.JSON_TAG, "a Nemotron <TOOLCALL> call", ("</TOOLCALL>",), _json_body),
    ("<|tool_call_start|>", CallFormat.JSON_TAG, "an LFM2 <|tool_call_start|> call", ("<|tool_call_end|>",),
     _python_body),
)  # fmt: skip


def read_tag(text: str, marker: re.Match[str], ctx: ReadContext) -> Region:
    tag = _TAGS[marker.group()]
    start = marker.end()
    after_json = past_json(text, start)
    body_end, which = ctx.first((*tag.closers, *tag.stops), after_json)
    if not which and after_json > start and text[after_json:].strip():
        body_end = after_json  # no closing tag: what follows the JSON is prose
    end = body_end + (len(which) if which in tag.closers else 0)
    closed = bool(which)
    raw = text[marker.start() : end]
    findings = tag.body(tag, text[start:body_end], raw, ctx.tools, closed)
    return Region(end, tuple(findings or [Trouble(tag.fmt, tag.what, "it holds no tool call", raw)]))


MARKERS: list[tuple[str, Reader]] = [
    ("|".join(re.escape(token) for token in _TAGS if token not in ("functools", "[TOOL_CALLS]")), read_tag),
    (r"functools(?=\[)", read_tag),
]
