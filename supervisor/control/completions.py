"""Serving a `complete`: one model call over a conversation an API client holds.

    complete {messages | prompt, model, tools, tool_choice, response_format, sampling}
        → load_progress* → run_start → (token | reasoning)* → generation_stats
          → tool_call* → warning* → run_end
        (an `error` precedes a run_end whose reason is `error`)

`CompletionService.serve` resolves and loads the model, turns the client's
messages into the conversation the template renders (harness/completion.py),
and makes the call. Nothing is stored and nothing runs: the client executes
the calls it gets back. The service keeps the replies that held calls
(`ReplyMemory`) for as long as clients are likely to send them back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from bastion.protocol import ErrorCode, StopReason
from bastion.protocol.completion import Complete
from bastion.protocol.control import RunStarted, ToolChoiceMode
from bastion.supervisor.control.model_access import ModelAccess, with_template
from bastion.supervisor.errors import InvalidRequestError, SupervisorError
from bastion.supervisor.harness.completion import (
    Completion,
    ReplyMemory,
    chat_messages,
    client_tool,
    conversation_key,
)
from bastion.supervisor.harness.constraints import FENCED, call_syntax
from bastion.supervisor.harness.conversation import EphemeralConversation
from bastion.supervisor.harness.model_calls import ModelCalls
from bastion.supervisor.harness.prompt_builder import PromptBuilder
from bastion.supervisor.models.loaded import LoadedModels
from bastion.supervisor.models.registry import RegistryWatcher
from bastion.supervisor.models.sampling import resolve as resolve_sampling
from bastion.supervisor.models.tokenizer import TokenCounters
from bastion.supervisor.runs import ActiveRun
from bastion.supervisor.tools.reasoning import guess_reasoning_format

log = logging.getLogger(__name__)

# More messages or tools than this in one request is a client bug, not a conversation.
MAX_MESSAGES = 4096
MAX_TOOLS = 128


class CompletionService:
    def __init__(
        self,
        *,
        registry: RegistryWatcher,
        models: LoadedModels,
        counters: TokenCounters,
        new_id: Callable[[], str],
    ) -> None:
        self._registry = registry
        self._access = ModelAccess(models=models, counters=counters)
        self._new_id = new_id
        self._memory = ReplyMemory()

    async def serve(self, run: ActiveRun, request: Complete) -> None:
        try:
            await self._serve(run, request)
        except SupervisorError as exc:
            busy = exc.code is ErrorCode.BUSY
            run.fail(exc.code, exc.message, retryable=busy or exc.retryable, retry_after_ms=1000 if busy else None)
        except Exception as exc:  # a bug must end the request, not leave the client waiting
            log.exception("completion %s failed", run.request_id)
            run.fail(ErrorCode.INTERNAL, f"internal error: {exc}")

    async def _serve(self, run: ActiveRun, request: Complete) -> None:
        _check(request)
        spec = self._registry.current().lookup(request.model)
        run.model = spec.name
        offered = request.tool_choice.mode is not ToolChoiceMode.NONE
        tools = [client_tool(tool) for tool in request.tools] if offered else []
        loaded = await self._access.load_unless_cancelled(run, spec, request.keep_alive_s)
        if loaded is None:
            run.finish(StopReason.CANCELLED)
            return
        formatter = with_template(loaded, request.template)
        sampling, sampling_source = resolve_sampling(request.sampling, loaded.sampling)
        calls = ModelCalls(run=run, model=loaded, new_id=self._new_id, keep_snapshots=request.prompt is None)
        syntax = call_syntax(formatter) if tools else FENCED
        if request.prompt is not None:
            completion = Completion(run=run, calls=calls, sampling=sampling, memory=self._memory,
                                    session_id=conversation_key(spec.name, ()), raw_prompt=request.prompt)
        else:
            key = conversation_key(spec.name, request.messages)
            conversation = EphemeralConversation(key)
            for message in chat_messages(request.messages, self._memory, syntax, fenced_results=syntax is FENCED,
                                         conversation=key):
                conversation.append(message)
            prompts = PromptBuilder(run=run, conversation=conversation, formatter=formatter,
                                    n_ctx=loaded.handle.n_ctx, counter=await self._access.counter(loaded),
                                    tools=tools, reply_tokens=sampling.max_tokens)
            completion = Completion(
                run=run, calls=calls, sampling=sampling, memory=self._memory, session_id=key, prompts=prompts,
                tools=tools, syntax=syntax, tool_choice=request.tool_choice, response_format=request.response_format,
                reasoning=guess_reasoning_format(formatter.template_text),
            )  # fmt: skip
        run.send(RunStarted(request_id=run.request_id, model=spec.name, worker_pid=loaded.handle.pid,
                            template="raw" if request.prompt is not None else formatter.source,
                            sampling=sampling, sampling_source=sampling_source))
        reason = await completion.complete()
        run.finish(reason)


def _check(request: Complete) -> None:
    if request.prompt is None and not request.messages:
        raise InvalidRequestError("a completion needs messages (or a raw prompt)")
    if request.prompt is not None and (request.messages or request.tools):
        raise InvalidRequestError("a raw prompt goes alone: no messages and no tools with it")
    if len(request.messages) > MAX_MESSAGES:
        raise InvalidRequestError(f"{len(request.messages)} messages; at most {MAX_MESSAGES} in one request")
    if len(request.tools) > MAX_TOOLS:
        raise InvalidRequestError(f"{len(request.tools)} tools; at most {MAX_TOOLS} in one request")
    forced = request.tool_choice.mode in (ToolChoiceMode.REQUIRED, ToolChoiceMode.FUNCTION)
    if forced and not request.tools:
        raise InvalidRequestError(f"tool choice {request.tool_choice.mode.value} needs tools to choose from")
    names = [tool.name for tool in request.tools]
    if len(set(names)) != len(names):
        raise InvalidRequestError(f"tool names must be unique: {', '.join(names)}")
