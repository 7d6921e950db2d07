"""The agent harness in-process: the supervisor's own request routing, run
service, loop, model calls and tool round, with stand-in workers running the
worker's real core over scripted replies (tests/inprocess.py).

These are the loop's rules — stop reasons, repair limits, event order, cancel
between two tool calls, retry after a worker death — checked in milliseconds;
test_agent_e2e.py runs one of each through the real processes.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from bastion.protocol import Cancel, ErrorCode, StopReason, TokenDelta
from bastion.protocol.agent_events import (
    CallFormat,
    ContextStrategy,
    RunWarning,
    ToolCallParsed,
    ToolDecision,
    ToolDecisionKind,
    ToolEnded,
    TurnStarted,
    WarningCode,
)
from bastion.protocol.control import (
    LoadModel,
    PromptRendered,
    RunFinished,
    RunStarted,
    SamplingRequest,
    ToolChoice,
    ToolChoiceMode,
)
from bastion.protocol.sessions import ChatRole, ShowSession
from tests.inprocess import (
    InProcessSupervisor,
    failure_of,
    of_type,
    run_request,
    script,
    streamed,
    tool_call,
    types_of,
)
from tests.scripted import prose

# --- the loop's event order and stop reasons -----------------------------------


def test_a_tool_call_runs_and_its_result_reaches_the_model(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, "Let me compute.\n" + tool_call("calculator", expression="6*7"), "It is 42.")

    async def test(sup: InProcessSupervisor) -> None:
        events = await sup.run(run_request(model, "What is 6*7?", tools=("calculator",)))
        assert types_of(events) == [
            "run_start",
            "turn_start", "context_budget", "generation_stats",
            "tool_call", "tool_decision", "tool_start", "tool_output", "tool_end", "turn_end",
            "turn_start", "context_budget", "generation_stats", "turn_end",
            "run_end",
        ]  # fmt: skip
        [parsed] = of_type(events, ToolCallParsed)
        assert parsed.name == "calculator" and json.loads(parsed.arguments) == {"expression": "6*7"}
        assert parsed.format is CallFormat.FENCED
        [decision] = of_type(events, ToolDecision)
        assert decision.decision is ToolDecisionKind.ALLOW and decision.call_id == parsed.call_id
        [end] = of_type(events, ToolEnded)
        assert end.ok and end.content == "42"
        assert events[-1].stop_reason is StopReason.STOP
        assert streamed(events).endswith("It is 42.")
        # The second generation saw the tool result, after the first reply, reusing its prefix.
        first, second = [e for e in events if type(e).__name__ == "GenerationStats"]
        assert second.cached_tokens >= first.prompt_tokens

    supervised(test)


def test_several_calls_in_one_reply_run_in_order(supervised, tmp_path: Path) -> None:
    reply = tool_call("clock", timezone="UTC") + "\nand\n" + tool_call("calculator", expression="2**10")
    model = script(tmp_path, reply, "Done.")

    async def test(sup: InProcessSupervisor) -> None:
        events = await sup.run(run_request(model, tools=("clock", "calculator")))
        assert [e.name for e in of_type(events, ToolCallParsed)] == ["clock", "calculator"]
        ends = of_type(events, ToolEnded)
        assert [e.name for e in ends] == ["clock", "calculator"] and ends[1].content == "1024"
        assert "UTC" in ends[0].content or "+00:00" in ends[0].content

    supervised(test)


def test_without_tools_a_reply_is_never_parsed(supervised, tmp_path: Path) -> None:
    reply = tool_call("calculator", expression="1+1")
    model = script(tmp_path, reply)

    async def test(sup: InProcessSupervisor) -> None:
        events = await sup.run(run_request(model))
        assert not of_type(events, ToolCallParsed)
        assert streamed(events) == reply and events[-1].stop_reason is StopReason.STOP

    supervised(test)


def test_an_unknown_tool_is_fed_back_and_the_model_can_recover(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, tool_call("weather", city="Oslo"), tool_call("calculator", expression="3+4"), "Seven.")

    async def test(sup: InProcessSupervisor) -> None:
        events = await sup.run(run_request(model, tools=("calculator",), session="s"))
        assert events[-1].stop_reason is StopReason.STOP
        [warning] = of_type(events, RunWarning)
        assert warning.code is WarningCode.TOOL_CALL_INVALID and "weather" in warning.message
        assert [e.name for e in of_type(events, ToolEnded)] == ["calculator"]
        # The repair hint went back to the model as a tool result.
        messages = sup.store.messages("s")
        hint = next(m for m in messages if m.role is ChatRole.TOOL)
        assert hint.tool_name == "weather" and "calculator" in hint.content

    supervised(test)


def test_unusable_calls_end_the_run_after_a_bounded_number_of_repairs(supervised, tmp_path: Path) -> None:
    broken = '```tool_call\n{"name": "calculator", "arguments": {"expression": \n```'
    model = script(tmp_path, *[broken] * 6)

    async def test(sup: InProcessSupervisor) -> None:
        events = await sup.run(run_request(model, tools=("calculator",), max_iterations=8))
        assert events[-1].stop_reason is StopReason.REPAIR_LIMIT
        assert len(of_type(events, TurnStarted)) == 3  # the first try and two repairs
        assert any("giving up" in w.message for w in of_type(events, RunWarning))

    supervised(test)


def test_a_good_call_resets_the_repair_count(supervised, tmp_path: Path) -> None:
    broken = '```tool_call\n{"name": "calculator", "arguments": {"expression": \n```'
    good = tool_call("calculator", expression="1+1")
    model = script(tmp_path, broken, broken, good, broken, broken, "done")

    async def test(sup: InProcessSupervisor) -> None:
        events = await sup.run(run_request(model, tools=("calculator",), max_iterations=8))
        assert events[-1].stop_reason is StopReason.STOP
        assert len(of_type(events, TurnStarted)) == 6

    supervised(test)


def test_the_iteration_ceiling_ends_the_run_with_a_warning(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, *[tool_call("calculator", expression=f"{i}+1") for i in range(5)])

    async def test(sup: InProcessSupervisor) -> None:
        events = await sup.run(run_request(model, tools=("calculator",), max_iterations=3))
        assert events[-1].stop_reason is StopReason.MAX_ITERATIONS
        assert len(of_type(events, TurnStarted)) == 3 and len(of_type(events, ToolEnded)) == 3
        assert of_type(events, RunWarning)[-1].code is WarningCode.MAX_ITERATIONS

    supervised(test)


def test_an_unknown_tool_name_in_the_request_is_refused_before_loading(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, "x")

    async def test(sup: InProcessSupervisor) -> None:
        events = await sup.run(run_request(model, tools=("calculator", "teleport")))
        failure = failure_of(events)
        assert failure is not None and failure.code is ErrorCode.INVALID_REQUEST
        assert "teleport" in failure.message and "calculator" in failure.message
        assert sup.workers.started == []

    supervised(test)


def test_show_prompt_renders_and_generates_nothing(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, "never said")

    async def test(sup: InProcessSupervisor) -> None:
        events = await sup.run(run_request(model, "What is 2+2?", system="Be brief.", show_prompt=True))
        assert types_of(events) == ["run_start", "context_budget", "prompt", "run_end"]
        [prompt] = of_type(events, PromptRendered)
        assert "Be brief." in prompt.prompt and "What is 2+2?" in prompt.prompt and prompt.tokens > 10
        assert not streamed(events)

    supervised(test)


# --- sessions -------------------------------------------------------------------


def test_a_session_prompt_only_grows_and_the_worker_reuses_it(supervised, tmp_path: Path) -> None:
    replies = ["First answer.", "Second answer.", "Third answer."]
    model = script(tmp_path, *replies)

    async def test(sup: InProcessSupervisor) -> None:
        prompts, stats = [], []
        for question in ("one?", "two?", "three?"):
            shown = await sup.run(run_request(model, question, session="stable", show_prompt=True))
            prompts.append(of_type(shown, PromptRendered)[0].prompt)
            events = await sup.run(run_request(model, question, session="stable"))
            stats.append(next(e for e in events if type(e).__name__ == "GenerationStats"))
        for earlier, reply, later in zip(prompts, replies, prompts[1:], strict=False):
            assert later.startswith(earlier + reply)
        for previous, current in zip(stats, stats[1:], strict=False):
            assert current.cached_tokens >= previous.prompt_tokens + previous.completion_tokens - 2
        detail = await sup.ask(ShowSession(request_id="show", name="stable", with_prompt=True))
        assert detail.prompt.startswith(prompts[-1] + replies[-1])  # type: ignore[union-attr]

    supervised(test)


def test_a_session_answers_one_run_at_a_time(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, prose(40), "second")

    async def test(sup: InProcessSupervisor) -> None:
        first = run_request(model, session="one")
        sup.send(first)
        await sup.wait_for(lambda: of_type(sup.of(first.request_id), TokenDelta))
        busy = await sup.run(run_request(model, session="one"))
        failure = failure_of(busy)
        assert failure is not None and failure.code is ErrorCode.BUSY and failure.retryable
        await sup.wait_for(lambda: of_type(sup.of(first.request_id), RunFinished))

    supervised(test, token_delay=0.005)


# --- cancel -----------------------------------------------------------------------


def test_cancel_keeps_the_partial_reply_marked_interrupted(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, prose(400), "short")

    async def test(sup: InProcessSupervisor) -> None:
        request = run_request(model, session="cut")
        sup.send(request)
        await sup.wait_for(lambda: len(of_type(sup.of(request.request_id), TokenDelta)) >= 3)
        sup.send(Cancel(request_id=request.request_id))
        await sup.wait_for(lambda: of_type(sup.of(request.request_id), RunFinished))
        assert sup.of(request.request_id)[-1].stop_reason is StopReason.CANCELLED
        reply = sup.store.messages("cut")[-1]
        assert reply.role is ChatRole.ASSISTANT and reply.interrupted and reply.content.startswith("word")
        # The next turn continues normally.
        after = await sup.run(run_request(model, "again", session="cut"))
        assert after[-1].stop_reason is StopReason.STOP

    supervised(test, token_delay=0.005)


def test_cancel_between_two_tool_calls_runs_neither_the_rest_nor_the_model(supervised, tmp_path: Path) -> None:
    reply = tool_call("read_file", path="a.txt") + "\n" + tool_call("read_file", path="b.txt")
    model = script(tmp_path, reply, "never")
    workspace = tmp_path / "ws"
    workspace.mkdir()

    async def test(sup: InProcessSupervisor) -> None:
        sup.sandbox.release = asyncio.Event()  # the first call waits in the sandbox
        request = run_request(model, tools=("files",), workspace=str(workspace), session="two")
        sup.send(request)
        await sup.wait_for(lambda: sup.sandbox.calls)
        sup.send(Cancel(request_id=request.request_id))
        events = await sup.wait_for(lambda: of_type(sup.of(request.request_id), RunFinished)) and sup.of(
            request.request_id)
        assert events[-1].stop_reason is StopReason.CANCELLED
        assert len(sup.sandbox.calls) == 1  # the second call never reached the sandbox
        assert len(of_type(events, ToolCallParsed)) == 2
        results = [m for m in sup.store.messages("two") if m.role is ChatRole.TOOL]
        # Every call has a result, run or not: the second says why it did not run.
        assert len(results) == 2 and results[1].content == "not run: the run was cancelled"

    supervised(test)


# --- worker deaths ------------------------------------------------------------------


def test_a_worker_death_before_any_token_is_retried_once_with_a_warning(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, "the answer", "the answer")

    async def test(sup: InProcessSupervisor) -> None:
        await sup.ask(LoadModel(request_id="load", model=model))
        sup.workers.crash_when_asked(sup.workers.started[0])
        request = run_request(model)
        sup.send(request)
        events = await sup.wait_for(lambda: of_type(sup.of(request.request_id), RunFinished)) and sup.of(
            request.request_id)
        assert events[-1].stop_reason is StopReason.STOP and failure_of(events) is None
        [warning] = of_type(events, RunWarning)
        assert warning.code is WarningCode.GENERATION_RETRIED and "SIGSEGV" in warning.message
        assert len(sup.workers.started) == 2  # restarted once
        assert streamed(events) == "the answer"

    supervised(test)


def test_a_worker_death_after_tokens_ends_the_run_with_the_error(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, prose(200), "after")

    async def test(sup: InProcessSupervisor) -> None:
        request = run_request(model, session="died")
        sup.send(request)
        await sup.wait_for(lambda: len(of_type(sup.of(request.request_id), TokenDelta)) >= 2)
        sup.workers.crash(sup.workers.started[0])
        events = await sup.wait_for(lambda: of_type(sup.of(request.request_id), RunFinished)) and sup.of(
            request.request_id)
        failure = failure_of(events)
        assert failure is not None and failure.code is ErrorCode.WORKER_DIED and "SIGSEGV" in failure.message
        assert events[-1].stop_reason is StopReason.ERROR
        # The partial reply is kept, marked interrupted; the session goes on with the restarted worker.
        assert sup.store.messages("died")[-1].interrupted
        # (A restarted scripted worker replays its replies from the first.)
        after = await sup.run(run_request(model, "again", session="died", sampling=SamplingRequest(max_tokens=4)))
        assert after[-1].stop_reason is StopReason.LENGTH and failure_of(after) is None

    supervised(test, token_delay=0.005)


def test_run_start_names_the_model_and_its_worker(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, "hello")

    async def test(sup: InProcessSupervisor) -> None:
        events = await sup.run(run_request(model, sampling=SamplingRequest(max_tokens=2)))
        [start] = of_type(events, RunStarted)
        assert start.model.startswith("scripted-") and start.template.startswith("builtin")
        assert events[-1].stop_reason is StopReason.LENGTH

    supervised(test)


def test_summarize_folds_the_oldest_turns_into_a_pinned_summary(supervised, tmp_path: Path) -> None:
    long_reply = prose(40)[:200]  # 200 tokens for the byte-counting scripted engine
    # Four turns fill the 900-token budget; before the fifth the loop asks for
    # a summary (the fifth reply), then answers with the sixth.
    replies = [long_reply] * 4 + ["SUMMARY: the user asked three things.", "ok"]
    path = tmp_path / "sum.json"
    path.write_text(json.dumps(replies))
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(f'[models.tiny]\nsource = {{ kind = "scripted", path = "{path}" }}\nn_ctx = 1100\n')

    async def test(sup: InProcessSupervisor) -> None:
        for question in ("first?", "second?", "third?", "fourth?", "fifth?"):
            events = await sup.run(run_request("tiny", question, session="fold", context_strategy=ContextStrategy.SUMMARIZE,
                                               sampling=SamplingRequest(max_tokens=200)))
            assert events[-1].stop_reason in (StopReason.STOP, StopReason.LENGTH), failure_of(events)
        assert streamed(events) == "ok"  # the summary call was hidden from the client
        summaries = [m for m in sup.store.messages("fold") if m.content.startswith("SUMMARY")]
        assert len(summaries) == 1 and summaries[0].pinned
        detail = await sup.ask(ShowSession(request_id="show", name="fold", with_prompt=True))
        shown = detail.prompt  # type: ignore[union-attr]
        assert "SUMMARY: the user asked three things." in shown and "first?" not in shown

    supervised(test)


# --- constrained calls and loops ------------------------------------------------------


def test_required_asks_the_worker_for_a_forced_call_then_for_held_calls(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, tool_call("calculator", expression="6*7"), "It is 42.")

    async def test(sup: InProcessSupervisor) -> None:
        request = run_request(model, tools=("calculator", "clock"),
                              tool_choice=ToolChoice(mode=ToolChoiceMode.REQUIRED))
        events = await sup.run(request)
        assert events[-1].stop_reason is StopReason.STOP
        first, second = sup.workers.grammars()
        assert first is not None and not first.lazy and "calculator" in json.dumps(first.schema)
        assert second is not None and second.lazy
        # A scripted model cannot be constrained: the client is told, since a call was required.
        [warning] = [w for w in of_type(events, RunWarning) if w.code is WarningCode.GRAMMAR_UNAVAILABLE]
        assert "scripted" in warning.message

    supervised(test)


def test_tool_choice_none_offers_nothing_and_parses_nothing(supervised, tmp_path: Path) -> None:
    reply = tool_call("calculator", expression="1+1")
    model = script(tmp_path, reply)

    async def test(sup: InProcessSupervisor) -> None:
        events = await sup.run(run_request(model, tools=("calculator",),
                                           tool_choice=ToolChoice(mode=ToolChoiceMode.NONE)))
        assert not of_type(events, ToolCallParsed) and streamed(events) == reply
        assert sup.workers.grammars() == [None]

    supervised(test)


def test_a_named_tool_the_run_does_not_offer_is_refused(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, "x")

    async def test(sup: InProcessSupervisor) -> None:
        events = await sup.run(run_request(model, tools=("calculator",),
                                           tool_choice=ToolChoice(mode=ToolChoiceMode.FUNCTION, name="clock")))
        failure = failure_of(events)
        assert failure is not None and failure.code is ErrorCode.INVALID_REQUEST and "clock" in failure.message

    supervised(test)


def test_a_looping_reply_is_cut_where_the_loop_began_and_the_session_goes_on(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, "So, that's me. " + "That's me. " * 30, "Your name is Ada.")

    async def test(sup: InProcessSupervisor) -> None:
        events = await sup.run(run_request(model, "What is my name?", session="ada"))
        assert events[-1].stop_reason is StopReason.REPETITION and failure_of(events) is None
        [warning] = of_type(events, RunWarning)
        assert warning.code is WarningCode.REPETITION
        stored = sup.store.messages("ada")[-1]
        # The loop's earliest phase starts inside a word ("T|hat's me. "): the cut keeps whole words.
        assert stored.content == "So, that's me." and not stored.interrupted
        after = await sup.run(run_request(model, "And now?", session="ada"))
        assert after[-1].stop_reason is StopReason.STOP and streamed(after) == "Your name is Ada."

    supervised(test)
