"""Serving a `Run`: pick the conversation and model, then drive the agent loop.

`RunService.serve` is the whole life of one run after the core accepted it:
resolve the session (created on first use, one active run at a time), load
the model (progress events while it loads), append the new user message,
and hand over to `AgentLoop`. It ends the run exactly once: with the loop's
stop reason, or with the typed error that stopped it. Stored sessions get a
run record, closed with the stop reason and token figures.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from bastion.protocol import ErrorCode, SamplingParams, StopReason
from bastion.protocol.agent_events import PromptRendered
from bastion.protocol.control import LoadStage, Run, RunStarted
from bastion.protocol.sandbox_wire import level_reaches, strictest_level
from bastion.protocol.sessions import ChatRole
from bastion.supervisor.errors import (
    SessionBusyError,
    SupervisorError,
    TrustFlagError,
    UnknownSessionError,
    UnknownToolError,
)
from bastion.supervisor.harness.conversation import Conversation, EphemeralConversation, StoredConversation
from bastion.supervisor.harness.loop import AgentLoop, LoopSettings, Workbench
from bastion.supervisor.models.loaded import LoadedModel, LoadedModels
from bastion.supervisor.models.registry import ModelSpec, RegistryWatcher
from bastion.supervisor.models.sources import ScriptedReplies
from bastion.supervisor.models.tokenizer import ByteTokenCounter, TokenCounter, TokenCounters
from bastion.supervisor.runs import ActiveRun
from bastion.supervisor.store.sessions import SessionStore
from bastion.supervisor.templates.formatter import ChatMessage, PromptFormatter
from bastion.supervisor.tools.registry import ToolRegistry, ToolSpec
from bastion.supervisor.tools.sandboxed import REQUIRED_LEVEL, SANDBOXED, expand_selection, is_sandboxed
from bastion.supervisor.trust.gate import Trust

log = logging.getLogger(__name__)

ProgressFactory = Callable[[bytes, str, str], Callable[[LoadStage, int, int], None]]


class RunService:
    def __init__(
        self,
        *,
        registry: RegistryWatcher,
        models: LoadedModels,
        store: SessionStore,
        tools: ToolRegistry,
        counters: TokenCounters,
        progress: ProgressFactory,
        new_id: Callable[[], str],
        trust: Trust,
    ) -> None:
        self._trust = trust
        self._registry = registry
        self._models = models
        self._store = store
        self._tools = tools
        self._counters = counters
        self._progress = progress
        self._new_id = new_id
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

    async def _serve(self, run: ActiveRun, request: Run) -> None:
        session = request.session
        if session is not None:
            if session in self._busy_sessions:
                raise SessionBusyError(f"session {session!r} is answering another request; try again when it ends")
            self._busy_sessions[session] = run
            run.finished.add_done_callback(lambda _f: self._busy_sessions.pop(session, None))
        spec_name = request.model
        if session is not None and spec_name is None:
            existing = self._store.get_session(session)
            spec_name = existing.model if existing else None
        spec = self._registry.current().lookup(spec_name)
        run.model = spec.name
        tool_specs, workbench = await self._select_tools(request)
        loaded = await self._load_unless_cancelled(run, spec, request.keep_alive_s)
        if loaded is None:
            run.finish(StopReason.CANCELLED)
            return
        model = with_template(loaded, request.template)
        # A session remembers what to look up again (a name, a path, scripted:FILE).
        conversation = self._conversation(request, request.model or spec.name)
        counter = await self._counter(loaded)
        gate = self._trust.gate(run, conversation.name, workbench.workspace, request.approval_timeout_s)
        loop = AgentLoop(
            run=run, model=model, conversation=conversation, counter=counter, sampling=request.sampling,
            settings=LoopSettings(max_iterations=request.max_iterations, strategy=request.context_strategy),
            tools=self._tools, tool_specs=tool_specs, gate=gate, new_id=self._new_id,
            sandbox=self._trust.sandboxes, workbench=workbench,
        )  # fmt: skip
        if request.system and _latest_system(conversation) != request.system:
            conversation.append(ChatMessage(role=ChatRole.SYSTEM, content=request.system), pinned=True)
        conversation.append(ChatMessage(role=ChatRole.USER, content=request.prompt))
        run.send(RunStarted(request_id=run.request_id, model=spec.name, worker_pid=loaded.handle.pid,
                            template=model.formatter.source))
        if request.show_prompt:
            prompt = await loop.prepare_prompt()
            tokens = await asyncio.to_thread(counter.count, prompt)
            run.send(PromptRendered(request_id=run.request_id, model=spec.name, template=model.formatter.source,
                                    prompt=prompt, tokens=tokens))
            run.finish(StopReason.STOP)
            return
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
                )
        run.finish(reason)

    def busy_sessions(self) -> set[str]:
        return set(self._busy_sessions)

    async def _select_tools(self, request: Run) -> tuple[list[ToolSpec], Workbench]:
        """The tools this run offers the model, after the trust flags; sandboxed
        ones need a workspace and a sandbox strong enough for them."""
        names = expand_selection(request.tools, allow_shell=request.allow_shell, allow_write=request.allow_write)
        unknown = [name for name in names if not is_sandboxed(name) and name not in self._tools.names()]
        if unknown:
            available = sorted({*self._tools.names(), *SANDBOXED, "files"})
            raise UnknownToolError(f"unknown tool(s): {', '.join(unknown)}; available: {', '.join(available)}")
        specs = [SANDBOXED[name] if is_sandboxed(name) else self._tools.get(name) for name in names]
        sandboxed = [name for name in names if is_sandboxed(name)]
        if not sandboxed:
            return specs, Workbench()
        workspace = Path(request.workspace or "")
        if not request.workspace or not workspace.is_absolute() or not workspace.is_dir():
            raise TrustFlagError(f"file and shell tools need an existing workspace directory, not {workspace!s}")
        report = await self._trust.sandboxes.diagnose()
        required = strictest_level(REQUIRED_LEVEL[name] for name in sandboxed)
        if not level_reaches(report.level, required):
            raise TrustFlagError(
                f"{', '.join(sandboxed)} need {required.value} confinement; this machine offers "
                f"{report.level.value} (see bastion doctor)"
            )
        return specs, Workbench(workspace=str(workspace), allow_write=request.allow_write, required_level=required)

    async def _load_unless_cancelled(
        self, run: ActiveRun, spec: ModelSpec, keep_alive_s: float | None
    ) -> LoadedModel | None:
        """The loaded model, or None when the client cancels first. A load can
        take minutes (assembling a chunked model); Ctrl-C must not wait for it.
        The load itself goes on, for the next request. The run uses the model
        until it ends: it is not unloaded under it."""
        load = asyncio.ensure_future(
            self._models.ensure_loaded(spec, self._progress(run.client, run.request_id, spec.name),
                                       keep_alive_s=keep_alive_s, until=run.finished)
        )
        cancelled = asyncio.ensure_future(run.cancelled.wait())
        try:
            await asyncio.wait({load, cancelled}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cancelled.cancel()
        if not load.done():
            load.add_done_callback(lambda task: task.cancelled() or task.exception())  # retrieved, not logged
            return None
        loaded, _ = load.result()
        return None if run.cancel_requested else loaded

    async def _counter(self, model: LoadedModel) -> TokenCounter:
        """The model's real tokenizer (a vocabulary-only load, once per model);
        scripted models tokenize bytes, as their engine does."""
        if isinstance(model.spec.source, ScriptedReplies):
            return ByteTokenCounter()
        return await asyncio.to_thread(self._counters.get, model.handle.model_path)

    def _conversation(self, request: Run, model_key: str) -> Conversation:
        if request.session is None:
            return EphemeralConversation(f"oneshot-{request.request_id}")
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
        counter = await self._counter(loaded)
        run = ActiveRun(request_id="preview", client=b"", emit=lambda _event: None)
        loop = AgentLoop(
            run=run, model=loaded, conversation=StoredConversation(self._store, name), counter=counter,
            sampling=SamplingParams(), settings=LoopSettings(), tools=self._tools, tool_specs=[],
            gate=self._trust.gate(run, name, None, 0.0), new_id=self._new_id,
        )  # fmt: skip
        return await loop.prepare_prompt()


def with_template(model: LoadedModel, template: str | None) -> LoadedModel:
    """The model as this run sees it: with `--template` its formatter is the named built-in."""
    if template is None or model.handle.description is None:
        return model
    formatter = PromptFormatter.for_model(model.handle.description, template)
    return model.with_formatter(formatter)


def _latest_system(conversation: Conversation) -> str | None:
    return next(
        (m.message.content for m in reversed(conversation.context_messages()) if m.message.role is ChatRole.SYSTEM),
        None,
    )


