"""Calls whose tool name is written outside the JSON of its arguments.

Owns the readers, and the markers, of:
    [TOOL_CALLS]NAME[ARGS]{json}, NAME[CALL_ID]id[ARGS]{json}, NAME{json}    Mistral (and its JSON list)
    <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json{json}```          DeepSeek R1, V3
    <｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{json}<｜tool▁call▁end｜>            DeepSeek V3.1
    <|tool_call_begin|>functions.NAME:0<|tool_call_argument_begin|>{json}    Kimi K2
    <|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{json}<|call|>   GPT-OSS harmony
    >>>NAME\\n{json}, and a first segment with no >>>                         Functionary v3.2
    <function=NAME>...</function>, <function name="NAME">                   Functionary v3.1, Qwen3-Coder
and the special tokens around them that are neither prose nor call
(<｜tool▁calls▁end｜>, <|tool_calls_section_end|>, <|end|>, ...): dropped.
Every header is looked for within a bounded distance of its marker, and every
body ends at the first of its closers after its JSON, so work stays linear.
"""

from __future__ import annotations

import re

from bastion.protocol.agent_events import CallFormat
from bastion.supervisor.tools.call_regions import ReadContext, Reader, Region
from bastion.supervisor.tools.call_shapes import Finding, Found, Shape, Trouble, arguments_of, named_call
from bastion.supervisor.tools.harmony import MESSAGE, recipient_of
from bastion.supervisor.tools.native_tags import read_tag
from bastion.supervisor.tools.near_json import extract_value, past_json
from bastion.supervisor.tools.xml_calls import FUNCTION_OPEN, QWEN3_CODER, read_function

# How far a header (a tool name, a call id, a harmony header) may run before its separator.
_HEADER_REACH = 300

MISTRAL = "a Mistral [TOOL_CALLS] call"
_MISTRAL_NAMED = re.compile(r"\s*([\w.\-]+)\s*(?:\[CALL_ID\]\s*[\w\-]*\s*)?(?:\[ARGS\]\s*|(?=\{))")


def read_mistral(text: str, marker: re.Match[str], ctx: ReadContext) -> Region:
    """[TOOL_CALLS] then a JSON list (Nemo), or NAME[ARGS]{...} calls (v11+ tokenizers, Ministral 3)."""
    if _MISTRAL_NAMED.match(text, marker.end()) is None:
        return read_tag(text, marker, ctx)
    findings: list[Finding] = []
    pos = marker.end()
    while (named := _MISTRAL_NAMED.match(text, pos)) is not None:
        name, call_start = named.group(1), marker.start() if not findings else pos
        limit = ctx.next("[TOOL_CALLS]", named.end())
        extent = extract_value(text, named.end(), limit if limit >= 0 else None)
        if extent is None:
            end = limit if limit >= 0 else len(text)
            reason = f"the arguments after {name}[ARGS] are not JSON"
            return Region(
                end, (*findings, Trouble(CallFormat.MISTRAL, MISTRAL, reason, text[call_start:end], name))
            )
        value, pos, repaired = extent
        arguments, raw = arguments_of(value), text[call_start:pos]
        if arguments is None:
            reason = f"the arguments after {name}[ARGS] are not a JSON object"
            findings.append(Trouble(CallFormat.MISTRAL, MISTRAL, reason, raw, name))
        else:
            findings.append(Found(Shape(name, arguments[0], repaired=repaired), CallFormat.MISTRAL, raw))
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
    end = pos + (4 if text.startswith("</s>", pos) else 0)
    return Region(end, tuple(findings))


DEEPSEEK = "a DeepSeek <｜tool▁call▁begin｜> call"
_DEEPSEEK_CALL = "<｜tool▁call▁begin｜>"
_DEEPSEEK_SEP = "<｜tool▁sep｜>"
_DEEPSEEK_END = "<｜tool▁call▁end｜>"
_DEEPSEEK_SECTION_END = "<｜tool▁calls▁end｜>"
# The opening of a list of calls, as DeepSeek R1 and its distills write it (llama.cpp accepts these).
_DEEPSEEK_SECTIONS = ("<｜tool▁calls▁begin｜>", "<｜tool_calls_begin｜>", "<｜tool calls begin｜>",
                      "<｜tool\\_calls\\_begin｜>", "<｜tool▁calls｜>")  # fmt: skip


def read_deepseek(text: str, marker: re.Match[str], ctx: ReadContext) -> Region:
    pos = _past_deepseek_opening(text, marker)
    if pos is None:
        return Region(marker.end())  # an opening with no call after it: a stray token
    sep = text.find(_DEEPSEEK_SEP, pos, pos + _HEADER_REACH)
    name, body_start = _deepseek_name(text, pos, sep)
    if name is None:
        end, _ = ctx.first((_DEEPSEEK_END, _DEEPSEEK_CALL), pos)
        end += len(_DEEPSEEK_END) if text.startswith(_DEEPSEEK_END, end) else 0
        reason = f"no tool name and {_DEEPSEEK_SEP} start the call"
        return Region(end, (Trouble(CallFormat.DEEPSEEK, DEEPSEEK, reason, text[marker.start() : end]),))
    return _named_body(
        text, marker.start(), body_start, name, ctx, CallFormat.DEEPSEEK, DEEPSEEK,
        closers=(_DEEPSEEK_END,), stops=(_DEEPSEEK_CALL, _DEEPSEEK_SECTION_END),
    )  # fmt: skip


def _past_deepseek_opening(text: str, marker: re.Match[str]) -> int | None:
    """Where the call's header starts: past the list's opening and the call's own, when both are there."""
    pos = marker.end()
    if marker.group() == _DEEPSEEK_CALL:
        return pos
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if text.startswith(_DEEPSEEK_CALL, pos):
        return pos + len(_DEEPSEEK_CALL)
    # R1 distills also write the list opening straight before `function<｜tool▁sep｜>`.
    return pos if text.find(_DEEPSEEK_SEP, pos, pos + _HEADER_REACH) >= 0 else None


def _deepseek_name(text: str, pos: int, sep: int) -> tuple[str | None, int]:
    """The tool name and where its arguments start: `NAME<｜tool▁sep｜>{...}` (V3.1), or
    `function<｜tool▁sep｜>NAME\\n```json...` (R1, V3)."""
    if sep < 0:
        return None, -1
    head, after = text[pos:sep].strip(), sep + len(_DEEPSEEK_SEP)
    if head != "function":
        return (head or None), after
    line_end = text.find("\n", after, after + _HEADER_REACH)
    name = text[after:line_end].strip() if line_end >= 0 else ""
    return (name or None), line_end + 1


KIMI = "a Kimi K2 <|tool_call_begin|> call"
_KIMI_ARGUMENTS = "<|tool_call_argument_begin|>"
_KIMI_INDEX = re.compile(r":\d+$")


def read_kimi(text: str, marker: re.Match[str], ctx: ReadContext) -> Region:
    arguments = text.find(_KIMI_ARGUMENTS, marker.end(), marker.end() + _HEADER_REACH)
    if arguments < 0:
        end, _ = ctx.first(
            ("<|tool_call_end|>", "<|tool_call_begin|>", "<|tool_calls_section_end|>"), marker.end()
        )
        end += len("<|tool_call_end|>") if text.startswith("<|tool_call_end|>", end) else 0
        reason = f"the call id is not followed by {_KIMI_ARGUMENTS}"
        return Region(end, (Trouble(CallFormat.KIMI, KIMI, reason, text[marker.start() : end]),))
    # functions.get_weather:0, or get_weather:0: the index only numbers the call.
    name = _KIMI_INDEX.sub("", text[marker.end() : arguments].strip())
    return _named_body(
        text,
        marker.start(),
        arguments + len(_KIMI_ARGUMENTS),
        name,
        ctx,
        CallFormat.KIMI,
        KIMI,
        closers=("<|tool_call_end|>",),
        stops=("<|tool_call_begin|>", "<|tool_calls_section_end|>"),
    )


HARMONY = "a GPT-OSS harmony to=functions.NAME call"
_HARMONY_ENDS = ("<|call|>", "<|end|>", "<|return|>")


def read_harmony(text: str, marker: re.Match[str], ctx: ReadContext) -> Region | None:
    """A harmony message header: with a recipient it starts a call; without, it is dropped and the
    message body that follows stays prose (the reasoning splitter has already removed analysis)."""
    start = marker.end()
    message = text.find(MESSAGE, start, start + _HEADER_REACH)
    header_end = message if message >= 0 else min(len(text), start + _HEADER_REACH)
    for token in _HARMONY_ENDS:  # a message that ends before its header does opened nothing
        if 0 <= (found := text.find(token, start, header_end)):
            header_end, message = found, -1
    header = text[marker.start() : header_end]
    recipient = recipient_of(header)
    if recipient is None or (message < 0 and not header.startswith(("<|start|>", "<|channel|>"))):
        return _harmony_without_call(marker, message)
    if message < 0:
        end, _ = ctx.first(("<|start|>", *_HARMONY_ENDS), start)
        reason = f"its header never reaches {MESSAGE}"
        trouble = Trouble(CallFormat.HARMONY, HARMONY, reason, text[marker.start() : end], recipient)
        return Region(end, (trouble,))
    return _named_body(
        text,
        marker.start(),
        message + len(MESSAGE),
        recipient,
        ctx,
        CallFormat.HARMONY,
        HARMONY,
        closers=_HARMONY_ENDS,
        stops=("<|start|>", "<|channel|>"),
    )


def _harmony_without_call(marker: re.Match[str], message: int) -> Region | None:
    """A header that starts no call is dropped, and its body stays prose; a lone harmony token is
    dropped; a reply merely starting with "to=" was never harmony."""
    if message >= 0:
        return Region(message + len(MESSAGE))
    return Region(marker.end()) if marker.group().startswith("<|") else None


FUNCTIONARY = "a Functionary v3.2 >>>NAME call"
_FUNCTIONARY_HEAD = re.compile(r"([A-Za-z_][\w.\-]*)[ \t]*\r?\n")


def read_functionary(text: str, marker: re.Match[str], ctx: ReadContext) -> Region | None:
    """>>>NAME then JSON (or code, for the python tool); `all` introduces prose. The first segment
    has no >>> (the prompt ends with it), so a reply whose first line is a tool's name counts too."""
    head = _FUNCTIONARY_HEAD.match(text, marker.end())
    if head is None:
        return None
    name, body_start, unmarked = head.group(1), head.end(), not marker.group().startswith(">>>")
    if name == "all":  # what follows is prose; at the start, only when segments follow it
        return None if unmarked and ctx.next(">>>", body_start) < 0 else Region(body_start)
    if unmarked and not ctx.tools.knows(name):
        return None
    after_json = past_json(text, body_start)
    next_segment = ctx.next(">>>", after_json)
    body_end = after_json if after_json > body_start else (next_segment if next_segment >= 0 else len(text))
    finding = _functionary_segment(name, text[body_start:body_end], text[marker.start() : body_end], ctx)
    if finding is None and (unmarked or not ctx.tools.knows(name)):
        return None
    reason = f"what follows >>>{name} is not a JSON object"
    raw = text[marker.start() : body_end]
    return Region(body_end, (finding or Trouble(CallFormat.FUNCTIONARY, FUNCTIONARY, reason, raw, name),))


def _functionary_segment(name: str, body: str, raw: str, ctx: ReadContext) -> Finding | None:
    if body.lstrip().startswith("{"):
        return named_call(name, body, CallFormat.FUNCTIONARY, FUNCTIONARY, raw)
    code_tool = ctx.tools.code_parameter(name)
    if code_tool is not None and body.strip():
        return Found(Shape(code_tool[0], {code_tool[1]: body.strip()}), CallFormat.FUNCTIONARY, raw)
    return None


def read_function_tag(text: str, marker: re.Match[str], ctx: ReadContext) -> Region | None:
    """<function=NAME> outside any <tool_call>: Functionary v3.1's JSON, or bare Qwen3-Coder markup."""
    opener = FUNCTION_OPEN.match(text, marker.start())
    if opener is None:
        return None
    name = (opener.group(1) or opener.group(2) or "").strip()
    after_json = past_json(text, opener.end())  # a tag quoted in an argument is not the end
    close = ctx.next("</function>", after_json)
    following = FUNCTION_OPEN.search(text, after_json)
    end = min(close if close >= 0 else len(text), following.start() if following else len(text))
    closed = end == close or following is not None
    region_end = end + (len("</function>") if end == close else 0)
    raw = text[marker.start() : region_end]
    finding = read_function(
        name, text[opener.end() : end], raw, ctx.tools, closed=closed, what=QWEN3_CODER, bare=True
    )
    return Region(region_end, (finding,))


def _named_body(
    text: str,
    start: int,
    body_start: int,
    name: str,
    ctx: ReadContext,
    fmt: CallFormat,
    what: str,
    *,
    closers: tuple[str, ...],
    stops: tuple[str, ...],
) -> Region:
    """The arguments of `name`, from `body_start` to the first closer or stop after their JSON."""
    json_start = body_start
    while json_start < len(text) and text[json_start].isspace():
        json_start += 1
    if text.startswith("```", json_start):  # DeepSeek R1 fences the JSON
        line_end = text.find("\n", json_start, json_start + _HEADER_REACH)
        json_start = line_end + 1 if line_end >= 0 else json_start
    body_end, which = ctx.first((*closers, *stops), past_json(text, json_start))
    end = body_end + (len(which) if which in closers else 0)
    return Region(end, (named_call(name, text[body_start:body_end], fmt, what, text[start:end]),))


def _drop(text: str, marker: re.Match[str], ctx: ReadContext) -> Region:
    return Region(marker.end())


# Special tokens around calls that are neither prose nor call: dropped from the prose.
_NOISE = (_DEEPSEEK_SECTION_END, "<｜end▁of▁sentence｜>", "<|tool_calls_section_begin|>",
          "<|tool_calls_section_end|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>", "<|eom_id|>",
          "<|eot_id|>", "<|python_end|>", "<|START_RESPONSE|>", "<|END_RESPONSE|>")  # fmt: skip

MARKERS: list[tuple[str, Reader]] = [
    (re.escape("[TOOL_CALLS]"), read_mistral),
    ("|".join(re.escape(token) for token in (*_DEEPSEEK_SECTIONS, _DEEPSEEK_CALL)), read_deepseek),
    (re.escape("<|tool_call_begin|>"), read_kimi),
    (r"<\|start\|>|<\|channel\|>|\A\s*(?=to=)", read_harmony),
    (r">>>(?=[A-Za-z_][\w.\-]*[ \t]*\r?\n)|\A\s*(?=[A-Za-z_][\w.\-]*[ \t]*\r?\n)", read_functionary),
    (r"<function(?=[=\s])", read_function_tag),
    ("|".join(re.escape(token) for token in _NOISE), _drop),
]
