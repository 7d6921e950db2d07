"""The agent loop: format → generate → parse → gate → execute → append → again.

One `AgentLoop` serves one run on one conversation, over three collaborators:
`PromptBuilder` (the next prompt, within the context budget), `ModelCalls`
(one model call, with retry and cancel) and, when the run has tools,
`ToolRound` (parse the reply, gate and run each call, append the results).
Each turn renders the prompt, generates, appends the reply and — when tools
were given — runs the calls it holds and goes round again. It stops at a reply
without tool calls, at the iteration ceiling, after too many unusable tool
calls in a row, on cancel, or on an error.

Everything the loop does is visible as events (see protocol/agent_events.py)
and everything it decides is appended to the conversation before it moves on,
so a cancel or a crash leaves the session consistent: a partial reply is kept
and marked interrupted, and no tool call is left without a result.
`build_loop` wires one for a run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import msgspec

from bastion.protocol import ErrorCode, GenerationStats, SamplingParams, StopReason
from bastion.protocol.agent_events import ContextStrategy, RunWarning, TurnFinished, TurnStarted, WarningCode
from bastion.protocol.common import GrammarUse
from bastion.protocol.control import ToolChoice
from bastion.protocol.sessions import ChatRole
from bastion.protocol.worker_wire import CallGrammar
from bastion.supervisor.harness.constraints import FENCED, CallConstraint, call_syntax
from bastion.supervisor.harness.conversation import Conversation
from bastion.supervisor.harness.model_calls import ModelCalls, ServedModel
from bastion.supervisor.harness.prompt_builder import PromptBuilder
from bastion.supervisor.harness.tool_execution import ToolExecution
from bastion.supervisor.harness.tool_round import ToolRound
from bastion.supervisor.models.tokenizer import TokenCounter
from bastion.supervisor.runs import ActiveRun, GenerationOutcome
from bastion.supervisor.templates.formatter import ChatMessage, PromptFormatter
from bastion.supervisor.tools.calls import ParsedCall
from bastion.supervisor.tools.reasoning import (
    ReasoningFormat,
    ReasoningSplit,
    guess_reasoning_format,
    prompt_opens_reasoning,
    split_reasoning,
)
from bastion.supervisor.tools.registry import Tool


class LoopSettings(msgspec.Struct, frozen=True, kw_only=True):
    max_iterations: int = 8
    # Unusable tool calls fed back to the model before the run gives up.
    max_repairs: int = 2
    # Times a model call is asked again after its worker died before any of
    # it reached the client.
    max_generation_retries: int = 1
    strategy: ContextStrategy = ContextStrategy.WINDOW


class AgentLoop:
    def __init__(
        self,
        *,
        run: ActiveRun,
        conversation: Conversation,
        prompts: PromptBuilder,
        calls: ModelCalls,
        tools: ToolRound | None,
        sampling: SamplingParams,
        settings: LoopSettings,
        constraint: CallConstraint | None = None,
        reasoning: ReasoningFormat = ReasoningFormat.NONE,
    ) -> None:
        self._run = run
        self._conversation = conversation
        self._prompts = prompts
        self._calls = calls
        self._tools = tools
        self._sampling = sampling
        self._settings = settings
        self._constraint = constraint
        self._reasoning = reasoning
        self.last_stats: GenerationStats | None = None  # of the latest generation, for the run record

    @property
    def prompts(self) -> PromptBuilder:
        return self._prompts

    async def run_turns(self) -> StopReason:
        repairs = 0
        for iteration in range(1, self._settings.max_iterations + 1):
            self._run.send(TurnStarted(request_id=self._run.request_id, session=self._conversation.name,
                                       iteration=iteration))
            prompt = await self._prompts.next_prompt()
            grammar = self._constraint.for_turn(iteration) if self._constraint else None
            outcome = await self._calls.generate(prompt, self._sampling, self._conversation.name, grammar=grammar,
                                                 reasoning=self._reasoning)
            self.last_stats = outcome.stats
            self._report_generation(outcome, grammar)
            reply = split_reasoning(outcome.text, self._reasoning,
                                    starts_inside=prompt_opens_reasoning(prompt, self._reasoning))
            ending = self._take_reply(outcome, reply)
            calls: Sequence[ParsedCall] = ()
            if ending is None and self._tools is not None:
                parsed = self._tools.read(reply.content)  # reasoning is never searched for calls
                calls = parsed.calls
                if parsed.problems:
                    repairs += 1
                    self._tools.record_problems(parsed.problems)
                    if repairs > self._settings.max_repairs and not calls:
                        self._warn(WarningCode.TOOL_CALL_INVALID,
                                   f"the model produced unusable tool calls {repairs} times in a row; giving up")
                        ending = StopReason.REPAIR_LIMIT
                elif calls:
                    repairs = 0
                else:
                    ending = outcome.stop_reason  # an answer: no call, nothing wrong
            elif ending is None:
                ending = outcome.stop_reason  # no tools: no parsing at all
            if ending is not None:
                self._turn_end(iteration, ending, 0)
                return ending
            if self._tools is not None and not await self._tools.execute(calls):
                self._turn_end(iteration, StopReason.CANCELLED, len(calls))
                return StopReason.CANCELLED
            self._turn_end(iteration, outcome.stop_reason, len(calls))
        self._warn(WarningCode.MAX_ITERATIONS,
                   f"stopped after {self._settings.max_iterations} model calls (--max-iterations); "
                   "the last tool results were not answered")
        return StopReason.MAX_ITERATIONS

    def _report_generation(self, outcome: GenerationOutcome, grammar: CallGrammar | None) -> None:
        """Warn about what the client would otherwise not know: a cut loop, a call left unconstrained."""
        stats = outcome.stats
        if outcome.stop_reason is StopReason.REPETITION:
            self._warn(WarningCode.REPETITION, "the reply kept repeating itself; it was cut where the loop began")
        if stats is None:
            return
        forced = grammar is not None and not grammar.lazy
        if stats.grammar is GrammarUse.FAILED or (stats.grammar is GrammarUse.UNAVAILABLE and forced):
            self._warn(WarningCode.GRAMMAR_UNAVAILABLE,
                       f"the tool call could not be constrained ({stats.grammar_note}); the reply is free text")

    def _take_reply(self, outcome: GenerationOutcome, reply: ReasoningSplit) -> StopReason | None:
        """Store the reply, its reasoning apart; the stop reason when it ends the run (an error or a cancel)."""
        interrupted = outcome.stop_reason in (StopReason.CANCELLED, StopReason.ERROR)
        if outcome.text or not interrupted:
            reasoning = reply.reasoning.strip()
            content = reply.content.lstrip() if reasoning else reply.content
            self._conversation.append(ChatMessage(role=ChatRole.ASSISTANT, content=content, reasoning=reasoning),
                                      interrupted=interrupted)
        if outcome.stop_reason is StopReason.ERROR:
            error = outcome.error
            self._run.fail(error.code if error else ErrorCode.INTERNAL,
                           error.message if error and error.message else "generation failed",
                           retryable=error.retryable if error else False)
            return StopReason.ERROR
        if outcome.stop_reason is StopReason.CANCELLED or self._run.cancel_requested:
            return StopReason.CANCELLED
        return None

    def _turn_end(self, iteration: int, reason: StopReason, calls: int) -> None:
        self._run.send(TurnFinished(request_id=self._run.request_id, iteration=iteration, stop_reason=reason,
                                    tool_calls=calls))

    def _warn(self, code: WarningCode, message: str) -> None:
        self._run.send(RunWarning(request_id=self._run.request_id, code=code, message=message))


def build_loop(
    *,
    run: ActiveRun,
    conversation: Conversation,
    model: ServedModel,
    formatter: PromptFormatter,
    n_ctx: int,
    counter: TokenCounter,
    sampling: SamplingParams,
    settings: LoopSettings,
    new_id: Callable[[], str],
    tools: Sequence[Tool] = (),
    execution: ToolExecution | None = None,
    tool_choice: ToolChoice = ToolChoice(),
) -> AgentLoop:
    """The loop for one run, its collaborators wired together."""
    calls = ModelCalls(run=run, model=model, new_id=new_id, max_retries=settings.max_generation_retries,
                       keep_snapshots=conversation.continues)
    prompts = PromptBuilder(run=run, conversation=conversation, formatter=formatter, n_ctx=n_ctx, counter=counter,
                            tools=[tool.spec for tool in tools], reply_tokens=sampling.max_tokens,
                            strategy=settings.strategy, summarizer=calls)
    tool_round = constraint = None
    if tools:
        assert execution is not None, "a run with tools needs a way to execute them"
        syntax = call_syntax(formatter)
        tool_round = ToolRound(run=run, conversation=conversation, tools=tools, execution=execution,
                               fenced_results=syntax is FENCED)
        constraint = CallConstraint([tool.spec for tool in tools], syntax, tool_choice)
    return AgentLoop(run=run, conversation=conversation, prompts=prompts, calls=calls, tools=tool_round,
                     sampling=sampling, settings=settings, constraint=constraint,
                     reasoning=guess_reasoning_format(formatter.template_text))

