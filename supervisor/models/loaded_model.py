"""One loaded model (`LoadedModel`: its registry entry, its worker slot, its prompt formatter
and the record of its use) and what `bastion ps` shows of it (`status_of`). loaded.py keeps the
set of them and gets them loaded.
"""

from __future__ import annotations

import copy

import psutil

from bastion.protocol.control import ModelStatus
from bastion.supervisor.models.memory import MemoryEstimate
from bastion.supervisor.models.registry import ModelSpec
from bastion.supervisor.models.residency import expires_in_s
from bastion.supervisor.models.sampling import SamplingDefaults
from bastion.supervisor.models.usage import ModelUsage
from bastion.supervisor.models.worker_slot import WorkerSlot
from bastion.supervisor.processes.worker_handle import WorkerHandle
from bastion.supervisor.templates.formatter import PromptFormatter


class LoadedModel:
    def __init__(
        self, spec: ModelSpec, handle: WorkerHandle, formatter: PromptFormatter, usage: ModelUsage | None = None
    ) -> None:
        self.spec = spec
        self.formatter = formatter
        self.slot = WorkerSlot(handle)
        # Shared with views (with_formatter): one record of the model's use.
        self.usage = usage or ModelUsage(estimate=MemoryEstimate(), keep_alive_s=spec.keep_alive_s)
        # What changed when this worker replaced one with other settings.
        self.reload_reason = ""
        # The sampler settings the model's runs use where the client gives none.
        self.sampling = SamplingDefaults()

    @property
    def handle(self) -> WorkerHandle:
        """The current worker (while restarting: the one that died)."""
        return self.slot.handle

    async def serving(self) -> WorkerHandle:
        return await self.slot.serving()

    def with_formatter(self, formatter: PromptFormatter) -> LoadedModel:
        """The same model and worker slot, rendering prompts with `formatter`."""
        view = copy.copy(self)
        view.formatter = formatter
        return view


def status_of(model: LoadedModel) -> ModelStatus:
    handle, slot = model.handle, model.slot
    description = handle.description
    state = slot.state
    pid = 0 if handle.exited.done() else handle.pid
    # What a dead worker last reported died with it (disk snapshots come back with its successor).
    gauges = handle if pid else None
    rss = 0
    try:
        rss = psutil.Process(pid).memory_info().rss if pid else 0
    except psutil.Error:
        pass
    return ModelStatus(
        name=model.spec.name,
        path=handle.launch.remote.url if handle.launch.remote else str(handle.model_path),
        backends=list(handle.backends),
        state=state,
        pid=pid,
        architecture=description.architecture if description else "",
        n_ctx=description.n_ctx if description else handle.n_ctx,
        flash_attn=handle.launch.flash_attn and handle.launch.engine == "llama",
        kv_cache_type=handle.launch.kv_cache_type.value,
        parallel=handle.launch.parallel,
        running=len(handle.running) if pid else 0,
        kv_tokens=gauges.kv_tokens if gauges else 0,
        rss_bytes=rss,
        file_size=description.file_size if description else 0,
        load_ms=description.load_ms if description else 0.0,
        threads=handle.applied_threads,  # what it decodes with now (shared among busy workers)
        chat_template=handle.template_source,
        queued=len(handle.queue),
        memory_estimate_bytes=model.usage.estimate.total,
        keep_alive_s=model.usage.keep_alive_s,
        expires_in_s=expires_in_s(model),
        restarts=slot.restarts(),
        failure=slot.failure,
        snapshots_ram=gauges.snapshots_ram if gauges else 0,
        snapshot_ram_bytes=gauges.snapshot_ram_bytes if gauges else 0,
        snapshots_disk=gauges.snapshots_disk if gauges else 0,
        snapshot_disk_bytes=gauges.snapshot_disk_bytes if gauges else 0,
    )
