"""Answers to the model requests: load, unload, list, and the supervisor's status.

    load_model    {model, keep_alive_s}  → load_progress* → model_loaded {model, already_loaded, reload_reason}
    unload_model  {model}                → model_unloaded {name}   (unknown_model if it is not loaded)
    list_models   {catalog}              → models {models, catalog (every registry model, when asked)}
    get_status                           → status {pid, version, uptime, models, runs, memory budget}

A load also clears a model's `failed` mark: it is how a model that crashed
too often gets another chance. Progress arrives per stage and, while a
chunked model is assembled, per whole percent.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from importlib import metadata

from bastion.protocol import PROTOCOL_VERSION, HomeLayout
from bastion.protocol.control import (
    CatalogEntry,
    ControlEvent,
    GetStatus,
    ListModels,
    LoadModel,
    LoadProgress,
    LoadStage,
    ModelList,
    ModelLoaded,
    ModelUnloaded,
    StatusReport,
    UnloadModel,
)
from bastion.supervisor.errors import SupervisorError, UnknownModelError
from bastion.supervisor.models.loaded import LoadedModels, LoadProgressCallback
from bastion.supervisor.models.loaded_model import status_of
from bastion.supervisor.models.registry import ModelSpec, RegistryWatcher
from bastion.supervisor.models.sources import existing_gguf

Emit = Callable[[ControlEvent], None]


def load_progress(emit: Emit, request_id: str, name: str) -> LoadProgressCallback:
    """A load's progress as `load_progress` events, at most one per stage and whole percent."""
    last: dict[LoadStage, int] = {}

    def report(stage: LoadStage, done: int, total: int) -> None:
        # Byte progress arrives per chunk written; a client needs whole percents.
        percent = int(100 * done / total) if total else -1
        if last.get(stage) == percent:
            return
        last[stage] = percent
        emit(LoadProgress(request_id=request_id, model=name, stage=stage, done=done, total=total))

    return report


class ModelRequests:
    def __init__(self, *, layout: HomeLayout, registry: RegistryWatcher, models: LoadedModels) -> None:
        self._layout = layout
        self._registry = registry
        self._models = models
        self._started = time.monotonic()

    async def load(self, request: LoadModel, emit: Emit) -> ModelLoaded:
        spec = self._registry.current().lookup(request.model)
        self._models.clear_failure(spec.name)
        progress = load_progress(emit, request.request_id, spec.name)
        model, already = await self._models.ensure_loaded(spec, progress, keep_alive_s=request.keep_alive_s)
        return ModelLoaded(request_id=request.request_id, model=status_of(model), already_loaded=already,
                           reload_reason="" if already else model.reload_reason)

    async def unload(self, request: UnloadModel) -> ModelUnloaded:
        name = request.model
        if self._models.get(name) is None:
            try:  # a registry name or path that resolves to a loaded model's name
                name = self._registry.current().lookup(request.model).name
            except SupervisorError:
                pass
        if not await self._models.unload(name):
            loaded = ", ".join(self._models.names()) or "none"
            raise UnknownModelError(f"model {request.model!r} is not loaded (loaded: {loaded})")
        return ModelUnloaded(request_id=request.request_id, name=name)

    def listing(self, request: ListModels) -> ModelList:
        catalog = [self._catalog_entry(spec) for spec in self._registry.current().specs()] if request.catalog else []
        return ModelList(request_id=request.request_id, models=self._models.statuses(), catalog=catalog)

    def _catalog_entry(self, spec: ModelSpec) -> CatalogEntry:
        path = existing_gguf(spec, self._layout)
        try:
            stat = path.stat() if path else None
        except OSError:
            stat = None
        return CatalogEntry(name=spec.name, description=spec.description, path=str(path or ""), n_ctx=spec.n_ctx,
                            file_size=stat.st_size if stat else 0, modified_at=stat.st_mtime if stat else 0.0)

    def status(self, request: GetStatus, *, runs_active: int) -> StatusReport:
        budget = self._models.memory_budget()
        held = self._models.memory_held()
        return StatusReport(
            request_id=request.request_id,
            pid=os.getpid(),
            version=_version(),
            protocol_version=PROTOCOL_VERSION,
            home=str(self._layout.root),
            control_endpoint=self._layout.control_endpoint,
            uptime_s=round(time.monotonic() - self._started, 3),
            models_loaded=len(self._models.names()),
            runs_active=runs_active,
            memory_budget_bytes=budget.bytes,
            memory_budget_source=budget.source,
            memory_budget_detail=budget.detail,
            memory_held_bytes=sum(held.values()),
            memory_held_by=held,
        )


def _version() -> str:
    try:
        return metadata.version("bastion")
    except metadata.PackageNotFoundError:
        return "0+unknown"
