"""Finding tool calls in a model's reply, however the model chose to write them.

Owns `parse_tool_calls`, which turns reply text into the calls it holds (in reply
order), the problems worth telling the model about, and the prose left once the
call text is removed; and `repair_hint`, the one short message fed back to the
model as the tool result when its calls could not be run. Feed it the content
of a reply, not its reasoning: reasoning.py splits them first, so a call the
model only considered while thinking is never run.

Formats read (each family's own markers; where they come from is in the reader):
    ```tool_call / ```tool fence                      bastion's own; explicit
    <tool_call>{json}</tool_call>                      Hermes, Qwen 2.5/3            native_tags.py
    <tool_call><function=NAME><parameter=K>v...        Qwen3-Coder, Nemotron 3       xml_calls.py
    <seed:tool_call>..., <minimax:tool_call><invoke>   Seed-OSS, MiniMax M2          xml_calls.py
    <tool_call>NAME<arg_key>K</arg_key><arg_value>v    GLM 4.5+                      xml_calls.py
    <function=NAME>{json}</function>, name="NAME"      Functionary v3.1, Hermes      native_named.py
    >>>NAME\\n{json} (first segment without >>>)        Functionary v3.2              native_named.py
    <|python_tag|>{json} | name.call(a=1) | code       Llama 3.1                     native_tags.py
    [name(a=1), g()] as the whole reply                Llama 3.2, Llama 4            call_scan.py
    <|python_start|>[name(a=1)]<|python_end|>          Llama 4                       native_tags.py
    ```tool_code fence of name(a=1)                    Gemma                         call_scan.py
    [TOOL_CALLS][{json}], NAME[CALL_ID]id[ARGS]{json}  Mistral                       native_named.py
    <｜tool▁call▁begin｜>...<｜tool▁sep｜>...               DeepSeek R1, V3, V3.1         native_named.py
    <|channel|>commentary to=functions.NAME...         GPT-OSS harmony               native_named.py
    <|tool_call_begin|>functions.NAME:0...             Kimi K2                       native_named.py
    <|tools_prefix|>, <|START_ACTION|>, <|tool_call|>  Apertus, Command R7B, Granite, Phi-4-mini
    functools[...], <tool_calls>, <TOOLCALL>, ...      Phi-4, Firefunction, Jamba, Nemotron, LFM2
    ```json / unlabelled fence, bare JSON in prose     any model; a call only if call-shaped
A call is "call-shaped" JSON when it names a tool and carries arguments
(call_shapes.py lists the shapes); outside explicit markers anything else is
just text, so prose that mentions JSON yields no calls and no problems.

Calls in fences, and syntax that is only shown. A fence labelled tool_call,
tool or tool_code is a call, or a problem. Any other fence is a call only when
its body is nothing but calls: call-shaped JSON (json or unlabelled fences),
calls of available tools written like Python (python or unlabelled), or any
family's call markup naming available tools (```xml around <function=...>,
```json around <function_call>, as llama.cpp accepts). Every other fence is a
code sample: prose, never searched — a ```python fence with a def in it, or an
```xml fence after "here is the format:" whose <function=NAME> names no tool
there is. Markup quoted in inline code (`<tool_call>`) is prose too.

A region marked as a call that cannot be read is a MALFORMED problem whose
message names the format it resembled ("looks like a Qwen3-Coder <function=...>
call, but the <parameter=path> block is not closed"); problems also carry that
format (`resembled`). Also forgiven: a tool name in another case or namespaced
(`functions.clock`), `null` for an optional argument (dropped), arguments as a
JSON string, a marker quoted inside an argument string. Near-JSON is repaired
only after strict parsing fails. Work per reply is bounded, so a hostile reply
cannot make parsing slow. Model text is never evaluated: Python-style calls are
read with `ast.literal_eval`. This module does not run, gate or retry calls.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from bastion.protocol.agent_events import CallFormat
from bastion.supervisor.tools.call_scan import Budget, ReplyScan, join_prose
from bastion.supervisor.tools.call_shapes import Finding, Found, Trouble
from bastion.supervisor.tools.registry import ToolSpec
from bastion.supervisor.tools.schema import validate
from bastion.supervisor.tools.tool_index import ToolIndex

__all__ = ["CallFormat", "CallProblem", "ParseOutcome", "ParsedCall", "ProblemKind", "parse_tool_calls",
           "repair_hint"]  # fmt: skip


class ProblemKind(enum.Enum):
    MALFORMED = "malformed"  # explicitly marked as a call but unreadable
    UNKNOWN_TOOL = "unknown_tool"
    INVALID_ARGUMENTS = "invalid_arguments"


class ParsedCall(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    arguments: dict[str, Any]
    format: CallFormat
    raw: str  # the reply text the call was read from
    repaired: bool = False  # the JSON only parsed after near-JSON repair


class CallProblem(msgspec.Struct, frozen=True, kw_only=True):
    kind: ProblemKind
    name: str  # "" when the call was too malformed to name a tool
    message: str
    hint: str
    raw: str
    resembled: CallFormat | None = None  # the call format the text was written in, or looked like


class ParseOutcome(msgspec.Struct, frozen=True, kw_only=True):
    calls: tuple[ParsedCall, ...] = ()
    problems: tuple[CallProblem, ...] = ()
    prose: str = ""


def parse_tool_calls(reply: str, tools: Mapping[str, ToolSpec]) -> ParseOutcome:
    """The calls, problems and remaining prose in `reply`; no tools means nothing is parsed."""
    if not tools:
        return ParseOutcome(prose=reply.strip())
    index = ToolIndex(tools)
    scan = ReplyScan(reply, index, Budget())
    scan.run()
    if not scan.findings and not scan.dropped_tokens:
        return ParseOutcome(prose=reply.strip())
    items = [_resolve(finding, index) for finding in scan.findings]
    return ParseOutcome(
        calls=tuple(item for item in items if isinstance(item, ParsedCall)),
        problems=tuple(item for item in items if isinstance(item, CallProblem)),
        prose=join_prose(scan.prose),
    )


def repair_hint(problems: Sequence[CallProblem]) -> str:
    """One short message telling the model what was wrong with its calls and how to fix them."""
    if not problems:
        return ""
    lines = ["Your tool call was not run." if len(problems) == 1 else "Your tool calls were not run."]
    lines += [f"- {problem.message}. {problem.hint}" for problem in problems[:3]]
    lines.append("Reply with a corrected ```tool_call``` block, or answer without a tool.")
    return "\n".join(lines)


def _resolve(finding: Finding, tools: ToolIndex) -> ParsedCall | CallProblem:
    """A finding checked against the tools: a call ready to run, or the problem with it."""
    if isinstance(finding, Trouble):
        return _malformed(finding, tools)
    spec = tools.lookup(finding.shape.name)
    return _unknown_tool(finding, tools) if spec is None else _checked(finding, spec)


def _malformed(trouble: Trouble, tools: ToolIndex) -> CallProblem:
    message = f"looks like {trouble.what}, but {trouble.reason}"
    return CallProblem(
        kind=ProblemKind.MALFORMED, name=trouble.name, message=message, hint=_malformed_hint(tools),
        raw=trouble.raw, resembled=trouble.format,
    )  # fmt: skip


def _unknown_tool(found: Found, tools: ToolIndex) -> CallProblem:
    name = found.shape.name
    close = tools.close_match(name)
    guess = f"Did you mean {close}? " if close else ""
    return CallProblem(
        kind=ProblemKind.UNKNOWN_TOOL, name=name, message=f"there is no tool named {name!r}",
        hint=f"{guess}Available tools: {', '.join(tools.names())}.", raw=found.raw, resembled=found.format,
    )  # fmt: skip


def _checked(found: Found, spec: ToolSpec) -> ParsedCall | CallProblem:
    """The call, once its arguments pass the tool's schema; else the problem naming what is wrong."""
    arguments = _without_null_optionals(found.shape.arguments, spec.parameters)
    errors = validate(arguments, spec.parameters, "$.arguments")
    if errors:
        message = f"{spec.name}: {'; '.join(errors[:3])}"
        return CallProblem(
            kind=ProblemKind.INVALID_ARGUMENTS, name=spec.name, message=message,
            hint=_describe_arguments(spec), raw=found.raw, resembled=found.format,
        )  # fmt: skip
    return ParsedCall(
        name=spec.name, arguments=arguments, format=found.format, raw=found.raw, repaired=found.shape.repaired
    )


def _malformed_hint(tools: ToolIndex) -> str:
    example = '```tool_call\n{"name": "TOOL_NAME", "arguments": {...}}\n```'
    return (f"Write exactly {example} with valid JSON (double quotes, no trailing commas). "
            f"Available tools: {', '.join(tools.names())}.")  # fmt: skip


def _without_null_optionals(arguments: dict[str, Any], schema: Mapping[str, Any]) -> dict[str, Any]:
    """Small models write `"unit": null` for an optional argument they mean to leave out."""
    properties, required = schema.get("properties", {}), set(schema.get("required", ()))
    return {
        key: value for key, value in arguments.items()
        if not (value is None and key in properties and key not in required and validate(None, properties[key]))
    }  # fmt: skip


def _describe_arguments(spec: ToolSpec) -> str:
    properties = spec.parameters.get("properties", {})
    required = set(spec.parameters.get("required", ()))
    if not properties:
        return f'{spec.name} takes no arguments: use "arguments": {{}}.'
    fields = []
    for name, schema in properties.items():
        kind = schema.get("type", "any")
        kind = " or ".join(kind) if isinstance(kind, list) else kind
        if "enum" in schema:
            kind = "one of " + ", ".join(json.dumps(option) for option in schema["enum"])
        fields.append(f'"{name}": {kind}' + (" (required)" if name in required else ""))
    return f"{spec.name} takes {{{', '.join(fields)}}}."
