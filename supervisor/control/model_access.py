"""What every request that generates needs from the loaded models: the model, loaded (or not, when
the client cancels first), its token counter, and its formatter with a per-request template.

Shared by runs (runs.py) and completions (completions.py).
"""

from __future__ import annotations

import asyncio
import logging

from bastion.protocol.remote import RemoteEndpoint, RemoteMode
from bastion.supervisor.control.models import load_progress
from bastion.supervisor.models.loaded import LoadedModels
from bastion.supervisor.models.loaded_model import LoadedModel
from bastion.supervisor.models.registry import ModelSpec
from bastion.supervisor.models.sources import ScriptedReplies
from bastion.supervisor.models.tokenizer import (
    ByteTokenCounter,
    EstimatedTokenCounter,
    RemoteTokenCounter,
    TokenCounter,
    TokenCounters,
)
from bastion.supervisor.processes.worker_handle import CountFailed
from bastion.supervisor.runs import ActiveRun
from bastion.supervisor.templates.formatter import PromptFormatter

log = logging.getLogger(__name__)


class ModelAccess:
    def __init__(self, *, models: LoadedModels, counters: TokenCounters) -> None:
        self._models = models
        self._counters = counters

    async def load_unless_cancelled(
        self, run: ActiveRun, spec: ModelSpec, keep_alive_s: float | None
    ) -> LoadedModel | None:
        """The loaded model, or None when the client cancels first. A load can
        take minutes (assembling a chunked model); Ctrl-C must not wait for it.
        The load itself goes on, for the next request. The run uses the model
        until it ends: it is not unloaded under it."""
        load = asyncio.ensure_future(
            self._models.ensure_loaded(spec, load_progress(run.send, run.request_id, spec.name),
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

    async def counter(self, model: LoadedModel) -> TokenCounter:
        """The model's real tokenizer (a vocabulary-only load, once per model);
        scripted models tokenize bytes, as their engine does; a remote model is
        counted with the GGUF its `vocab` names, else by its server's own
        tokenizer where the server has one, else by estimate."""
        if isinstance(model.spec.source, ScriptedReplies):
            return ByteTokenCounter()
        if isinstance(model.spec.source, RemoteEndpoint):
            if model.spec.vocab is not None:
                return await asyncio.to_thread(self._counters.get, model.spec.vocab)
            return await _remote_counter_for(model)
        return await asyncio.to_thread(self._counters.get, model.handle.model_path)


async def _remote_counter_for(model: LoadedModel) -> TokenCounter:
    """The remote server's tokenizer when it has a route for it (asked once per worker), else the estimate."""
    handle = model.handle
    if handle.counts_tokens is None:
        try:
            handle.counts_tokens = await handle.count_tokens("Hello") > 0  # a route that reads the text
        except CountFailed as exc:
            log.info("model %s: counting its prompts by estimate: %s", model.spec.name, exc)
            if exc.retryable:  # the server could not be asked now: ask again next run
                return EstimatedTokenCounter()
            handle.counts_tokens = False
    return RemoteTokenCounter(handle.count_tokens) if handle.counts_tokens else EstimatedTokenCounter()


def formatter_chooses_nothing(model: LoadedModel) -> bool:
    """A remote model in chat mode: its server applies its own template, whatever a request names."""
    return isinstance(model.spec.source, RemoteEndpoint) and model.spec.source.mode is RemoteMode.CHAT


def with_template(model: LoadedModel, template: str | None) -> PromptFormatter:
    """The model's formatter as this request sees it: with a template named, that built-in."""
    if template is None or model.handle.description is None or formatter_chooses_nothing(model):
        return model.formatter
    return PromptFormatter.for_model(model.handle.description, template)
