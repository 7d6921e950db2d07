"""Serving a `run`: pick the conversation, tools and model, then drive the agent loop.

    run {prompt, model, session, tools, trust flags, sampling, ...}
        → load_progress* → run_start → (turn and tool events, tokens)* → run_end
        (an `error` precedes a run_end whose reason is `error`)

`RunService.serve` is the whole life of one run after the core accepted it:
resolve the session (created on first use, one active run at a time), pick
the tools its flags allow (file and shell tools need a workspace and a sandbox
strong enough for them), load the model (progress events while it loads), append
the new user message, and hand over to the agent loop. It ends the run exactly
once: with the loop's stop reason, or with the typed error that stopped it.
Stored sessions get a run record, closed with the stop reason and token figures.

`next_prompt` renders what a session's next generation would receive
(`sessions show --prompt`) without generating anything.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from bastion.protocol import ErrorCode, StopReason
from bastion.protocol.agent_events import PromptRendered
from bastion.protocol.control import Run, RunStarted, ToolChoiceMode
from bastion.protocol.sessions import ChatRole
from bastion.supervisor.control.model_access import ModelAccess, with_template
from bastion.supervisor.errors import (
    InvalidRequestError,
    SessionBusyError,
    SupervisorError,
    TrustFlagError,
    UnknownSessionError,
)
from bastion.supervisor.harness.completion import ReplyMemory, chat_messages
from bastion.supervisor.harness.constraints import FENCED, call_syntax
from bastion.supervisor.harness.conversation import Conversation, EphemeralConversation, StoredConversation
from bastion.supervisor.harness.loop import AgentLoop, LoopSettings, build_loop
from bastion.supervisor.harness.prompt_builder import PromptBuilder, latest_system
from bastion.supervisor.harness.tool_execution import ToolExecution, Workbench
from bastion.supervisor.models.loaded import LoadedModels
from bastion.supervisor.models.registry import ModelSpec, RegistryWatcher
from bastion.supervisor.models.sampling import resolve as resolve_sampling
from bastion.supervisor.models.tokenizer import TokenCounter, TokenCounters
from bastion.supervisor.runs import ActiveRun
from bastion.supervisor.store.sessions import SessionStore
from bastion.supervisor.templates.formatter import ChatMessage, PromptFormatter
from bastion.supervisor.tools.registry import SandboxTool, Tool, ToolRegistry
from bastion.supervisor.trust.gate import Trust

log = logging.getLogger(__name__)


class RunService:
    def __init__(
        self,
        *,
        registry: RegistryWatcher,
        models: LoadedModels,
        store: SessionStore,
        tools: ToolRegistry,
        counters: TokenCounters,
        trust: Trust,
        new_id: Callable[[], str],
    ) -> None:
        self._registry = registry
        self._models = models
        self._store = store
        self._tools = tools
        self._counters = counters
        self._trust = trust
        self._new_id = new_id
        self._access = ModelAccess(models=models, counters=counters)
        self._busy_sessions: dict[str, ActiveRun] = {}

    async def serve(self, run: ActiveRun, request: Run) -> None:
        try:
            await self._serve(run, request)
        except SupervisorError as exc:
            busy = exc.code is ErrorCode.BUSY
            run.fail(exc.code, exc.message, retryable=busy, retry_after_ms=1000 if busy else None)
        except Exception as exc:  # a bug must end the run, not leave the client waiting
            log.exception("run %s failed", run.request_id)
            run.fail(ErrorCode.INTERNAL, f"internal error: {exc}")

    def busy_sessions(self) -> set[str]:
        return set(self._busy_sessions)

    async def _serve(self, run: ActiveRun, request: Run) -> None:
        self._claim_session(run, request.session)
        spec = self._registry.current().lookup(self._model_name(request))
        run.model = spec.name
        tools, workbench = await self._select_tools(request)
        loaded = await self._access.load_unless_cancelled(run, spec, request.keep_alive_s)
        if loaded is None:
            run.finish(StopReason.CANCELLED)
            return
        formatter = with_template(loaded, request.template)
        sampling, sampling_source = resolve_sampling(request.sampling, loaded.sampling)
        # A session remembers what to look up again (a name, a path, scripted:FILE).
        conversation = self._conversation(request, request.model or spec.name, formatter)
        counter = await self._access.counter(loaded)
        gate = self._trust.gate(run, conversation.name, workbench.workspace, request.approval_timeout_s)
        execution = ToolExecution(run=run, gate=gate, registry=self._tools, sandbox=self._trust.sandboxes,
                                  workbench=workbench)
        loop = build_loop(
            run=run, conversation=conversation, model=loaded, formatter=formatter, n_ctx=loaded.handle.n_ctx,
            counter=counter, sampling=sampling, new_id=self._new_id, tools=tools, execution=execution,
            settings=LoopSettings(max_iterations=request.max_iterations, strategy=request.context_strategy),
            tool_choice=request.tool_choice,
        )  # fmt: skip
        if request.system and latest_system(conversation) != request.system:
            conversation.append(ChatMessage(role=ChatRole.SYSTEM, content=request.system), pinned=True)
        conversation.append(ChatMessage(role=ChatRole.USER, content=request.prompt))
        run.send(RunStarted(request_id=run.request_id, model=spec.name, worker_pid=loaded.handle.pid,
                            template=formatter.source, sampling=sampling, sampling_source=sampling_source))
        if request.show_prompt:
            await self._show_prompt(run, spec, loop, counter, formatter)
            return
        await self._run_recorded(run, request.session, spec, loop)

    def _claim_session(self, run: ActiveRun, session: str | None) -> None:
        if session is None:
            return
        if session in self._busy_sessions:
            raise SessionBusyError(f"session {session!r} is answering another request; try again when it ends")
        self._busy_sessions[session] = run
        run.finished.add_done_callback(lambda _f: self._busy_sessions.pop(session, None))

    def _model_name(self, request: Run) -> str | None:
        """The model asked for; for a session that names none, the one it last used."""
        if request.model is None and request.session is not None:
            existing = self._store.get_session(request.session)
            return existing.model if existing else None
        return request.model

    async def _show_prompt(self, run: ActiveRun, spec: ModelSpec, loop: AgentLoop, counter: TokenCounter,
                           formatter: PromptFormatter) -> None:
        prompt = await loop.prompts.next_prompt()
        tokens = await asyncio.to_thread(counter.count, prompt)
        run.send(PromptRendered(request_id=run.request_id, model=spec.name, template=formatter.source,
                                prompt=prompt, tokens=tokens, departures=formatter.departures))
        run.finish(StopReason.STOP)

    async def _run_recorded(self, run: ActiveRun, session: str | None, spec: ModelSpec, loop: AgentLoop) -> None:
        run_id = self._store.start_run(session, run.request_id, spec.name) if session else None
        reason = StopReason.ERROR
        try:
            reason = await loop.run_turns()
        finally:
            if run_id is not None:
                stats = loop.last_stats
                self._store.finish_run(
                    run_id, reason,
                    prompt_tokens=stats.prompt_tokens if stats else 0,
                    cached_tokens=stats.cached_tokens if stats else 0,
                    completion_tokens=stats.completion_tokens if stats else 0,
                )  # fmt: skip
        run.finish(reason)

    async def _select_tools(self, request: Run) -> tuple[list[Tool], Workbench]:
        """The tools this run offers the model, after the trust flags; sandboxed
        ones need a workspace and a sandbox strong enough for them."""
        tools = self._tools.for_run(request.tools, allow_shell=request.allow_shell, allow_write=request.allow_write)
        if request.tool_choice.mode is ToolChoiceMode.NONE:
            return [], Workbench()  # offered nothing: nothing is parsed, nothing runs
        sandboxed = [tool.record for tool in tools if isinstance(tool, SandboxTool)]
        if not sandboxed:
            return tools, Workbench()
        workspace = Path(request.workspace or "")
        if not request.workspace or not workspace.is_absolute() or not workspace.is_dir():
            raise TrustFlagError(f"file and shell tools need an existing workspace directory, not {workspace!s}")
        await self._trust.require_confinement(sandboxed)
        return tools, Workbench(workspace=str(workspace), allow_write=request.allow_write)

    def _conversation(self, request: Run, model_key: str, formatter: PromptFormatter) -> Conversation:
        if request.session is None:
            conversation = EphemeralConversation(f"oneshot-{request.request_id}")
            syntax = call_syntax(formatter)
            for earlier in chat_messages(request.history, ReplyMemory(), syntax, fenced_results=syntax is FENCED):
                conversation.append(earlier, pinned=earlier.role is ChatRole.SYSTEM)
            return conversation
        if request.history:
            raise InvalidRequestError("a run in a session continues the session's own history: send no history")
        self._store.ensure_session(request.session, model_key)
        if request.model is not None:
            self._store.set_model(request.session, model_key)
        stored = StoredConversation(self._store, request.session)
        if request.show_prompt:
            # Show what the next generation would see without storing the prompt.
            preview = EphemeralConversation(request.session)
            for message in stored.context_messages():
                preview.append(message.message, pinned=message.pinned)
            preview.set_window_start(stored.window_start())
            return preview
        return stored

    async def next_prompt(self, name: str) -> str:
        """The exact prompt the session's next generation would receive (`sessions show --prompt`)."""
        summary = self._store.get_session(name)
        if summary is None:
            raise UnknownSessionError(f"no session named {name!r}")
        spec = self._registry.current().lookup(summary.model)
        loaded, _ = await self._models.ensure_loaded(spec, lambda *_: None)
        counter = await self._access.counter(loaded)
        preview = ActiveRun(request_id="preview", client=b"", sink=_nowhere)
        builder = PromptBuilder(run=preview, conversation=StoredConversation(self._store, name),
                                formatter=loaded.formatter, n_ctx=loaded.handle.n_ctx, counter=counter)
        return await builder.next_prompt()


def _nowhere(_client: bytes, _event: object) -> None:
    """Events of a prompt preview: nobody is listening."""
