"""`complete`: one model call over a conversation the client holds, in-process (tests/inprocess.py).

The API gateway's chat routes are built on this request; these tests hold its
rules: only prose streams, calls come back as `tool_call` events with ids, a
reply sent back by those ids is rendered exactly as the model wrote it, a
forced call or a JSON output format reaches the worker as a grammar, and bad
requests are refused with a clear error.
"""

from __future__ import annotations

import json
from pathlib import Path

from bastion.protocol import ErrorCode, StopReason
from bastion.protocol.agent_events import CallFormat, RunWarning, ToolCallParsed, WarningCode
from bastion.protocol.common import TokenDelta
from bastion.protocol.completion import (
    CallRecord,
    Complete,
    FunctionTool,
    OutputKind,
    ResponseFormat,
    Turn,
)
from bastion.protocol.control import RunFinished, RunStarted, ToolChoice, ToolChoiceMode
from bastion.protocol.sessions import ChatRole
from bastion.protocol.worker_wire import CallGrammar
from tests.inprocess import InProcessSupervisor, failure_of, of_type, request_id, script, streamed

WEATHER = FunctionTool(name="get_weather", description="Weather in a city",
                       parameters={"type": "object", "properties": {"city": {"type": "string"}},
                                   "required": ["city"]})  # fmt: skip
QUESTION = (Turn(role=ChatRole.SYSTEM, content="Be brief."), Turn(role=ChatRole.USER, content="Weather in Paris?"))
CALL_REPLY = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def complete(model: str, messages: tuple[Turn, ...] = QUESTION, **fields: object) -> Complete:
    return Complete(request_id=request_id("c"), model=model, messages=messages, **fields)  # type: ignore[arg-type]


def test_a_call_comes_back_as_an_event_and_only_the_prose_streams(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, CALL_REPLY)

    async def test(sup: InProcessSupervisor) -> None:
        events = await sup.run(complete(model, tools=(WEATHER,)))
        assert failure_of(events) is None and events[-1].stop_reason is StopReason.STOP
        assert len(of_type(events, RunStarted)) == 1
        assert streamed(events) == "Let me look.\n"
        [call] = of_type(events, ToolCallParsed)
        assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
        assert call.format is CallFormat.TAGGED and call.call_id.startswith("call_")

    supervised(test)


def test_a_reply_sent_back_by_its_call_ids_is_rendered_as_the_model_wrote_it(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, CALL_REPLY, "It is sunny in Paris.")

    async def test(sup: InProcessSupervisor) -> None:
        first = await sup.run(complete(model, tools=(WEATHER,)))
        [call] = of_type(first, ToolCallParsed)
        # The client sends back the prose and the structured call, then the tool's result.
        history = (*QUESTION,
                   Turn(role=ChatRole.ASSISTANT, content="Let me look.",
                        tool_calls=(CallRecord(id=call.call_id, name=call.name, arguments=call.arguments),)),
                   Turn(role=ChatRole.TOOL, content='{"sky": "sunny"}', tool_call_id=call.call_id))  # fmt: skip
        second = await sup.run(complete(model, history, tools=(WEATHER,)))
        assert streamed(second) == "It is sunny in Paris." and not of_type(second, ToolCallParsed)
        first_prompt, second_prompt = sup.workers.prompts()
        # The second prompt continues the first one and the reply exactly as generated: the KV cache matches.
        assert second_prompt.startswith(first_prompt + CALL_REPLY)
        assert '{"sky": "sunny"}' in second_prompt[len(first_prompt) :]

    supervised(test)


def test_calls_bastion_did_not_issue_are_written_in_the_syntax_the_prompt_teaches(
    supervised, tmp_path: Path
) -> None:
    model = script(tmp_path, "Sunny.", "Sunny.")
    history = (*QUESTION,
               Turn(role=ChatRole.ASSISTANT, tool_calls=(CallRecord(id="abc", name="get_weather",
                                                                    arguments='{"city": "Paris"}'),)),
               Turn(role=ChatRole.TOOL, content="sunny", tool_call_id="abc"))  # fmt: skip

    async def test(sup: InProcessSupervisor) -> None:
        events = await sup.run(complete(model, history, tools=(WEATHER,)))
        assert failure_of(events) is None
        [prompt] = sup.workers.prompts()
        # The scripted model renders with the ChatML built-in, which lists tools and teaches Hermes calls.
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
        assert "<|im_start|>tool\nsunny<|im_end|>" in prompt
        # A template without a tools list (Llama 2) is taught bastion's fenced call; results come fenced.
        await sup.run(complete(model, history, tools=(WEATHER,), template="llama2"))
        fenced = sup.workers.prompts()[-1]
        assert '```tool_call\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```' in fenced
        assert "```tool_result\nsunny\n```" in fenced

    supervised(test)


def test_required_and_json_output_reach_the_worker_as_grammars(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, CALL_REPLY, '{"city": "Paris"}', "plain")
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}

    async def test(sup: InProcessSupervisor) -> None:
        forced = await sup.run(complete(model, tools=(WEATHER,), tool_choice=ToolChoice(mode=ToolChoiceMode.REQUIRED)))
        shaped = await sup.run(complete(model, response_format=ResponseFormat(kind=OutputKind.JSON_SCHEMA,
                                                                             schema=schema)))
        plain = await sup.run(complete(model))
        assert all(failure_of(events) is None for events in (forced, shaped, plain))
        required, output, free = sup.workers.grammars()
        assert isinstance(required, CallGrammar) and not required.lazy and "get_weather" in json.dumps(required.schema)
        assert output == CallGrammar(schema=schema)
        assert free is None
        # A scripted engine cannot constrain: the client is told the reply was free text.
        warnings = [w.code for w in of_type(forced, RunWarning)]
        assert WarningCode.GRAMMAR_UNAVAILABLE in warnings

    supervised(test)


def test_tool_choice_none_offers_and_parses_nothing(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, CALL_REPLY)

    async def test(sup: InProcessSupervisor) -> None:
        events = await sup.run(complete(model, tools=(WEATHER,), tool_choice=ToolChoice(mode=ToolChoiceMode.NONE)))
        assert not of_type(events, ToolCallParsed) and streamed(events) == CALL_REPLY
        [prompt] = sup.workers.prompts()
        assert "get_weather" not in prompt

    supervised(test)


def test_a_raw_prompt_goes_to_the_model_as_it_is(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, " world")

    async def test(sup: InProcessSupervisor) -> None:
        events = await sup.run(Complete(request_id=request_id("c"), model=model, prompt="Hello"))
        assert streamed(events) == " world" and sup.workers.prompts() == ["Hello"]
        assert of_type(events, RunStarted)[0].template == "raw"

    supervised(test)


def test_a_reply_without_calls_streams_whole_even_when_held(supervised, tmp_path: Path) -> None:
    reply = "The list [1, 2, 3] has three items."
    model = script(tmp_path, reply)

    async def test(sup: InProcessSupervisor) -> None:
        events = await sup.run(complete(model, tools=(WEATHER,)))
        assert streamed(events) == reply and not of_type(events, ToolCallParsed)
        # The held part came as one last delta after the generation ended.
        assert of_type(events, TokenDelta)[-1].text == "[1, 2, 3] has three items."

    supervised(test)


def test_an_unusable_call_is_a_warning_naming_its_format_and_the_text_stays(supervised, tmp_path: Path) -> None:
    reply = '<tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call>'
    model = script(tmp_path, reply)

    async def test(sup: InProcessSupervisor) -> None:
        events = await sup.run(complete(model, tools=(WEATHER,)))
        [warning] = of_type(events, RunWarning)
        assert warning.code is WarningCode.TOOL_CALL_INVALID and warning.resembled is CallFormat.TAGGED
        assert not of_type(events, ToolCallParsed)

    supervised(test)


def test_bad_requests_are_refused_with_a_clear_error(supervised, tmp_path: Path) -> None:
    model = script(tmp_path, "unused")

    async def test(sup: InProcessSupervisor) -> None:
        cases = {
            "no messages": Complete(request_id=request_id("c"), model=model),
            "prompt with tools": Complete(request_id=request_id("c"), model=model, prompt="x", tools=(WEATHER,)),
            "duplicate tools": complete(model, tools=(WEATHER, WEATHER)),
            "unknown forced tool": complete(model, tools=(WEATHER,),
                                            tool_choice=ToolChoice(mode=ToolChoiceMode.FUNCTION, name="teleport")),
            "schema missing": complete(model, response_format=ResponseFormat(kind=OutputKind.JSON_SCHEMA)),
        }  # fmt: skip
        for what, request in cases.items():
            events = await sup.run(request)
            failure = failure_of(events)
            assert failure is not None and failure.code is ErrorCode.INVALID_REQUEST, what
            assert isinstance(events[-1], RunFinished) and events[-1].stop_reason is StopReason.ERROR
        unknown = failure_of(await sup.run(complete("no-such-model")))
        assert unknown is not None and unknown.code is ErrorCode.UNKNOWN_MODEL and "smollm2" in unknown.message
        assert sup.workers.prompts() == []  # none of them reached a model

    supervised(test)
