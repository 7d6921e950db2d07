"""Which models are loaded, and getting one loaded.

`LoadedModels` maps a model name to the `LoadedModel` (loaded_model.py) serving it. Loading is
resolve (find or assemble the GGUF, in a thread, with progress) → spawn the
worker → wait for its ready message; concurrent requests for the same model
share one load.

Crash recovery: a worker that exits because it was asked to (unload,
shutdown) takes its model with it. One that crashes, or is killed as hung,
is restarted with the same settings after a backoff (restarts.py decides);
meanwhile the model is `restarting` and runs wait in `LoadedModel.serving()`.
Too many crashes in a window mark it `failed`: it stays listed with the
reason, requests for it are refused with `model_failed`, and a `load` clears
the mark. Other models are never touched.

Memory and keep_alive: before a worker is spawned, the model's memory is
estimated from its GGUF (memory.py) and admitted against the budget, which
may unload idle models first; idle models are unloaded after their
keep_alive (residency.py). The same model asked for with the same settings is
never loaded twice; asked for with a different n_ctx or thread count (an
edited config.toml) its worker is replaced once it is idle, and refused with
`busy` while a request uses it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bastion.protocol import ErrorCode, HomeLayout
from bastion.protocol.control import LoadStage, ModelStatus
from bastion.protocol.remote import RemoteEndpoint, RemoteMode
from bastion.protocol.worker_wire import ModelDescription
from bastion.supervisor.config import SupervisorConfig
from bastion.supervisor.errors import (
    ModelBusyError,
    ModelConflictError,
    ModelFailedError,
    ModelSourceError,
    ModelUnloadedError,
    SupervisorError,
)
from bastion.supervisor.models.loaded_model import LoadedModel, status_of
from bastion.supervisor.models.memory import (
    REMOTE_ESTIMATE,
    SCRIPTED_ESTIMATE,
    Estimator,
    MemoryBudget,
    resolve_budget,
)
from bastion.supervisor.models.registry import MemorySettings, ModelSpec
from bastion.supervisor.models.residency import Clock, Residency, is_idle
from bastion.supervisor.models.restarts import CrashHistory, GiveUp, Restart, RestartPolicy
from bastion.supervisor.models.sources import ScriptedReplies, resolve_gguf
from bastion.supervisor.models.usage import ModelUsage
from bastion.supervisor.models.worker_slot import failed_message
from bastion.supervisor.processes.worker_handle import WorkerHandle
from bastion.supervisor.processes.workers import WorkerPool
from bastion.supervisor.templates.formatter import PromptFormatter

log = logging.getLogger(__name__)

# (stage, done, total): called on the event loop.
LoadProgressCallback = Callable[[LoadStage, int, int], None]


class LoadedModels:
    def __init__(
        self,
        *,
        config: SupervisorConfig,
        layout: HomeLayout,
        pool: WorkerPool,
        memory_settings: Callable[[], MemorySettings] = MemorySettings,
        clock: Clock | None = None,
        on_resolved: Callable[[Path], None] = lambda _path: None,
    ) -> None:
        self._config = config
        self._layout = layout
        self._pool = pool
        self._loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, tuple[ModelSpec, asyncio.Task[LoadedModel]]] = {}
        # Memory budget and keep_alive (see the module docstring).
        self._memory_settings = memory_settings
        self._residency = Residency(budget=self.memory_budget, loaded=lambda: self._loaded, unload=self.unload,
                                    clock=clock)
        self._estimator = Estimator()
        # Crash recovery (see the module docstring).
        self._policy = RestartPolicy.from_config(config)
        self._failed: dict[str, LoadedModel] = {}
        self._restarts: dict[str, asyncio.Task[None]] = {}
        self._closing = False
        # Told each GGUF about to be loaded, while its worker starts (the daemon
        # loads the file's vocabulary for token counting meanwhile).
        self._on_resolved = on_resolved

    def get(self, name: str) -> LoadedModel | None:
        return self._loaded.get(name)

    def names(self) -> list[str]:
        return sorted(self._loaded)

    async def ensure_loaded(
        self,
        spec: ModelSpec,
        progress: LoadProgressCallback,
        *,
        keep_alive_s: float | None = None,
        until: asyncio.Future[Any] | None = None,
    ) -> tuple[LoadedModel, bool]:
        """The loaded model for `spec`, loading it if needed; True if it already was.

        The asking request applies its keep_alive (None: the spec's) and, given
        `until`, uses the model until that future is done: meanwhile neither
        keep_alive nor another model's admission unloads it."""
        with self._residency.wanting(spec.name):
            model, already = await self._loaded_for(spec, progress)
        self._residency.use(model, spec.keep_alive_s if keep_alive_s is None else keep_alive_s, until)
        return model, already

    async def _loaded_for(self, spec: ModelSpec, progress: LoadProgressCallback) -> tuple[LoadedModel, bool]:
        await self._await_recovery(spec.name)
        loading = self._loading.get(spec.name)
        if loading is not None:
            if loading[0].source != spec.source:
                raise ModelConflictError(
                    f"a different model named '{spec.name}' is loading ({loading[0].source}); "
                    "try again once it is loaded"
                )
            return await asyncio.shield(loading[1]), False
        reload_reason = ""
        existing = self._loaded.get(spec.name)
        if existing is not None:
            if existing.spec.source != spec.source:
                raise ModelConflictError(
                    f"a different model named '{spec.name}' is loaded "
                    f"({existing.handle.model_path}); unload it first"
                )
            reload_reason = self._relaunch_reason(existing, spec)
            if not reload_reason:
                self._adopt(existing, spec)
                return existing, True
            if not is_idle(existing):
                raise ModelBusyError(
                    f"model {spec.name} is in use; its new settings ({reload_reason}) need a new worker: "
                    "retry once it is idle, or unload it"
                )
        task = asyncio.create_task(self._load(spec, progress, reload_reason))
        self._loading[spec.name] = (spec, task)
        task.add_done_callback(lambda _t: self._loading.pop(spec.name, None))
        return await asyncio.shield(task), False

    def _relaunch_reason(self, model: LoadedModel, spec: ModelSpec) -> str:
        """What differs between the running worker and what `spec` asks for, if a new worker is needed."""
        handle = model.handle
        changes = []
        if isinstance(spec.source, RemoteEndpoint):  # a changed endpoint is another source: a conflict
            if spec.n_ctx != handle.launch.n_ctx:
                changes.append(f"n_ctx {handle.launch.n_ctx or 'the server’s'} → {spec.n_ctx or 'the server’s'}")
            if spec.parallel != handle.launch.parallel:
                changes.append(f"parallel {handle.launch.parallel} → {spec.parallel}")
            return ", ".join(changes)
        n_ctx = spec.n_ctx or self._config.default_n_ctx
        if n_ctx != handle.n_ctx:
            changes.append(f"n_ctx {handle.n_ctx} → {n_ctx}")
        threads = spec.threads or self._config.default_threads
        if threads != handle.threads:
            changes.append(f"threads {handle.threads} → {threads}")
        if spec.flash_attn != handle.launch.flash_attn:
            changes.append(f"flash_attn {str(handle.launch.flash_attn).lower()} → {str(spec.flash_attn).lower()}")
        if spec.kv_cache_type is not handle.launch.kv_cache_type:
            changes.append(f"kv_cache_type {handle.launch.kv_cache_type.value} → {spec.kv_cache_type.value}")
        if spec.parallel != handle.launch.parallel:
            changes.append(f"parallel {handle.launch.parallel} → {spec.parallel}")
        return ", ".join(changes)

    @staticmethod
    def _adopt(model: LoadedModel, spec: ModelSpec) -> None:
        """Settings the supervisor applies itself (template, description) take effect without a new worker."""
        description = model.handle.description
        if spec.template != model.spec.template and description is not None:
            model.formatter = formatter_for(spec, description)
            model.handle.template_source = model.formatter.source
        model.spec = spec

    async def _load(self, spec: ModelSpec, progress: LoadProgressCallback, reload_reason: str = "") -> LoadedModel:
        loop = asyncio.get_running_loop()
        if reload_reason:
            log.warning("model %s: replacing its worker for new settings: %s", spec.name, reload_reason)
            await self.unload(spec.name)
        progress(LoadStage.RESOLVING, 0, 0)
        if isinstance(spec.source, RemoteEndpoint):
            usage = ModelUsage(estimate=REMOTE_ESTIMATE, keep_alive_s=spec.keep_alive_s)
            async with self._residency.admitted(spec.name, REMOTE_ESTIMATE.total):
                model = await self._spawn(spec, Path(), spec.n_ctx, usage, progress)
            model.reload_reason = reload_reason
            return model

        def report_bytes(done: int, total: int) -> None:
            loop.call_soon_threadsafe(progress, LoadStage.ASSEMBLING, done, total)

        path = await asyncio.to_thread(resolve_gguf, spec, self._layout, report_bytes)
        if not isinstance(spec.source, ScriptedReplies):
            self._on_resolved(path)
        n_ctx = spec.n_ctx or self._config.default_n_ctx
        needs = (SCRIPTED_ESTIMATE if isinstance(spec.source, ScriptedReplies)
                 else await asyncio.to_thread(self._estimator.of_gguf, path, n_ctx, spec.flash_attn,
                                              spec.kv_cache_type, spec.parallel))
        usage = ModelUsage(estimate=needs, keep_alive_s=spec.keep_alive_s)
        async with self._residency.admitted(spec.name, needs.total):
            model = await self._spawn(spec, path, n_ctx, usage, progress)
        model.reload_reason = reload_reason
        if not isinstance(spec.source, ScriptedReplies):
            model.sampling = await asyncio.to_thread(self._estimator.sampling_of, path)
        return model

    async def _spawn(
        self, spec: ModelSpec, path: Path, n_ctx: int, usage: ModelUsage, progress: LoadProgressCallback
    ) -> LoadedModel:
        progress(LoadStage.SPAWNING, 0, 0)
        handle = await self._pool.spawn(
            name=spec.name,
            model_path=path,
            n_ctx=n_ctx,
            threads=spec.threads or self._config.default_threads,
            engine=_engine_of(spec),
            flash_attn=spec.flash_attn,
            kv_cache_type=spec.kv_cache_type,
            parallel=spec.parallel,
            kv_ram_bytes=spec.kv_ram_bytes,
            kv_disk_bytes=spec.kv_disk_bytes,
            remote=spec.source if isinstance(spec.source, RemoteEndpoint) else None,
        )
        progress(LoadStage.LOADING, 0, 0)
        try:
            description = await asyncio.wait_for(
                asyncio.shield(handle.ready), self._config.worker_load_timeout_s
            )
            formatter = formatter_for(spec, description)
        except TimeoutError:
            await self._pool.stop_unstarted(handle)
            raise ModelSourceError(
                f"model {spec.name} did not load within {self._config.worker_load_timeout_s:.0f} s"
            ) from None
        except BaseException:
            # Whatever failed (the load, the template, a cancel), no worker outlives it unlisted.
            await asyncio.shield(self._pool.stop_unstarted(handle))
            raise
        handle.template_source = formatter.source
        model = LoadedModel(spec, handle, formatter, usage)
        self._loaded[spec.name] = model
        handle.exited.add_done_callback(lambda _f: self._forget(spec.name, handle))
        progress(LoadStage.READY, 0, 0)
        return model

    def memory_budget(self) -> MemoryBudget:
        settings = self._memory_settings()
        config = self._config
        return resolve_budget(config.memory_budget_bytes, settings.budget, config.memory_available_bytes)

    def memory_held(self) -> dict[str, int]:
        """Estimated bytes per loaded or loading model."""
        return self._residency.held()

    def _forget(self, name: str, handle: WorkerHandle) -> None:
        """A loaded model's worker exited. Asked to (unload, shutdown): the
        model goes with it. Otherwise it crashed: restart it, or mark it failed."""
        model = self._loaded.get(name)
        if model is None or model.handle is not handle:
            return
        if handle.stop_requested or self._closing:
            del self._loaded[name]
            model.slot.unloaded()
            return
        slot = model.slot
        if slot.history is None:
            slot.history = CrashHistory(self._policy)
        slot.wait_limit_s = self._config.worker_load_timeout_s + self._policy.backoff_max_s
        self._after_crash(model, slot.history.record(time.monotonic()), handle.exit_line)

    def _after_crash(self, model: LoadedModel, decision: Restart | GiveUp, reason: str) -> None:
        name = model.spec.name
        if isinstance(decision, GiveUp):
            self._fail(model, decision, reason)
            return
        log.warning("model %s: %s; restarting in %.1f s (crash %d)", name, reason, decision.delay_s,
                    decision.crashes)
        model.slot.restarting(reason)
        task = asyncio.create_task(self._restart(model, decision.delay_s))
        self._restarts[name] = task
        task.add_done_callback(lambda done: self._restarts.pop(name, None) if self._restarts.get(name) is done
                               else None)

    async def _restart(self, model: LoadedModel, delay_s: float) -> None:
        """Start the model's worker again after `delay_s`; a restart that fails
        to load counts as one more crash."""
        name, slot = model.spec.name, model.slot
        while True:
            await asyncio.sleep(delay_s)
            try:
                handle = await self._start_again(slot.handle)
            except SupervisorError as exc:
                reason = exc.message
            except Exception as exc:  # e.g. the executable cannot be spawned: still a failed restart
                log.exception("restarting %s failed", name)
                reason = f"could not restart its worker: {exc}"
            else:
                self._install(model, handle)
                return
            assert slot.history is not None
            decision = slot.history.record(time.monotonic())
            if isinstance(decision, GiveUp):
                self._fail(model, decision, reason)
                return
            log.warning("model %s: restart failed: %s; next try in %.1f s", name, reason, decision.delay_s)
            slot.failure = reason
            delay_s = decision.delay_s

    def _install(self, model: LoadedModel, handle: WorkerHandle) -> None:
        name = model.spec.name
        model.slot.serve(handle)
        handle.exited.add_done_callback(lambda _f: self._forget(name, handle))
        log.info("model %s restarted (worker pid %d)", name, handle.pid)

    async def _start_again(self, dead: WorkerHandle) -> WorkerHandle:
        """A ready worker started like `dead`; raises SupervisorError (one line) if it does not load."""
        handle = await self._pool.respawn(dead)
        try:
            await asyncio.wait_for(asyncio.shield(handle.ready), self._config.worker_load_timeout_s)
        except TimeoutError:
            await self._pool.stop_unstarted(handle)
            raise ModelSourceError(f"did not load within {self._config.worker_load_timeout_s:.0f} s") from None
        except SupervisorError as exc:
            await self._pool.stop_unstarted(handle)
            raise ModelSourceError(handle.load_error or handle.exit_line or exc.message) from exc
        except BaseException:
            await asyncio.shield(self._pool.stop_unstarted(handle))
            raise
        handle.template_source = dead.template_source
        return handle

    def _fail(self, model: LoadedModel, decision: GiveUp, last: str) -> None:
        name = model.spec.name
        reason = f"crashed {decision.crashes} times within {decision.window_s:.0f} s; last: {last}"
        if self._loaded.get(name) is model:
            del self._loaded[name]
        model.slot.failed(reason)
        self._failed[name] = model
        log.error("model %s failed: %s; restarts stopped until `bastion load %s`", name, reason, name)

    async def _await_recovery(self, name: str) -> None:
        """Before a model is handed out: a failed one is refused, a restarting
        one waited for (an unload meanwhile leaves it to be loaded afresh)."""
        failed = self._failed.get(name)
        if failed is not None:
            raise ModelFailedError(failed_message(name, failed.slot.failure))
        model = self._loaded.get(name)
        if model is not None:
            try:
                await model.serving()
            except ModelUnloadedError:
                pass

    def clear_failure(self, name: str) -> bool:
        """Forget that `name` failed (`bastion load` does this first); True if it had."""
        return self._failed.pop(name, None) is not None

    async def unload(self, name: str) -> bool:
        failed = self._failed.pop(name, None)
        model = self._loaded.pop(name, None)
        if model is None:
            return failed is not None
        model.slot.unloaded()
        restart = self._restarts.pop(name, None)
        if restart is not None:
            restart.cancel()
            await asyncio.gather(restart, return_exceptions=True)
            log.info("model %s: unloaded while restarting; its restart is cancelled", name)
        await self._pool.stop(model.handle, ErrorCode.MODEL_UNLOADED, f"model {name} was unloaded; retry to load it again")
        return True

    async def unload_all(self) -> None:
        self._closing = True  # a crash from here on is not restarted
        self._residency.close()
        for task in list(self._restarts.values()):
            task.cancel()
        for _spec, loading in list(self._loading.values()):
            loading.cancel()
        # Workers still loading are stopped too, so nothing outlives the supervisor.
        await self._pool.stop_all()
        for model in self._loaded.values():
            model.slot.unloaded()
        self._loaded.clear()

    def statuses(self) -> list[ModelStatus]:
        listed = {**self._failed, **self._loaded}
        return [status_of(model) for _, model in sorted(listed.items())]


def formatter_for(spec: ModelSpec, description: ModelDescription) -> PromptFormatter:
    """How `spec`'s prompts are written: by its template, or (a remote model in chat mode) by its server."""
    if isinstance(spec.source, RemoteEndpoint) and spec.source.mode is RemoteMode.CHAT:
        return PromptFormatter.for_remote_chat()
    return PromptFormatter.for_model(description, spec.template)


def _engine_of(spec: ModelSpec) -> str:
    """The worker's --engine for `spec`."""
    if isinstance(spec.source, ScriptedReplies):
        return "scripted"
    return "remote" if isinstance(spec.source, RemoteEndpoint) else "llama"
