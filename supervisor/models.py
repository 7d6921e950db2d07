"""Which models are loaded, and getting one loaded.

`LoadedModels` maps a model name to the `WorkerHandle` serving it. Loading is
resolve (find or assemble the GGUF, in a thread, with progress) → spawn the
worker → wait for its ready message; concurrent requests for the same model
share one load. A worker that exits is forgotten at once, so the next request
for its model loads it again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import psutil

from bastion.protocol import ErrorCode, HomeLayout, WorkerState
from bastion.protocol.control import LoadStage, ModelStatus
from bastion.supervisor.config import SupervisorConfig
from bastion.supervisor.errors import ModelSourceError, SupervisorError
from bastion.supervisor.model_sources import ScriptedReplies, resolve_gguf
from bastion.supervisor.prompt import PromptFormatter
from bastion.supervisor.registry import ModelSpec
from bastion.supervisor.workers import WorkerHandle, WorkerPool

log = logging.getLogger(__name__)

# (stage, done, total): called on the event loop.
LoadProgressCallback = Callable[[LoadStage, int, int], None]


class ModelConflictError(SupervisorError):
    code = ErrorCode.INVALID_REQUEST


class LoadedModel:
    def __init__(self, spec: ModelSpec, handle: WorkerHandle, formatter: PromptFormatter) -> None:
        self.spec = spec
        self.handle = handle
        self.formatter = formatter


class LoadedModels:
    def __init__(self, *, config: SupervisorConfig, layout: HomeLayout, pool: WorkerPool) -> None:
        self._config = config
        self._layout = layout
        self._pool = pool
        self._loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, tuple[ModelSpec, asyncio.Task[LoadedModel]]] = {}

    def get(self, name: str) -> LoadedModel | None:
        return self._loaded.get(name)

    def names(self) -> list[str]:
        return sorted(self._loaded)

    async def ensure_loaded(
        self, spec: ModelSpec, progress: LoadProgressCallback
    ) -> tuple[LoadedModel, bool]:
        """The loaded model for `spec`, loading it if needed; True if it already was."""
        existing = self._loaded.get(spec.name)
        if existing is not None:
            if existing.spec.source != spec.source:
                raise ModelConflictError(
                    f"a different model named '{spec.name}' is loaded "
                    f"({existing.handle.model_path}); unload it first"
                )
            return existing, True
        loading = self._loading.get(spec.name)
        if loading is not None and loading[0].source != spec.source:
            raise ModelConflictError(
                f"a different model named '{spec.name}' is loading ({loading[0].source}); try again once it is loaded"
            )
        if loading is None:
            task = asyncio.create_task(self._load(spec, progress))
            self._loading[spec.name] = (spec, task)
            task.add_done_callback(lambda _t: self._loading.pop(spec.name, None))
        else:
            task = loading[1]
        return await asyncio.shield(task), False

    async def _load(self, spec: ModelSpec, progress: LoadProgressCallback) -> LoadedModel:
        loop = asyncio.get_running_loop()
        progress(LoadStage.RESOLVING, 0, 0)

        def report_bytes(done: int, total: int) -> None:
            loop.call_soon_threadsafe(progress, LoadStage.ASSEMBLING, done, total)

        path = await asyncio.to_thread(resolve_gguf, spec, self._layout, report_bytes)
        progress(LoadStage.SPAWNING, 0, 0)
        handle = await self._pool.spawn(
            name=spec.name,
            model_path=path,
            n_ctx=spec.n_ctx or self._config.default_n_ctx,
            threads=spec.threads or self._config.default_threads,
            engine="scripted" if isinstance(spec.source, ScriptedReplies) else "llama",
        )
        progress(LoadStage.LOADING, 0, 0)
        try:
            description = await asyncio.wait_for(
                asyncio.shield(handle.ready), self._config.worker_load_timeout_s
            )
            formatter = PromptFormatter.for_model(description, spec.template)
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
        model = LoadedModel(spec, handle, formatter)
        self._loaded[spec.name] = model
        handle.exited.add_done_callback(lambda _f: self._forget(spec.name, handle))
        progress(LoadStage.READY, 0, 0)
        return model

    def _forget(self, name: str, handle: WorkerHandle) -> None:
        model = self._loaded.get(name)
        if model is not None and model.handle is handle:
            del self._loaded[name]

    async def unload(self, name: str) -> bool:
        model = self._loaded.pop(name, None)
        if model is None:
            return False
        await self._pool.stop(model.handle, ErrorCode.MODEL_UNLOADED, f"model {name} was unloaded; retry to load it again")
        return True

    async def unload_all(self) -> None:
        for _spec, task in list(self._loading.values()):
            task.cancel()
        # Workers still loading are stopped too, so nothing outlives the supervisor.
        await self._pool.stop_all()
        self._loaded.clear()

    def statuses(self) -> list[ModelStatus]:
        return [status_of(model) for _, model in sorted(self._loaded.items())]


def status_of(model: LoadedModel) -> ModelStatus:
    handle = model.handle
    description = handle.description
    rss = 0
    try:
        rss = psutil.Process(handle.pid).memory_info().rss if handle.pid else 0
    except psutil.Error:
        pass
    return ModelStatus(
        name=model.spec.name,
        path=str(handle.model_path),
        state=handle.state if handle.state is not WorkerState.STOPPING else WorkerState.STOPPING,
        pid=handle.pid,
        architecture=description.architecture if description else "",
        n_ctx=description.n_ctx if description else handle.n_ctx,
        kv_tokens=handle.kv_tokens,
        rss_bytes=rss,
        file_size=description.file_size if description else 0,
        load_ms=description.load_ms if description else 0.0,
        threads=handle.threads,
        chat_template=handle.template_source,
        queued=len(handle.queue),
    )
