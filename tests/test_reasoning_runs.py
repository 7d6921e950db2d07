"""Reasoning through the harness, in-process: streamed as `reasoning` events apart
from the answer, never searched for tool calls, stored apart from the content,
and kept in or dropped from later prompts exactly as the model's own template does
(Qwen3's and DeepSeek R1's formats, through bastion's built-ins that render
byte for byte what the official templates render: test_official_templates.py)."""

from __future__ import annotations

from pathlib import Path

from bastion.protocol import StopReason, TokenDelta
from bastion.protocol.agent_events import ReasoningDelta, ToolCallParsed, ToolEnded
from bastion.protocol.sessions import ChatRole
from tests.inprocess import InProcessSupervisor, failure_of, run_request, script, streamed

CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+2"}}\n</tool_call>'





def test_reasoning_streams_apart_and_a_call_quoted_in_it_never_runs(supervised, tmp_path: Path) -> None:
    reply = f"<think>\nI could write {CALL} but I know it.\n</think>\n\nThe answer is 4."
    model = script(tmp_path, reply)

    async def test(sup: InProcessSupervisor) -> None:
        events = await sup.run(run_request(model, tools=("calculator",), template="qwen3", session="q"))
        assert events[-1].stop_reason is StopReason.STOP and failure_of(events) is None
        assert not any(isinstance(e, ToolCallParsed | ToolEnded) for e in events)
        assert "I could write" in streamed(events, ReasoningDelta)
        assert streamed(events, TokenDelta).strip() == "The answer is 4."
        (stored,) = [m for m in sup.store.messages("q") if m.role is ChatRole.ASSISTANT]
        assert stored.content == "The answer is 4."
        assert stored.reasoning.startswith("I could write") and stored.reasoning.endswith("I know it.")

    supervised(test)


def test_qwen3_keeps_reasoning_within_a_tool_loop_and_drops_it_after_the_next_question(
    supervised, tmp_path: Path
) -> None:
    model = script(tmp_path, "<think>\nI need the calculator.\n</think>\n\n" + CALL, "It is 4.", "Yes.")

    async def test(sup: InProcessSupervisor) -> None:
        events = await sup.run(run_request(model, tools=("calculator",), template="qwen3", session="loop"))
        assert [e.content for e in events if isinstance(e, ToolEnded)] == ["4"]
        # The call was read from the content; the reasoning stayed apart and stays in the tool loop's
        # next prompt, as Qwen3's template keeps it for turns after the last question.
        assert "<think>\nI need the calculator.\n</think>" in sup.workers.prompts()[1]
        await sup.run(run_request(model, "Sure?", tools=("calculator",), template="qwen3", session="loop"))
        assert "I need the calculator." not in sup.workers.prompts()[2]  # a new question: dropped

    supervised(test)


def test_a_prompt_that_opens_reasoning_is_answered_from_inside_it(supervised, tmp_path: Path) -> None:
    # DeepSeek R1 distills open the generation prompt with <think>\n: the reply only closes it.
    model = script(tmp_path, "Two and two make four.\n</think>\n\nFour.")

    async def test(sup: InProcessSupervisor) -> None:
        events = await sup.run(run_request(model, template="deepseek-r1", session="r1"))
        assert sup.workers.prompts()[0].endswith("<think>\n")
        assert streamed(events, ReasoningDelta).strip() == "Two and two make four."
        assert streamed(events, TokenDelta).strip() == "Four."
        (stored,) = [m for m in sup.store.messages("r1") if m.role is ChatRole.ASSISTANT]
        assert (stored.reasoning, stored.content) == ("Two and two make four.", "Four.")

    supervised(test)


def test_a_reply_without_reasoning_is_all_answer(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, "Just 4, and a < sign.")

    async def test(sup: InProcessSupervisor) -> None:
        events = await sup.run(run_request(model, session="plain"))
        assert not any(isinstance(e, ReasoningDelta) for e in events)
        assert streamed(events, TokenDelta) == "Just 4, and a < sign."
        tokens = [e.n for e in events if isinstance(e, TokenDelta)]
        assert tokens == sorted(tokens) and tokens[-1] == len("Just 4, and a < sign.")

    supervised(test)
