"""The next prompt of a run: which messages it holds, and their text.

`PromptBuilder.next_prompt` plans the context before every model call (whole
turns pruned down to the budget, pinned messages kept, evicted in chunks so
the prompt's prefix stays stable for the worker's KV cache; see context.py),
optionally folds the pruned turns into a summary (one hidden model call),
reports the budget (`context_budget`) and renders the prompt with the model's
template, warning once when a built-in had to stand in for it.

It owns the single system message a prompt starts with: the session's latest
system message, how to call the tools when the template cannot list them
itself, and the summaries of pruned turns. That message changes only when the
session's system message does or turns are folded, so it does not disturb the
cached prefix from turn to turn.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from bastion.protocol import SamplingParams, StopReason
from bastion.protocol.agent_events import ContextBudget, ContextStrategy, RunWarning, WarningCode
from bastion.protocol.sessions import ChatRole
from bastion.supervisor.errors import SupervisorError
from bastion.supervisor.harness.context import (
    ContextMessage,
    ContextPlan,
    plan_context,
    summary_message,
    summary_request,
)
from bastion.supervisor.harness.conversation import Conversation
from bastion.supervisor.harness.model_calls import ModelCalls
from bastion.supervisor.models.tokenizer import TokenCounter
from bastion.supervisor.runs import ActiveRun
from bastion.supervisor.templates.formatter import ChatMessage, PromptFormatter
from bastion.supervisor.tools.registry import ToolSpec, advertise

log = logging.getLogger(__name__)

SUMMARY_SAMPLING = SamplingParams(max_tokens=200, temperature=0.2)


def spec_as_function(spec: ToolSpec) -> dict[str, Any]:
    """A tool as chat templates with a `tools` variable expect it (OpenAI style)."""
    return {"type": "function",
            "function": {"name": spec.name, "description": spec.description, "parameters": spec.parameters}}


class PromptBuilder:
    def __init__(
        self,
        *,
        run: ActiveRun,
        conversation: Conversation,
        formatter: PromptFormatter,
        n_ctx: int,
        counter: TokenCounter,
        tools: Sequence[ToolSpec] = (),
        reply_tokens: int = SamplingParams().max_tokens,
        strategy: ContextStrategy = ContextStrategy.WINDOW,
        summarizer: ModelCalls | None = None,
    ) -> None:
        self._run = run
        self._conversation = conversation
        self._formatter = formatter
        self._n_ctx = n_ctx
        self._counter = counter
        self._specs = list(tools)
        self._functions = [spec_as_function(spec) for spec in self._specs] or None
        # Room kept for the reply, never more than half the context.
        self._reserve = min(reply_tokens, n_ctx // 2)
        self._strategy = strategy
        self._summarizer = summarizer
        self._fallback_reported = False

    async def next_prompt(self) -> str:
        plan = await self._plan()
        if plan.window_start != self._conversation.window_start():
            plan = await self._evict(plan)
        self._run.send(ContextBudget(
            request_id=self._run.request_id, used_tokens=plan.used_tokens, max_tokens=plan.max_prompt_tokens,
            context_size=self._n_ctx, messages_kept=len(plan.messages), messages_pruned=plan.pruned_messages,
            strategy=self._strategy, counting=self._counter.counting,
        ))  # fmt: skip
        rendered = self._formatter.render_detailed(plan.messages, tools=self._functions)
        if rendered.fallback is not None and not self._fallback_reported:
            self._fallback_reported = True
            self._warn(WarningCode.TEMPLATE_FALLBACK, str(rendered.fallback))
        if self._functions and self._formatter.supports_tools and not rendered.tools_advertised:
            self._warn(WarningCode.TEMPLATE_FALLBACK,
                       "the template that rendered this prompt does not list tools; the model may not see them")
        return rendered.text

    def system_text(self) -> str | None:
        parts = [latest_system(self._conversation) or ""]
        if self._specs and not self._formatter.supports_tools:
            parts.append(advertise(self._specs))
        parts.extend(summary_message(text).content for text in self._conversation.summaries())
        return "\n\n".join(part for part in parts if part) or None

    # --- planning ---------------------------------------------------------

    def _candidates(self) -> list[ContextMessage]:
        system = self.system_text()
        rest = [m for m in self._conversation.context_messages() if m.message.role is not ChatRole.SYSTEM]
        if not system:
            return rest
        head = ContextMessage(seq=0, message=ChatMessage(role=ChatRole.SYSTEM, content=system), pinned=True)
        return [head, *rest]

    def _render(self, messages: list[ChatMessage]) -> str:
        return self._formatter.render(messages, tools=self._functions)

    async def _plan(self) -> ContextPlan:
        # The conversation is read here, on the event loop (the store is not
        # shared across threads); rendering and counting go to a thread.
        candidates = self._candidates()
        window_start = self._conversation.window_start()
        return await asyncio.to_thread(
            plan_context, candidates, window_start=window_start, render=self._render, counter=self._counter,
            max_prompt_tokens=self._n_ctx - self._reserve,
        )  # fmt: skip

    async def _evict(self, plan: ContextPlan) -> ContextPlan:
        if self._strategy is ContextStrategy.SUMMARIZE and plan.pruned_turns:
            pruned = {seq for turn in plan.pruned_turns for seq in turn}
            summary = await self._summarize([m for m in self._candidates() if m.seq in pruned])
            if summary:
                self._conversation.record_summary(summary, max(pruned))
                return await self._plan()
            self._warn(WarningCode.SUMMARY_FAILED, "could not summarise the oldest turns; dropped them instead")
        self._conversation.set_window_start(plan.window_start)
        self._warn(WarningCode.CONTEXT_PRUNED,
                   f"the conversation outgrew the context: {plan.pruned_messages} older messages left the prompt")
        return plan

    # --- summaries --------------------------------------------------------

    async def _summarize(self, folded: Sequence[ContextMessage]) -> str:
        if self._summarizer is None:
            return ""
        prompt = await asyncio.to_thread(self._summary_prompt, list(folded))
        if prompt is None:
            return ""
        try:
            outcome = await self._summarizer.generate(prompt, SUMMARY_SAMPLING, f"{self._conversation.name}#summary",
                                                      stream=False)
        except SupervisorError as exc:  # a busy worker: fall back to the window
            log.warning("summary not possible: %s", exc.message)
            return ""
        if outcome.stop_reason not in (StopReason.STOP, StopReason.LENGTH):
            log.warning("summary generation ended %s: %s", outcome.stop_reason.value,
                        outcome.error.message if outcome.error else "")
            return ""
        return outcome.text.strip()

    def _summary_prompt(self, folded: list[ContextMessage]) -> str | None:
        """The summary call's prompt, fitted into the context with room for the
        summary: the turns being folded are the ones that did not fit, so the
        oldest of them give way first."""
        limit = self._n_ctx - SUMMARY_SAMPLING.max_tokens
        while folded:
            prompt = self._formatter.render(summary_request(folded))
            if self._counter.count(prompt) <= limit:
                return prompt
            folded = folded[1:]
        return None

    def _warn(self, code: WarningCode, message: str) -> None:
        self._run.send(RunWarning(request_id=self._run.request_id, code=code, message=message))


def latest_system(conversation: Conversation) -> str | None:
    """The session's latest system message, if it has one."""
    return next((m.message.content for m in reversed(conversation.context_messages())
                 if m.message.role is ChatRole.SYSTEM), None)  # fmt: skip
