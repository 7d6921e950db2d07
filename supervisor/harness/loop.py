"""The agent loop: format → generate → parse → gate → execute → append → again.

One `AgentLoop` serves one run on one conversation. Each turn plans the
context (whole turns pruned, pinned messages kept, evicted in chunks so the
prompt's prefix stays stable for the worker's KV cache), renders the prompt,
generates, and — when tools were given — parses the reply for tool calls,
gates and executes each in order, appends the results and goes round again.
It stops at a reply without tool calls, at the iteration ceiling, after too
many unusable tool calls, on cancel, or on an error.

Everything the loop does is visible as events (see protocol/agent_events.py)
and everything it decides is appended to the conversation before it moves on,
so a cancel or a crash leaves the session consistent: a partial reply is kept
and marked interrupted, and no tool call is left without a result.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import msgspec

from bastion.protocol import ErrorCode, SamplingParams, StopReason
from bastion.protocol.agent_events import (
    ContextBudget,
    RunWarning,
    ToolCallParsed,
    ToolDecision,
    ToolDecisionKind,
    ToolEnded,
    ToolOutput,
    ToolStarted,
    TurnFinished,
    TurnStarted,
    WarningCode,
)
from bastion.protocol.control import ContextStrategy
from bastion.protocol.sandbox_wire import (
    ConfinementLevel,
    SandboxedArgs,
    ToolEnvelope,
    ToolLimits,
    ToolStream,
)
from bastion.protocol.sessions import ChatRole
from bastion.supervisor.errors import SupervisorError, WorkerUnavailableError
from bastion.supervisor.harness.context import (
    ContextMessage,
    ContextPlan,
    plan_context,
    summary_message,
    summary_request,
)
from bastion.supervisor.harness.conversation import Conversation
from bastion.supervisor.models.loaded import LoadedModel
from bastion.supervisor.models.tokenizer import TokenCounter
from bastion.supervisor.runs import ActiveRun, Generation, GenerationOutcome
from bastion.supervisor.templates.formatter import ChatMessage
from bastion.supervisor.tools.calls import ParsedCall, parse_tool_calls, repair_hint
from bastion.supervisor.tools.registry import ToolRegistry, ToolSpec, advertise
from bastion.supervisor.tools.sandboxed import is_sandboxed, to_arguments, writable_for
from bastion.supervisor.trust.gate import GateVerdict
from bastion.supervisor.trust.policy.model import NamedToolCall, PolicyCall

log = logging.getLogger(__name__)

_SUMMARY_SAMPLING = SamplingParams(max_tokens=200, temperature=0.2)


class LoopSettings(msgspec.Struct, frozen=True, kw_only=True):
    max_iterations: int = 8
    # Unusable tool calls fed back to the model before the run gives up.
    max_repairs: int = 2
    # Times a model call is asked again after its worker died before any of
    # it reached the client.
    max_generation_retries: int = 1
    strategy: ContextStrategy = ContextStrategy.WINDOW


class ToolGate(Protocol):
    """Decides each call before it runs and records what ran (see trust_gate.py)."""

    async def decide(self, call_id: str, tool: str, call: PolicyCall) -> GateVerdict: ...

    def executed(self, call_id: str, tool: str, call: PolicyCall, envelope: ToolEnvelope) -> None: ...


class ToolRunner(Protocol):
    """Runs a sandboxed call (the supervisor's SandboxPool)."""

    async def run_tool(self, request_id: str, arguments: SandboxedArgs, *, workspace: str, limits: ToolLimits = ...,
                       required_level: ConfinementLevel = ..., writable: bool = ...,
                       on_chunk: Callable[[ToolStream, str], None] | None = ...,
                       cancelled: asyncio.Event | None = ...) -> ToolEnvelope: ...


class Workbench(msgspec.Struct, frozen=True, kw_only=True):
    """Where sandboxed tools act for this run, and how far they may go."""

    workspace: str | None = None
    allow_write: bool = False
    required_level: ConfinementLevel = ConfinementLevel.MINIMAL


class AgentLoop:
    def __init__(
        self,
        *,
        run: ActiveRun,
        model: LoadedModel,
        conversation: Conversation,
        counter: TokenCounter,
        sampling: SamplingParams,
        settings: LoopSettings,
        tools: ToolRegistry,
        tool_specs: Sequence[ToolSpec],
        gate: ToolGate,
        new_id: Callable[[], str],
        sandbox: ToolRunner | None = None,
        workbench: Workbench = Workbench(),
    ) -> None:
        self._run = run
        self._model = model
        self._conversation = conversation
        self._counter = counter
        self._sampling = sampling
        self._settings = settings
        self._tools = tools
        self._specs = {spec.name: spec for spec in tool_specs}
        self._gate = gate
        self._new_id = new_id
        self._sandbox = sandbox
        self._workbench = workbench
        self._call_ids = itertools.count(1)
        self._fallback_reported = False
        self.last_stats = None

    # --- the loop ---------------------------------------------------------

    async def run_turns(self) -> StopReason:
        repairs = 0
        for iteration in range(1, self._settings.max_iterations + 1):
            self._send(TurnStarted(request_id=self._run.request_id, session=self._conversation.name,
                                   iteration=iteration))
            prompt = await self.prepare_prompt()
            outcome = await self._generate(prompt)
            ending, calls, problems = self._take_reply(outcome)
            if ending is not None:
                self._turn_end(iteration, ending, 0)
                return ending
            if problems:
                repairs += 1
                self._record_problems(problems)
                if repairs > self._settings.max_repairs and not calls:
                    self._warn(WarningCode.TOOL_CALL_INVALID,
                               f"the model produced unusable tool calls {repairs} times in a row; giving up")
                    self._turn_end(iteration, StopReason.REPAIR_LIMIT, 0)
                    return StopReason.REPAIR_LIMIT
            else:
                repairs = 0
            if not await self._execute_calls(calls):
                self._turn_end(iteration, StopReason.CANCELLED, len(calls))
                return StopReason.CANCELLED
            self._turn_end(iteration, outcome.stop_reason, len(calls))
        self._warn(WarningCode.MAX_ITERATIONS,
                   f"stopped after {self._settings.max_iterations} model calls (--max-iterations); "
                   "the last tool results were not answered")
        return StopReason.MAX_ITERATIONS

    def _turn_end(self, iteration: int, reason: StopReason, calls: int) -> None:
        self._send(TurnFinished(request_id=self._run.request_id, iteration=iteration, stop_reason=reason,
                                tool_calls=calls))

    # --- context and prompt -----------------------------------------------

    def system_text(self) -> str | None:
        """One system message: the session's latest, how to call tools when the
        template cannot advertise them itself, and summaries of pruned turns.
        It changes only when the session's system message does or turns are
        folded, so it does not disturb the cached prefix from turn to turn."""
        parts = [next((m.message.content for m in reversed(self._conversation.context_messages())
                       if m.message.role is ChatRole.SYSTEM), "")]
        if self._specs and not self._model.formatter.supports_tools:
            parts.append(advertise(list(self._specs.values())))
        parts.extend(summary_message(text).content for text in self._conversation.summaries())
        return "\n\n".join(part for part in parts if part) or None

    def _candidates(self) -> list[ContextMessage]:
        system = self.system_text()
        head = [ContextMessage(seq=0, message=ChatMessage(role=ChatRole.SYSTEM, content=system), pinned=True)]
        rest = [m for m in self._conversation.context_messages() if m.message.role is not ChatRole.SYSTEM]
        return (head if system else []) + rest

    def render(self, messages: list[ChatMessage]) -> str:
        tools = [spec_as_function(spec) for spec in self._specs.values()] if self._specs else None
        return self._model.formatter.render(messages, tools=tools)

    async def _plan(self) -> ContextPlan:
        # The conversation is read here, on the event loop (the store is not
        # shared across threads); rendering and counting go to a thread.
        candidates = self._candidates()
        window_start = self._conversation.window_start()
        n_ctx = self._model.handle.n_ctx
        reserve = min(self._sampling.max_tokens, n_ctx // 2)
        return await asyncio.to_thread(
            plan_context,
            candidates,
            window_start=window_start,
            render=self.render,
            counter=self._counter,
            max_prompt_tokens=n_ctx - reserve,
        )

    async def prepare_prompt(self) -> str:
        plan = await self._plan()
        if plan.window_start != self._conversation.window_start():
            plan = await self._evict(plan)
        self._send(ContextBudget(
            request_id=self._run.request_id, used_tokens=plan.used_tokens, max_tokens=plan.max_prompt_tokens,
            context_size=self._model.handle.n_ctx, messages_kept=len(plan.messages),
            messages_pruned=plan.pruned_messages, strategy=self._settings.strategy.value,
        ))  # fmt: skip
        tools = [spec_as_function(spec) for spec in self._specs.values()] if self._specs else None
        rendered = self._model.formatter.render_detailed(plan.messages, tools=tools)
        if rendered.fallback is not None and not self._fallback_reported:
            self._fallback_reported = True
            self._warn(WarningCode.TEMPLATE_FALLBACK, str(rendered.fallback))
        if tools and self._model.formatter.supports_tools and not rendered.tools_advertised:
            self._warn(WarningCode.TEMPLATE_FALLBACK,
                       "the template that rendered this prompt does not list tools; the model may not see them")
        return rendered.text

    async def _evict(self, plan: ContextPlan) -> ContextPlan:
        if self._settings.strategy is ContextStrategy.SUMMARIZE and plan.pruned_turns:
            pruned = {seq for turn in plan.pruned_turns for seq in turn}
            summary = await self._summarize([m for m in self._candidates() if m.seq in pruned])
            if summary:
                through = max(pruned)
                self._conversation.record_summary(summary, through)
                return await self._plan()
            self._warn(WarningCode.SUMMARY_FAILED, "could not summarise the oldest turns; dropped them instead")
        self._conversation.set_window_start(plan.window_start)
        self._warn(WarningCode.CONTEXT_PRUNED,
                   f"the conversation outgrew the context: {plan.pruned_messages} older messages left the prompt")
        return plan

    async def _summarize(self, folded: Sequence[ContextMessage]) -> str:
        prompt = await asyncio.to_thread(self._summary_prompt, list(folded))
        if prompt is None:
            return ""
        try:
            outcome = await self._call_model(prompt, _SUMMARY_SAMPLING, f"{self._conversation.name}#summary",
                                             stream=False)
        except SupervisorError as exc:  # a busy or dying worker: fall back to the window
            log.warning("summary not possible: %s", exc.message)
            return ""
        if outcome.stop_reason not in (StopReason.STOP, StopReason.LENGTH):
            log.warning("summary generation ended %s: %s", outcome.stop_reason.value, outcome.error_message)
            return ""
        return outcome.text.strip()

    def _summary_prompt(self, folded: list[ContextMessage]) -> str | None:
        """The summary call's prompt, fitted into the context with room for the
        summary: the turns being folded are the ones that did not fit, so the
        oldest of them give way first."""
        limit = self._model.handle.n_ctx - _SUMMARY_SAMPLING.max_tokens
        while folded:
            prompt = self._model.formatter.render(summary_request(folded))
            if self._counter.count(prompt) <= limit:
                return prompt
            folded = folded[1:]
        return None

    # --- generation -------------------------------------------------------

    async def _generate(self, prompt: str) -> GenerationOutcome:
        try:
            outcome = await self._call_model(prompt, self._sampling, self._conversation.name, stream=True)
        except WorkerUnavailableError as exc:  # failed, unloaded, or not back from a restart in time
            outcome = GenerationOutcome(text="", stop_reason=StopReason.ERROR, tokens=0, error_code=exc.code,
                                        error_message=exc.message, error_retryable=exc.retryable)
        self.last_stats = outcome.stats
        return outcome

    async def _call_model(self, prompt: str, sampling: SamplingParams, session_id: str, *,
                          stream: bool) -> GenerationOutcome:
        """One model call. If its worker dies before any of it reached the
        client (a hidden call never reaches it), it is asked again once the
        model's restarted worker is ready: the client sees a warning, not an
        error. Past `max_generation_retries`, the death is the outcome."""
        retries = 0
        while True:
            # Only a stored session has a next turn to restore a KV snapshot for.
            keep_snapshot = stream and self._conversation.continues
            generation = Generation(internal_id=self._new_id(), session_id=session_id, prompt=prompt,
                                    sampling=sampling, run=self._run, stream=stream, snapshot=keep_snapshot)
            outcome = await self._attempt(generation)
            died = outcome.error_code in (ErrorCode.WORKER_DIED, ErrorCode.WORKER_UNRESPONSIVE)
            unseen = generation.tokens_streamed == 0 or not stream
            out_of_retries = retries >= self._settings.max_generation_retries
            if not (died and unseen) or out_of_retries or self._run.cancel_requested:
                return outcome
            retries += 1
            why = outcome.error_message.splitlines()[0] if outcome.error_message else "its worker died"
            self._warn(WarningCode.GENERATION_RETRIED, f"{why}; asking again once the model is back "
                                                       f"(retry {retries} of {self._settings.max_generation_retries})")

    async def _attempt(self, generation: Generation) -> GenerationOutcome:
        """Submit `generation` once a worker serves the model (waiting through
        a restart), and wait for it or for the run's cancel."""
        self._run.current = generation
        cancelled = asyncio.ensure_future(self._run.cancelled.wait())
        serving = asyncio.ensure_future(self._model.serving())
        try:
            await asyncio.wait({serving, cancelled}, return_when=asyncio.FIRST_COMPLETED)
            if not serving.done():
                return GenerationOutcome(text="", stop_reason=StopReason.CANCELLED, tokens=0)
            handle = serving.result()
            handle.submit(generation)
            await asyncio.wait({generation.outcome, cancelled}, return_when=asyncio.FIRST_COMPLETED)
            if not generation.done:
                handle.cancel(generation)
            return await generation.outcome
        finally:
            serving.cancel()
            cancelled.cancel()
            self._run.current = None

    def _take_reply(self, outcome: GenerationOutcome):
        """Store the reply; return (ending, calls, problems): an ending stops the run."""
        interrupted = outcome.stop_reason in (StopReason.CANCELLED, StopReason.ERROR)
        if outcome.text or not interrupted:
            self._conversation.append(ChatMessage(role=ChatRole.ASSISTANT, content=outcome.text),
                                      interrupted=interrupted)
        if outcome.stop_reason is StopReason.ERROR:
            self._run.fail(outcome.error_code or ErrorCode.INTERNAL, outcome.error_message or "generation failed",
                           retryable=outcome.error_retryable)
            return StopReason.ERROR, [], []
        if outcome.stop_reason is StopReason.CANCELLED or self._run.cancel_requested:
            return StopReason.CANCELLED, [], []
        if not self._specs:
            return outcome.stop_reason, [], []  # no tools: no parsing at all
        parsed = parse_tool_calls(outcome.text, self._specs)
        if not parsed.calls and not parsed.problems:
            return outcome.stop_reason, [], []
        return None, parsed.calls, parsed.problems

    # --- tools ------------------------------------------------------------

    def _record_problems(self, problems) -> None:
        for problem in problems:
            self._warn(WarningCode.TOOL_CALL_INVALID, problem.message)
        self._conversation.append(
            ChatMessage(role=ChatRole.TOOL, content=repair_hint(problems), tool_name=problems[0].name or "error")
        )

    async def _execute_calls(self, calls: Sequence[ParsedCall]) -> bool:
        """Run each call in order; False when the run was cancelled between them.
        Every call gets a result message, run or not, so no call is left dangling."""
        for index, call in enumerate(calls):
            call_id = f"call_{next(self._call_ids)}"
            arguments = msgspec.json.encode(call.arguments).decode()
            self._send(ToolCallParsed(request_id=self._run.request_id, call_id=call_id, name=call.name,
                                      arguments=arguments, format=call.format.value))
            if self._run.cancel_requested:
                for skipped in calls[index:]:
                    self._append_result(skipped.name, "not run: the run was cancelled")
                return False
            policy_call = to_arguments(call.name, call.arguments) if is_sandboxed(call.name) \
                else NamedToolCall(name=call.name)
            verdict = await self._gate.decide(call_id, call.name, policy_call)
            self._send(ToolDecision(request_id=self._run.request_id, call_id=call_id, decision=verdict.decision,
                                    reason=verdict.reason))
            if verdict.decision is not ToolDecisionKind.ALLOW:
                content = f"not run: {verdict.decision.value} ({verdict.reason})"
                self._send(ToolEnded(request_id=self._run.request_id, call_id=call_id, name=call.name, ok=False,
                                     content=content))
                self._append_result(call.name, content)
                continue
            self._send(ToolStarted(request_id=self._run.request_id, call_id=call_id, name=call.name))
            envelope = await self._run_call(call_id, call, policy_call)
            self._gate.executed(call_id, call.name, policy_call, envelope)
            self._send(ToolEnded(request_id=self._run.request_id, call_id=call_id, name=call.name, ok=envelope.ok,
                                 content=envelope.content, duration_ms=envelope.duration_ms))
            self._append_result(call.name, envelope.content if envelope.ok else f"error: {envelope.content}")
        return not self._run.cancel_requested

    async def _run_call(self, call_id: str, call: ParsedCall, policy_call: PolicyCall) -> ToolEnvelope:
        if isinstance(policy_call, NamedToolCall):
            started = time.perf_counter()
            result = await asyncio.to_thread(self._tools.execute, call.name, call.arguments)
            self._send(ToolOutput(request_id=self._run.request_id, call_id=call_id, text=result.content))
            return ToolEnvelope(ok=result.ok, content=result.content,
                                duration_ms=round((time.perf_counter() - started) * 1000, 3))
        if self._sandbox is None or self._workbench.workspace is None:
            return ToolEnvelope(ok=False, content="no sandbox is available for this run")

        def chunk(_stream: ToolStream, text: str) -> None:
            self._send(ToolOutput(request_id=self._run.request_id, call_id=call_id, text=text))

        writable = writable_for(call.name, allow_write=self._workbench.allow_write)
        return await self._sandbox.run_tool(
            f"{self._run.request_id}:{call_id}", policy_call, workspace=self._workbench.workspace,
            required_level=self._workbench.required_level, writable=writable, on_chunk=chunk,
            cancelled=self._run.cancelled,
        )  # fmt: skip

    def _append_result(self, name: str, content: str) -> None:
        self._conversation.append(ChatMessage(role=ChatRole.TOOL, content=content, tool_name=name))

    # --- events -----------------------------------------------------------

    def _send(self, event) -> None:
        self._run.send(event)

    def _warn(self, code: WarningCode, message: str) -> None:
        self._send(RunWarning(request_id=self._run.request_id, code=code, message=message))


def spec_as_function(spec: ToolSpec) -> dict:
    """A tool as chat templates with a `tools` variable expect it (OpenAI style)."""
    return {"type": "function",
            "function": {"name": spec.name, "description": spec.description, "parameters": spec.parameters}}
