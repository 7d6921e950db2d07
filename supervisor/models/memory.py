"""How much memory a model will hold, how much bastion may hold, and what to unload to make room.

Owns the estimate of a worker's resident memory made from its GGUF metadata
before the worker exists (`shape_of`, `estimate`, `Estimator`), the memory budget
(`resolve_budget`), the pure policy that picks least-recently-used idle models
to unload so a new one fits (`plan_admission`), and the size and duration
values the config and flags accept (`parse_size`, `parse_duration`).

It decides nothing about processes: LoadedModels (loaded.py) asks it and acts.
It reads metadata only through gguf_metadata.py and never imports llama_cpp.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import msgspec

from bastion.protocol import KvCacheType
from bastion.protocol.control import MemoryBudgetSource
from bastion.protocol.quantities import format_bytes, parse_size
from bastion.supervisor.errors import InsufficientMemoryError, InvalidModelFileError
from bastion.supervisor.models.gguf_metadata import GgufMetadata, read_gguf_metadata
from bastion.supervisor.models.sampling import SamplingDefaults, recommended

log = logging.getLogger(__name__)

MiB = 1 << 20

# What the estimate adds to weights and KV cache. Calibrated by loading the
# real SmolLM2 135M (vocab 49,152, 9 heads, no sliding window) and Gemma 3
# 270M (vocab 262,144, 4 heads, sliding window) at n_ctx 1024, 4096 and 16384,
# in bastion workers and in a bare llama-cpp-python process, and reading RSS
# right after loading and after prompts that filled ~97% of the context:
# - a worker before its model (Python, zmq, llama.cpp's library, the
#   context's fixed buffers) holds ~58 MiB;
# - llama.cpp's vocabulary tables grow with the vocabulary: the two models
#   differ by ~39 MiB over 213k tokens, ~192 bytes a token;
# - without flash attention each ubatch materialises attention scores for
#   every cached position (the f32 scores, then an f16 copy for the next
#   matmul): ~7 bytes per position × ubatch token × head on top of ~12 MiB of
#   other activations, touched as the context fills. With flash attention (the
#   default) the scores are computed in tiles: one llama.cpp process with the
#   engine alone, context 97% full, held 52 MiB less for SmolLM2 at 4096
#   (310 → 258), 225 MiB less at 16384 (766 → 541) and 15 MiB less for Gemma
#   at 4096 (438 → 423), leaving ~1 byte per score;
# - the worker keeps each session's turn-boundary KV snapshot (worker
#   kv_snapshots.py): a copy of the used KV, held in RAM under its cap and
#   while it is written to disk above it, so up to the KV cache once more
#   (Gemma's window layers only keep their window: ~24 MiB at 4096, not 72).
# Estimate vs worker RSS with the context ~97% full (MiB): SmolLM2 at 1024,
# 4096, 16384: 232/219, 414/397-404, 1143/1391 (that last read just after
# the turn, while a snapshot larger than the RAM cap existed twice, one copy
# being written to disk); Gemma at 1024, 4096, 16384: 393/386, 477/474,
# 812/827. tests/test_memory.py keeps these figures.
PROCESS_BYTES = 58 * MiB
VOCAB_BYTES_PER_TOKEN = 192
ACTIVATION_BYTES = 12 * MiB
ATTENTION_BYTES_PER_SCORE = 7
FLASH_ATTENTION_BYTES_PER_SCORE = 1
# The worker's n_batch and n_ubatch (worker/llama_engine.py): tokens evaluated per step.
WORKER_UBATCH = 256
# KV cache cells are f16 (llama.cpp's default type_k/type_v), or q8_0: blocks
# of 32 values in 34 bytes (the values and an f16 scale).
KV_BYTES_PER_VALUE = {KvCacheType.F16: 2.0, KvCacheType.Q8_0: 34 / 32}
# A scripted worker is a Python process with no model: ~29 MiB measured.
SCRIPTED_BYTES = 32 * MiB

# Without a setting, bastion may hold this share of the memory that was
# available when the supervisor started.
DEFAULT_BUDGET_SHARE = 0.8


class ModelShape(msgspec.Struct, frozen=True, kw_only=True):
    """What the estimate needs from a GGUF, small enough to cache per file."""

    architecture: str
    weights_bytes: int
    n_layer: int
    n_vocab: int
    n_head_max: int
    # Σ over layers of (n_embd_k_gqa + n_embd_v_gqa): KV values per token.
    kv_values_per_token: int
    # Sliding-window attention: the window, and the share of the KV values
    # above that belongs to window layers (0 when unknown: counted as global).
    sliding_window: int = 0
    window_kv_values_per_token: int = 0


class MemoryEstimate(msgspec.Struct, frozen=True, kw_only=True):
    weights_bytes: int = 0
    kv_cache_bytes: int = 0
    snapshot_bytes: int = 0
    compute_bytes: int = 0
    overhead_bytes: int = 0

    @property
    def total(self) -> int:
        return (self.weights_bytes + self.kv_cache_bytes + self.snapshot_bytes + self.compute_bytes
                + self.overhead_bytes)


SCRIPTED_ESTIMATE = MemoryEstimate(overhead_bytes=SCRIPTED_BYTES)
# A remote model's worker holds no weights or KV cache here: an interpreter, HTTP and its streams.
REMOTE_ESTIMATE = MemoryEstimate(overhead_bytes=SCRIPTED_BYTES)


def shape_of(metadata: GgufMetadata) -> ModelShape:
    """The dimensions llama.cpp sizes its buffers by, with its own fallbacks for missing keys."""
    arch = metadata.architecture
    n_layer = _int(metadata, f"{arch}.block_count", 0)
    n_embd = _int(metadata, f"{arch}.embedding_length", 0)
    heads = _per_layer(metadata.get(f"{arch}.attention.head_count"), n_layer, 0)
    declared_kv = _per_layer(metadata.get(f"{arch}.attention.head_count_kv"), n_layer, None)
    heads_kv = [h if kv is None else kv for h, kv in zip(heads, declared_kv, strict=True)]
    n_head = max(heads, default=0)
    # As llama.cpp does: head sizes default to n_embd / n_head (of the widest layer).
    default_head_dim = n_embd // n_head if n_head else 0
    key_length = _int(metadata, f"{arch}.attention.key_length", default_head_dim)
    value_length = _int(metadata, f"{arch}.attention.value_length", default_head_dim)
    per_layer = [kv * (key_length + value_length) for kv in heads_kv]
    window = _int(metadata, f"{arch}.attention.sliding_window", 0)
    window_layers = _window_layers(metadata, arch, n_layer) if window else [False] * n_layer
    tokens = metadata.get("tokenizer.ggml.tokens")
    n_vocab = len(tokens) if isinstance(tokens, list) else _int(metadata, f"{arch}.vocab_size", 0)
    return ModelShape(
        architecture=arch,
        weights_bytes=metadata.tensor_data_bytes,
        n_layer=n_layer,
        n_vocab=n_vocab,
        n_head_max=n_head,
        kv_values_per_token=sum(per_layer),
        sliding_window=window,
        window_kv_values_per_token=sum(v for v, windowed in zip(per_layer, window_layers) if windowed),
    )


# Which layers use the window when the GGUF does not say: llama.cpp's own
# per-architecture pattern (every Nth layer attends globally, the rest to the window).
_WINDOW_PATTERNS = {"gemma3": 6, "gemma3n": 5, "gemma2": 2, "cohere2": 4}


def _window_layers(metadata: GgufMetadata, arch: str, n_layer: int) -> list[bool]:
    pattern = metadata.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        return ([bool(p) for p in pattern] + [False] * n_layer)[:n_layer]
    period = pattern if isinstance(pattern, int) and not isinstance(pattern, bool) else _WINDOW_PATTERNS.get(arch, 0)
    return [period > 1 and layer % period < period - 1 for layer in range(n_layer)]


def estimate(shape: ModelShape, n_ctx: int, flash_attn: bool = True,
             kv_cache_type: KvCacheType = KvCacheType.F16, parallel: int = 1) -> MemoryEstimate:
    """Resident bytes of a worker serving `shape` with `n_ctx` once its context is full.

    A worker decoding `parallel` sequences together holds `n_ctx` cells for
    each (llama.cpp's non-unified cache): the KV cache counts `parallel` times;
    a snapshot is one sequence's, and the compute buffers are sized by the
    batch, which the sequences share.

    Weights are mmap'd and count in full (every page is touched by a forward
    pass). A sliding-window cache is counted at full size: the worker leaves
    llama.cpp's swa_full on, so window layers allocate n_ctx cells too. Their
    snapshot holds only the cells still in the window (llama.cpp prunes the
    rest), which is why Gemma's is small."""
    value_bytes = KV_BYTES_PER_VALUE[kv_cache_type]
    kv_cache = int(n_ctx * shape.kv_values_per_token * value_bytes) * max(1, parallel)
    window_cells = min(n_ctx, shape.sliding_window + WORKER_UBATCH)
    global_values = shape.kv_values_per_token - shape.window_kv_values_per_token
    snapshot = int((n_ctx * global_values + window_cells * shape.window_kv_values_per_token) * value_bytes)
    scores = n_ctx * min(n_ctx, WORKER_UBATCH) * shape.n_head_max
    return MemoryEstimate(
        weights_bytes=shape.weights_bytes,
        kv_cache_bytes=kv_cache,
        snapshot_bytes=snapshot,
        compute_bytes=ACTIVATION_BYTES
        + (FLASH_ATTENTION_BYTES_PER_SCORE if flash_attn else ATTENTION_BYTES_PER_SCORE) * scores,
        overhead_bytes=PROCESS_BYTES + VOCAB_BYTES_PER_TOKEN * shape.n_vocab,
    )


def estimate_from_file_size(file_size: int) -> MemoryEstimate:
    """For a GGUF whose metadata could not be read: its bytes and a process.
    (The worker's loader then says what is wrong with the file.)"""
    return MemoryEstimate(weights_bytes=file_size, overhead_bytes=PROCESS_BYTES)


class Estimator:
    """Estimates for GGUF files, reading each file's metadata once: a large
    vocabulary takes a few hundred ms to walk, so what is needed of it (the
    shape, the recommended sampling) is kept per file version (path, size,
    mtime). Called from a thread."""

    def __init__(self) -> None:
        self._facts: dict[tuple[str, int, int], tuple[ModelShape, SamplingDefaults]] = {}

    def of_gguf(self, path: Path, n_ctx: int, flash_attn: bool = True,
                kv_cache_type: KvCacheType = KvCacheType.F16, parallel: int = 1) -> MemoryEstimate:
        facts = self._read(path)
        if facts is None:
            return estimate_from_file_size(path.stat().st_size)
        return estimate(facts[0], n_ctx, flash_attn, kv_cache_type, parallel)

    def sampling_of(self, path: Path) -> SamplingDefaults:
        """The model's recommended sampler settings (sampling.py)."""
        facts = self._read(path)
        return facts[1] if facts is not None else SamplingDefaults()

    def _read(self, path: Path) -> tuple[ModelShape, SamplingDefaults] | None:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        facts = self._facts.get(key)
        if facts is None:
            try:
                metadata = read_gguf_metadata(path)
            except InvalidModelFileError as exc:
                # The worker's loader has the last word on the file and reports it.
                log.warning("%s; estimating its memory from its file size", exc.message)
                return None
            facts = (shape_of(metadata), recommended(metadata.values))
            self._facts[key] = facts
        return facts


def _int(metadata: GgufMetadata, key: str, default: int) -> int:
    value = metadata.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        return default
    return value


_Default = TypeVar("_Default", int, None)


def _per_layer(value: object, n_layer: int, default: _Default) -> list[int | _Default]:
    """A per-layer hyperparameter: one number for all layers, or an array of them."""
    if isinstance(value, list):
        numbers = [v if isinstance(v, int) and not isinstance(v, bool) else default for v in value]
        return (numbers + [default] * n_layer)[: max(n_layer, 0)]
    number = value if isinstance(value, int) and not isinstance(value, bool) else default
    return [number] * n_layer


# --- the budget ---------------------------------------------------------------


class MemoryBudget(msgspec.Struct, frozen=True, kw_only=True):
    bytes: int
    source: MemoryBudgetSource
    detail: str  # how it was arrived at, for status and error messages


class BudgetSetting(msgspec.Struct, frozen=True, kw_only=True):
    """`[memory] budget` as written: a size in bytes, or a share of available memory."""

    bytes: int | None = None
    share: float | None = None


def resolve_budget(flag_bytes: int | None, setting: BudgetSetting | None, available_at_start: int) -> MemoryBudget:
    """The flag wins, then config.toml, then DEFAULT_BUDGET_SHARE of what was available at start.

    Available memory is read once, when the supervisor starts: its workers
    die with the previous supervisor, so none of bastion's models are in that
    figure, and a live reading would shrink as bastion's own models load and
    count them twice."""
    if flag_bytes is not None:
        return MemoryBudget(bytes=flag_bytes, source=MemoryBudgetSource.FLAG, detail="set by --memory-budget")
    if setting is not None and setting.bytes is not None:
        return MemoryBudget(bytes=setting.bytes, source=MemoryBudgetSource.CONFIG,
                            detail="set by [memory] budget in config.toml")
    share = DEFAULT_BUDGET_SHARE
    source = MemoryBudgetSource.DEFAULT
    if setting is not None and setting.share is not None:
        share, source = setting.share, MemoryBudgetSource.CONFIG
    return MemoryBudget(
        bytes=int(available_at_start * share),
        source=source,
        detail=f"{share:.0%} of the {format_bytes(available_at_start)} available when the supervisor started",
    )


class Holder(msgspec.Struct, frozen=True, kw_only=True):
    """A model holding memory, as the admission policy sees it."""

    name: str
    bytes: int
    last_used: float  # monotonic seconds
    evictable: bool  # idle: no generation in flight or queued, no run using it


def plan_admission(name: str, needed: int, budget: MemoryBudget, holders: list[Holder]) -> list[str]:
    """The models to unload, least recently used first, so `needed` more bytes fit.

    An empty list: it fits as things are. Raises InsufficientMemoryError, and
    unloads nothing, when even unloading every idle model would not do."""
    if needed > budget.bytes:
        raise InsufficientMemoryError(
            f"model {name} needs an estimated {format_bytes(needed)}, more than the whole memory budget of "
            f"{format_bytes(budget.bytes)} ({budget.detail}). Raise the budget ([memory] budget in config.toml "
            "or `--memory-budget`) or give the model a smaller n_ctx"
        )
    held = sum(holder.bytes for holder in holders)
    victims: list[str] = []
    for holder in sorted((h for h in holders if h.evictable), key=lambda h: h.last_used):
        if held + needed <= budget.bytes:
            break
        victims.append(holder.name)
        held -= holder.bytes
    if held + needed <= budget.bytes:
        return victims
    busy = [h for h in holders if not h.evictable]
    in_use = ", ".join(f"{h.name} {format_bytes(h.bytes)}" for h in busy)
    raise InsufficientMemoryError(
        f"model {name} needs an estimated {format_bytes(needed)}, but only "
        f"{format_bytes(max(0, budget.bytes - sum(h.bytes for h in busy)))} of the {format_bytes(budget.bytes)} "
        f"memory budget ({budget.detail}) can be freed: models in use or loading hold the rest ({in_use}). "
        "Wait for them to finish, unload one (`bastion unload NAME`), or raise the budget "
        "([memory] budget in config.toml or `--memory-budget`)"
    )


# --- values in config and flags ---------------------------------------------------

_SHARE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse_budget(value: object) -> BudgetSetting:
    """A size (see protocol/quantities.py), or a share of available memory such as "60%"."""
    if isinstance(value, str) and (share := _SHARE.match(value)):
        fraction = float(share.group(1)) / 100
        if not 0 < fraction <= 1:
            raise ValueError(f"a share of memory is more than 0% and at most 100%, got {value!r}")
        return BudgetSetting(share=fraction)
    return BudgetSetting(bytes=parse_size(value))


def memory_budget_argument(available: int) -> Callable[[str], int]:
    """The argparse type of `--memory-budget`: bytes, a share resolved against `available`."""

    def convert(text: str) -> int:
        try:
            setting = parse_budget(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return setting.bytes if setting.bytes is not None else int(available * (setting.share or 0))

    return convert
