"""Constrained tool calls with the real SmolLM2 through the real CLI, supervisor and worker.

Left to itself, greedy SmolLM2-135M answers "What is 1234 * 5678? Use the
calculator." from memory, wrongly. `--tool-choice required` constrains its
first reply, by a llama.cpp grammar built from the tools' schemas, to a call in
the format the prompt advertises; `--tool-choice NAME` to a call of that tool;
`auto` leaves the reply free with a lazy grammar that would take over once a
call opens; `none` offers no tools. The grammar's compilation and trigger
rules are tested in test_worker_grammar.py and the choice of syntax per family
in test_constraints.py.
"""

from __future__ import annotations

import json

import pytest

from tests.e2e_support import Bastion, events_of

pytestmark = [pytest.mark.e2e, pytest.mark.real_model]

QUESTION = "What is 1234 * 5678? Use the calculator."
GREEDY = ("--tools", "calculator,clock", "--temperature", "0", "--max-iterations", "3")


def answer_after_tools(lines: list[dict]) -> str:
    """The text of the turns after the last tool result."""
    last_tool = max((index for index, line in enumerate(lines) if line["type"] == "tool_end"), default=-1)
    return "".join(line["text"] for line in lines[last_tool + 1 :] if line["type"] == "token")


def test_required_makes_the_model_call_the_calculator_and_answer_from_its_result(shared_bastion: Bastion) -> None:
    code, lines = shared_bastion.json("run", QUESTION, *GREEDY, "--tool-choice", "required")
    assert code == 0, lines[-3:]
    # SmolLM2's card recommends top_p 0.9; the --temperature flag wins over its 0.2.
    start = events_of(lines, "run_start")[0]
    assert start["sampling"]["temperature"] == 0.0 and start["sampling"]["top_p"] == 0.9
    assert start["sampling_source"].startswith("family smollm2") and "flags: temperature" in start["sampling_source"]
    first = events_of(lines, "generation_stats")[0]
    assert first["grammar"] == "full" and first["grammar_triggered"] is True
    call = events_of(lines, "tool_call")[0]
    assert call["name"] == "calculator"
    expression = json.loads(call["arguments"])["expression"]
    assert "1234" in expression and "5678" in expression
    assert events_of(lines, "tool_end")[0]["content"] == "7006652"
    assert "7006652" in answer_after_tools(lines)
    # After the forced first turn the model is free again (a lazy grammar waits for a call to open).
    assert all(stats["grammar"] == "lazy" for stats in events_of(lines, "generation_stats")[1:])


def test_naming_a_tool_makes_the_model_call_that_tool(shared_bastion: Bastion) -> None:
    code, lines = shared_bastion.json("run", QUESTION, *GREEDY, "--tool-choice", "clock")
    assert lines[-1]["type"] == "run_end" and code in (0, 1)
    assert events_of(lines, "generation_stats")[0]["grammar"] == "full"
    assert events_of(lines, "tool_call")[0]["name"] == "clock"
    assert events_of(lines, "tool_end")[0]["ok"] is True


def test_auto_leaves_the_reply_free_until_a_call_opens(shared_bastion: Bastion) -> None:
    code, lines = shared_bastion.json("run", QUESTION, *GREEDY)
    assert lines[-1]["type"] == "run_end" and code in (0, 1)
    stats = events_of(lines, "generation_stats")
    assert stats and all(entry["grammar"] == "lazy" for entry in stats)
    # Whenever the trigger appeared, the rest of that reply was a valid call, so it was parsed and run.
    for entry, turn_calls in zip(stats, [line["tool_calls"] for line in events_of(lines, "turn_end")], strict=True):
        assert not entry["grammar_triggered"] or turn_calls >= 1


def test_none_offers_no_tools_and_an_unknown_choice_is_a_usage_error(shared_bastion: Bastion) -> None:
    prompt = shared_bastion("run", QUESTION, *GREEDY, "--tool-choice", "none", "--show-prompt")
    assert prompt.returncode == 0 and "calculator" not in prompt.stdout.replace(QUESTION, "")
    code, lines = shared_bastion.json("run", QUESTION, *GREEDY, "--tool-choice", "none", "--max-tokens", "32")
    assert code == 0 and not events_of(lines, "tool_call")
    assert events_of(lines, "generation_stats")[0]["grammar"] == "none"
    unknown = shared_bastion("run", QUESTION, *GREEDY, "--tool-choice", "teleport")
    assert unknown.returncode == 2 and "teleport" in unknown.stderr and "calculator" in unknown.stderr
