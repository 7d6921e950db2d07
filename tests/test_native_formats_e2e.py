"""Native tool-call and reasoning formats through the real CLI, supervisor, worker and sandbox.

The parser is tested format by format in test_call_formats.py (and its
problems, parameters and robustness files) from the strings llama.cpp's and
vLLM's tests use; here one scripted model writes a call in every family's
format, in turn, on bastion's own tools, and each must come out of
`bastion run --json` as the right tool with typed arguments, then run. The
reply strings follow the same public references, named beside each.
Also through the real processes: a reply that resembles a call but cannot be
read is a warning naming the format; reasoning is streamed apart, never run,
stored apart and hidden on request; a looping reply is cut by the worker's
loop guard; `--show-prompt` names a built-in template's departures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e_support import Bastion, events_of
from tests.scripted import script

pytestmark = pytest.mark.e2e

FENCE = "```"
TOOLS = "calculator,clock,read_file"

# (reply, the calls it holds: (format, tool, arguments)), in the order the scripted model replies.
# LC = llama.cpp tests/test-chat.cpp and common/chat.cpp; VLLM = vLLM tests/tool_use and its tool parsers.
NATIVE_REPLIES: list[tuple[str, list[tuple[str, str, dict]]]] = [
    # bastion's own advertised fence
    (f'{FENCE}tool_call\n{{"name": "calculator", "arguments": {{"expression": "6*7"}}}}\n{FENCE}',
     [("fenced", "calculator", {"expression": "6*7"})]),
    # LC Hermes 2 Pro / Qwen 2.5: <tool_call>{json}</tool_call>
    ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n</tool_call>',
     [("tagged", "calculator", {"expression": "2+3"})]),
    # LC Llama 3.1: <|python_tag|> with "parameters"
    ('<|python_tag|>{"name": "clock", "parameters": {"timezone": "UTC"}}',
     [("python_tag", "clock", {"timezone": "UTC"})]),
    # LC Llama 3.x: a bare JSON object as the whole reply
    ('{"name": "calculator", "parameters": {"expression": "9*9"}}',
     [("bare_json", "calculator", {"expression": "9*9"})]),
    # LC Mistral Nemo: [TOOL_CALLS] array with an id; Magistral/Devstral v11: NAME[ARGS]{json}
    ('[TOOL_CALLS][{"name": "calculator", "arguments": {"expression": "2**10"}, "id": "123456789"}]',
     [("mistral", "calculator", {"expression": "2**10"})]),
    ('[TOOL_CALLS]clock[ARGS]{"timezone": "Europe/Paris"}',
     [("mistral", "clock", {"timezone": "Europe/Paris"})]),
    # LC Functionary v3.1 / Llama 3.1 <function=NAME>; VLLM Hermes-style <function name="NAME">
    ('<function=calculator>{"expression": "3+4"}</function>',
     [("function_tag", "calculator", {"expression": "3+4"})]),
    ('<function name="clock">{"timezone": "Asia/Tokyo"}</function>',
     [("function_tag", "clock", {"timezone": "Asia/Tokyo"})]),
    # LC Qwen3-Coder: <parameter=K> values are text, typed by the tool's schema (offset, limit: integer)
    ("<tool_call>\n<function=read_file>\n<parameter=path>\nnotes.txt\n</parameter>\n<parameter=offset>\n1\n"
     "</parameter>\n<parameter=limit>\n2\n</parameter>\n</function>\n</tool_call>",
     [("qwen3_coder", "read_file", {"path": "notes.txt", "offset": 1, "limit": 2})]),
    # LC Seed-OSS: the same inside <seed:tool_call>
    ("<seed:tool_call>\n<function=read_file>\n<parameter=path>notes.txt</parameter>\n"
     "<parameter=limit>1</parameter>\n</function>\n</seed:tool_call>",
     [("qwen3_coder", "read_file", {"path": "notes.txt", "limit": 1})]),
    # LC GLM 4.5: <arg_key>/<arg_value> pairs
    ("<tool_call>read_file\n<arg_key>path</arg_key>\n<arg_value>notes.txt</arg_value>\n<arg_key>offset</arg_key>\n"
     "<arg_value>2</arg_value>\n</tool_call>",
     [("glm", "read_file", {"path": "notes.txt", "offset": 2})]),
    # LC MiniMax M2: <invoke name=...><parameter name=...>
    ('<minimax:tool_call>\n<invoke name="read_file">\n<parameter name="path">notes.txt</parameter>\n'
     '<parameter name="limit">3</parameter>\n</invoke>\n</minimax:tool_call>',
     [("minimax", "read_file", {"path": "notes.txt", "limit": 3})]),
    # LC Functionary v3.2: an "all" preamble, then >>>NAME and its JSON
    ('all\nLet me work it out.>>>calculator\n{"expression": "5*5"}',
     [("functionary", "calculator", {"expression": "5*5"})]),
    # VLLM pythonic (Llama 3.2, Llama 4): a list of calls as the whole reply, two calls in one reply
    ('[calculator(expression="9-3"), clock(timezone="UTC")]',
     [("pythonic_list", "calculator", {"expression": "9-3"}), ("pythonic_list", "clock", {"timezone": "UTC"})]),
    # VLLM Llama 4 pythonic: <|python_start|>...<|python_end|>, integers typed by the literal
    ('<|python_start|>[read_file(path="notes.txt", offset=0, limit=1)]<|python_end|>',
     [("python_start", "read_file", {"path": "notes.txt", "offset": 0, "limit": 1})]),
    # Gemma 3 function calling guide: a ```tool_code fence
    (f"{FENCE}tool_code\nclock(timezone='America/New_York')\n{FENCE}",
     [("tool_code", "clock", {"timezone": "America/New_York"})]),
    # LC DeepSeek R1: function<｜tool▁sep｜>NAME and a fenced JSON; V3.1: NAME<｜tool▁sep｜>{json}
    ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>calculator\n```json\n"
     '{"expression": "8/2"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
     [("deepseek", "calculator", {"expression": "8/2"})]),
    ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>clock<｜tool▁sep｜>{"timezone": "UTC"}<｜tool▁call▁end｜>'
     "<｜tool▁calls▁end｜>",
     [("deepseek", "clock", {"timezone": "UTC"})]),
    # LC GPT-OSS harmony: a call on the commentary channel after analysis
    ("<|channel|>analysis<|message|>The user wants the time.<|end|><|start|>assistant<|channel|>commentary "
     'to=functions.clock <|constrain|>json<|message|>{"timezone": "UTC"}<|call|>',
     [("harmony", "clock", {"timezone": "UTC"})]),
    # LC Kimi K2: functions.NAME:IDX in a tool-calls section
    ("<|tool_calls_section_begin|><|tool_call_begin|>functions.calculator:0<|tool_call_argument_begin|>"
     '{"expression": "7+7"}<|tool_call_end|><|tool_calls_section_end|>',
     [("kimi", "calculator", {"expression": "7+7"})]),
    # LC Apertus: [{"NAME": {args}}] between tools prefix and suffix
    ('<|tools_prefix|>[{"calculator": {"expression": "10-1"}}]<|tools_suffix|>',
     [("apertus", "calculator", {"expression": "10-1"})]),
    # LC Command R7B: an action block after its thinking block
    ("<|START_THINKING|>I need the calculator.<|END_THINKING|><|START_ACTION|>[\n"
     '    {"tool_call_id": "0", "tool_name": "calculator", "parameters": {"expression": "2+2"}}\n]<|END_ACTION|>',
     [("command_r", "calculator", {"expression": "2+2"})]),
    # LC Granite 3: <|tool_call|>, arguments given as a JSON string
    ('<|tool_call|>[{"name": "calculator", "arguments": "{\\"expression\\": \\"4*4\\"}"}]',
     [("granite", "calculator", {"expression": "4*4"})]),
    # LC Firefunction v2 / Phi-4-mini: functools[...]
    ('functools[{"name": "clock", "arguments": {"timezone": "UTC"}}]',
     [("functools", "clock", {"timezone": "UTC"})]),
    # LC: a ```xml fence around a <function_call> (the body decides, not the label)
    (f'{FENCE}xml\n<function_call>{{"name": "calculator", "arguments": {{"expression": "1+2"}}}}</function_call>\n'
     f"{FENCE}",
     [("function_call_tag", "calculator", {"expression": "1+2"})]),
    # LC Jamba / Nemotron: JSON inside <tool_calls>
    ('<tool_calls>[{"name": "calculator", "arguments": {"expression": "3*3"}}]</tool_calls>',
     [("json_tag", "calculator", {"expression": "3*3"})]),
    # VLLM xLAM: a bare JSON array; a ```json fence; a small model's Python-style call in a fence
    ('[{"name": "calculator", "arguments": {"expression": "11*11"}}]',
     [("bare_json", "calculator", {"expression": "11*11"})]),
    (f'{FENCE}json\n{{"name": "clock", "arguments": {{}}}}\n{FENCE}',
     [("fenced_json", "clock", {})]),
    (f'{FENCE}python\ncalculator("12*12")\n{FENCE}',
     [("pythonic", "calculator", {"expression": "12*12"})]),
]  # fmt: skip

# Looks like a Llama 4 call, but the path is not a literal: unreadable, so a warning, never silence.
UNREADABLE = '<|python_start|>[read_file(path=notes.txt)]<|python_end|>'
# Prose that only shows call syntax, in a code sample and in inline code: an answer, no call.
SHOWN_NOT_CALLED = (
    "All done. In a script you might write:\n"
    f'{FENCE}python\nresult = calculator(expression="6*7")\nprint(result)\n{FENCE}\n'
    'and a Qwen model asks with `<tool_call>{"name": "calculator", "arguments": {}}</tool_call>`.'
)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "ws"
    path.mkdir()
    (path / "notes.txt").write_text("zero\none\ntwo\nthree\nfour\n")
    return path


# A scripted model's context is small: the formats go in runs of this many replies.
REPLIES_PER_RUN = 8


def test_every_native_format_becomes_the_right_call_with_typed_arguments(
    shared_bastion: Bastion, workspace: Path, tmp_path: Path
) -> None:
    calls: list[tuple[str, str, dict]] = []
    results: dict[str, str] = {}
    for first in range(0, len(NATIVE_REPLIES), REPLIES_PER_RUN):
        replies = [reply for reply, _ in NATIVE_REPLIES[first:first + REPLIES_PER_RUN]]
        model = script(tmp_path, *replies, "Done.")
        code, lines = shared_bastion.json(
            "run", "Exercise every tool.", "--model", model, "--tools", TOOLS,
            "--max-iterations", str(len(replies) + 1), cwd=workspace,
        )  # fmt: skip
        assert code == 0 and lines[-1]["stop_reason"] == "stop", lines[-3:]
        assert not events_of(lines, "warning"), events_of(lines, "warning")
        ends = {end["call_id"]: end for end in events_of(lines, "tool_end")}
        for line in events_of(lines, "tool_call"):
            calls.append((line["format"], line["name"], json.loads(line["arguments"])))
            end = ends[line["call_id"]]  # every call ran, in the sandbox or the supervisor
            assert end["ok"], end
            results[f"{len(calls)}"] = end["content"]
    assert calls == [call for _, expected in NATIVE_REPLIES for call in expected]
    # The results show the typed arguments did what they say.
    assert results["1"] == "42"
    reads = [results[f"{n}"] for n, (_, name, _) in enumerate(calls, 1) if name == "read_file"]
    # offset 1 limit 2; limit 1; offset 2 (a note follows when lines remain)
    assert [read.split("[read_file")[0] for read in reads[:3]] == ["one\ntwo\n", "zero\n", "two\nthree\nfour\n"]


def test_an_unreadable_call_is_a_warning_and_a_shown_sample_is_an_answer(
    shared_bastion: Bastion, workspace: Path, tmp_path: Path
) -> None:
    model = script(tmp_path, UNREADABLE, SHOWN_NOT_CALLED)
    code, lines = shared_bastion.json("run", "Read the notes.", "--model", model, "--tools", TOOLS, cwd=workspace)
    assert code == 0 and not events_of(lines, "tool_call")
    warnings = events_of(lines, "warning")
    assert [(w["code"], w["resembled"]) for w in warnings] == [("tool_call_invalid", "python_start")]
    assert "Llama 4" in warnings[0]["message"]
    # The model was told what was wrong, then answered with prose that only shows call syntax.
    assert len(events_of(lines, "turn_start")) == 2 and lines[-1]["stop_reason"] == "stop"
    assert "".join(line["text"] for line in events_of(lines, "token")).endswith(SHOWN_NOT_CALLED)


REASONING_WITH_QUOTED_CALL = (
    "<think>\nThe clock could help: <tool_call>\n"
    '{"name": "clock", "arguments": {}}\n</tool_call>\nNo, the calculator is what I need.\n</think>\n\n'
    '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>'
)


def test_reasoning_is_its_own_event_never_runs_and_is_stored_apart(
    shared_bastion: Bastion, tmp_path: Path
) -> None:
    model = script(tmp_path, REASONING_WITH_QUOTED_CALL, "<think>It returned 42.</think>The answer is 42.")
    code, lines = shared_bastion.json("run", "What is 6*7?", "--model", model, "--tools", "calculator,clock",
                                      "--template", "qwen3", "--session", "thinking")
    assert code == 0
    assert [line["name"] for line in events_of(lines, "tool_call")] == ["calculator"]  # the quoted clock never ran
    reasoning = "".join(line["text"] for line in events_of(lines, "reasoning"))
    assert "The clock could help" in reasoning and "It returned 42." in reasoning
    answer = "".join(line["text"] for line in events_of(lines, "token"))
    assert "The clock could help" not in answer and "<think>" not in answer and answer.endswith("The answer is 42.")
    # Stored apart: `sessions show` labels it; the next prompt renders it as Qwen3's template does (dropped
    # for turns before the new question).
    shown = shared_bastion("sessions", "show", "thinking")
    assert shown.returncode == 0 and "[reasoning] It returned 42." in shown.stdout
    prompt = shared_bastion("run", "And 7*8?", "--session", "thinking", "--template", "qwen3", "--tools",
                            "calculator,clock", "--show-prompt")
    assert prompt.returncode == 0 and "The answer is 42.<|im_end|>" in prompt.stdout
    assert "It returned 42." not in prompt.stdout and "<think>" not in prompt.stdout


def test_hide_reasoning_in_text_and_json_and_the_renderer_keeps_it_off_stdout(
    shared_bastion: Bastion, tmp_path: Path
) -> None:
    replies = ("<think>Short question, short answer.</think>Hello there.",) * 3
    model = script(tmp_path, *replies)
    # Text: the answer on stdout, the reasoning on stderr; hidden, it is nowhere.
    shown = shared_bastion("run", "Hi", "--model", model, "--template", "qwen3")
    assert shown.returncode == 0 and shown.stdout.strip() == "Hello there."
    assert "Short question, short answer." in shown.stderr
    hidden = shared_bastion("run", "Hi", "--model", model, "--template", "qwen3", "--hide-reasoning")
    assert hidden.returncode == 0 and hidden.stdout.strip() == "Hello there."
    assert "Short question" not in hidden.stderr
    code, lines = shared_bastion.json("run", "Hi", "--model", model, "--template", "qwen3", "--hide-reasoning")
    assert code == 0 and not events_of(lines, "reasoning")
    assert "".join(line["text"] for line in events_of(lines, "token")) == "Hello there."


def test_harmony_analysis_is_reasoning_and_a_call_quoted_there_never_runs(
    shared_bastion: Bastion, tmp_path: Path
) -> None:
    model = script(
        tmp_path,
        '<|channel|>analysis<|message|>Maybe <tool_call>{"name": "calculator", "arguments": {"expression": "1/0"}}'
        "</tool_call>? No: the clock.<|end|><|start|>assistant<|channel|>commentary to=functions.clock "
        '<|constrain|>json<|message|>{"timezone": "UTC"}<|call|>',
        "<|channel|>analysis<|message|>Got it.<|end|><|start|>assistant<|channel|>final<|message|>It is noon.",
    )  # fmt: skip
    code, lines = shared_bastion.json("run", "Time?", "--model", model, "--tools", "calculator,clock",
                                      "--template", "gpt-oss")
    assert code == 0
    assert [(line["name"], line["format"]) for line in events_of(lines, "tool_call")] == [("clock", "harmony")]
    reasoning = "".join(line["text"] for line in events_of(lines, "reasoning"))
    assert "the clock" in reasoning and "Got it." in reasoning
    assert "".join(line["text"] for line in events_of(lines, "token")).strip().endswith("It is noon.")


def test_a_looping_reply_is_cut_by_the_worker_and_the_session_goes_on(
    shared_bastion: Bastion, tmp_path: Path
) -> None:
    looping = "My name is Ada. " + "So, that's me. " * 80
    model = script(tmp_path, looping, "Your name is Ada.")
    code, lines = shared_bastion.json("run", "What is my name?", "--model", model, "--session", "loop",
                                      "--max-tokens", "2000")
    assert code == 0 and lines[-1]["stop_reason"] == "repetition"
    assert [line["code"] for line in events_of(lines, "warning")] == ["repetition"]
    streamed = "".join(line["text"] for line in events_of(lines, "token"))
    assert streamed.count("So, that's me.") < 10  # cut soon after the loop began, not at max_tokens
    kept = shared_bastion("sessions", "show", "loop")
    assert "My name is Ada." in kept.stdout and kept.stdout.count("So, that's me.") <= 1
    code, lines = shared_bastion.json("run", "Again?", "--session", "loop")
    assert code == 0 and lines[-1]["stop_reason"] == "stop"
    # The loop guard is on by default and off on request: then the same reply runs to its end.
    unguarded = script(tmp_path, looping)
    code, lines = shared_bastion.json("run", "Name?", "--model", unguarded, "--no-loop-guard", "--max-tokens", "2000")
    assert code == 0 and lines[-1]["stop_reason"] == "stop" and not events_of(lines, "warning")
    assert "".join(line["text"] for line in events_of(lines, "token")) == looping


def test_show_prompt_names_where_a_builtin_template_departs_from_the_official_one(
    shared_bastion: Bastion, tmp_path: Path
) -> None:
    model = script(tmp_path, "unused")
    done = shared_bastion("run", "Hi", "--model", model, "--template", "mistral", "--tools", "calculator",
                          "--show-prompt")
    assert done.returncode == 0 and "[AVAILABLE_TOOLS]" in done.stdout
    assert "differs from the official template" in done.stderr and "template_placement" in done.stderr
    code, lines = shared_bastion.json("run", "Hi", "--model", model, "--template", "qwen3", "--show-prompt")
    assert code == 0 and not events_of(lines, "prompt")[0].get("departures")
