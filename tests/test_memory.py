"""The GGUF metadata reader, the memory estimate and the budget policy, as pure logic.

The reader is checked against the real SmolLM2 and Gemma 3 files and against
hand-made files (every value type, both count widths, cut short at every
byte, random garbage). The estimate is checked against both models' real
metadata and the RSS their workers were measured at (see memory.py).
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from bastion.protocol import HomeLayout, KvCacheType
from bastion.protocol.control import MemoryBudgetSource
from bastion.protocol.quantities import format_duration, parse_duration, parse_size
from bastion.supervisor.errors import InsufficientMemoryError, InvalidModelFileError
from bastion.supervisor.models.gguf_metadata import GgufType, read_gguf_metadata
from bastion.supervisor.models.memory import (
    BudgetSetting,
    Holder,
    MemoryBudget,
    estimate,
    memory_budget_argument,
    parse_budget,
    plan_admission,
    resolve_budget,
    shape_of,
)
from bastion.supervisor.models.registry import ModelRegistry
from bastion.supervisor.models.sources import resolve_gguf
from tests.e2e_support import Bastion
from tests.real_models import smollm2_gguf

MiB = 1 << 20

# --- a GGUF writer for hand-made files ------------------------------------------

_PACK = {
    GgufType.UINT8: "<B", GgufType.INT8: "<b", GgufType.UINT16: "<H", GgufType.INT16: "<h",
    GgufType.UINT32: "<I", GgufType.INT32: "<i", GgufType.FLOAT32: "<f", GgufType.BOOL: "<?",
    GgufType.UINT64: "<Q", GgufType.INT64: "<q", GgufType.FLOAT64: "<d",
}  # fmt: skip


def _count(n: int, version: int) -> bytes:
    return struct.pack("<Q" if version > 1 else "<I", n)


def _string(text: str, version: int) -> bytes:
    raw = text.encode()
    return _count(len(raw), version) + raw


def _value(kind: GgufType, value: object, version: int) -> bytes:
    if kind is GgufType.STRING:
        return _string(value, version)  # type: ignore[arg-type]
    if kind is GgufType.ARRAY:
        element, items = value  # type: ignore[misc]
        return (struct.pack("<I", element) + _count(len(items), version)
                + b"".join(_value(element, item, version) for item in items))
    return struct.pack(_PACK[kind], value)


def gguf(values: list[tuple[str, GgufType, object]], tensors: list[tuple[str, tuple[int, ...], int]] = (),
         *, version: int = 3, data: bytes = b"\0" * 64) -> bytes:
    """A GGUF file: `values` as (key, type, value), arrays as (element type, items)."""
    out = b"GGUF" + struct.pack("<I", version) + _count(len(tensors), version) + _count(len(values), version)
    for key, kind, value in values:
        out += _string(key, version) + struct.pack("<I", kind) + _value(kind, value, version)
    for name, shape, offset in tensors:
        dims = b"".join(struct.pack("<Q" if version > 1 else "<I", d) for d in shape)
        out += _string(name, version) + struct.pack("<I", len(shape)) + dims + struct.pack("<IQ", 0, offset)
    out += b"\0" * (-len(out) % 32)
    return out + data


EVERY_TYPE = [
    ("general.architecture", GgufType.STRING, "toy"),
    ("u8", GgufType.UINT8, 200), ("i8", GgufType.INT8, -100), ("u16", GgufType.UINT16, 60000),
    ("i16", GgufType.INT16, -30000), ("u32", GgufType.UINT32, 4_000_000_000), ("i32", GgufType.INT32, -2_000_000_000),
    ("f32", GgufType.FLOAT32, 1.5), ("bool", GgufType.BOOL, True), ("u64", GgufType.UINT64, 2**63),
    ("i64", GgufType.INT64, -(2**62)), ("f64", GgufType.FLOAT64, 0.1), ("unicode", GgufType.STRING, "héllo ✓"),
    ("ints", GgufType.ARRAY, (GgufType.INT32, [1, -2, 3])),
    ("words", GgufType.ARRAY, (GgufType.STRING, ["a", "", "ccc"])),
    ("nested", GgufType.ARRAY, (GgufType.ARRAY, [(GgufType.UINT8, [1, 2]), (GgufType.UINT8, [])])),
    ("empty", GgufType.ARRAY, (GgufType.FLOAT64, [])),
]  # fmt: skip


@pytest.mark.parametrize("version", [1, 2, 3])
def test_reads_every_value_type_in_every_version(tmp_path: Path, version: int) -> None:
    path = tmp_path / "toy.gguf"
    path.write_bytes(gguf(EVERY_TYPE, [("w", (4, 2), 0), ("b", (8,), 32)], version=version))
    metadata = read_gguf_metadata(path)
    values = metadata.values
    assert metadata.version == version and metadata.architecture == "toy"
    assert [values[k] for k in ("u8", "i8", "u16", "i16", "u32", "i32", "bool", "u64", "i64")] == [
        200, -100, 60000, -30000, 4_000_000_000, -2_000_000_000, True, 2**63, -(2**62)]
    assert values["f32"] == 1.5 and values["f64"] == 0.1 and values["unicode"] == "héllo ✓"
    assert values["ints"] == [1, -2, 3] and values["words"] == ["a", "", "ccc"]
    assert values["nested"] == [[1, 2], []] and values["empty"] == []
    assert [(t.name, t.shape, t.offset) for t in metadata.tensors] == [("w", (4, 2), 0), ("b", (8,), 32)]
    assert metadata.data_offset % 32 == 0 and metadata.tensor_data_bytes == 64


@pytest.mark.real_model
def test_reads_the_real_smollm2_file_without_its_tensor_data() -> None:
    path = smollm2_gguf()
    metadata = read_gguf_metadata(path)
    assert metadata.architecture == "llama" and metadata.version == 3
    assert metadata.values["llama.block_count"] == 30 and metadata.values["llama.attention.head_count_kv"] == 3
    assert len(metadata.values["tokenizer.ggml.tokens"]) == 49152
    assert "im_start" in metadata.values["tokenizer.chat_template"]
    assert len(metadata.tensors) == 272 and metadata.data_offset % 32 == 0
    assert metadata.file_size == path.stat().st_size
    # The tensor directory accounts for the data: the last tensor ends within the file.
    assert metadata.data_offset + max(t.offset for t in metadata.tensors) < metadata.file_size
    assert metadata.tensor_data_bytes > 0.97 * metadata.file_size


def test_a_file_cut_short_anywhere_is_an_invalid_model_file(tmp_path: Path) -> None:
    whole = gguf(EVERY_TYPE, [("w", (4, 2), 0)], data=b"")
    path = tmp_path / "cut.gguf"
    for length in range(len(whole)):
        path.write_bytes(whole[:length])
        with pytest.raises(InvalidModelFileError, match=r"cut\.gguf"):
            read_gguf_metadata(path)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "not a GGUF"),
        (b"PK\x03\x04" + b"\0" * 60, "not a GGUF"),
        (b"GGUF" + struct.pack("<I", 9) + b"\0" * 40, "version 9"),
        # A key claiming 2^60 bytes: refused before anything that size is allocated.
        (b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**60) + b"key", "cannot fit"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 2**40) + b"\0" * 64, "cannot fit"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _string("k", 3) + struct.pack("<I", 77) + b"\0" * 16,
         "unknown GGUF value type 77"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _string("k", 3) + struct.pack("<IIQ", 9, 4, 2**50),
         "cannot fit"),
        (gguf([("general.alignment", GgufType.UINT32, 3)]), "power of two"),
        (gguf([], [("w", (4,), 10_000)]), "past the end"),
    ],
    ids=["empty", "zip", "version", "huge_key", "huge_kv_count", "bad_type", "huge_array", "alignment",
         "tensor_past_end"],
)
def test_garbage_is_refused_with_a_clear_message(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(InvalidModelFileError, match=needle):
        read_gguf_metadata(path)


def test_random_bytes_after_a_valid_header_never_escape_as_other_errors(tmp_path: Path) -> None:
    rng = random.Random(7)
    path = tmp_path / "noise.gguf"
    for _ in range(300):
        path.write_bytes(b"GGUF" + struct.pack("<I", rng.choice([1, 2, 3])) + rng.randbytes(rng.randrange(0, 400)))
        try:
            read_gguf_metadata(path)
        except InvalidModelFileError:
            pass


def test_missing_files_and_directories_are_invalid_model_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelFileError, match="not found"):
        read_gguf_metadata(tmp_path / "nope.gguf")
    with pytest.raises(InvalidModelFileError, match="directory"):
        read_gguf_metadata(tmp_path)


# --- the estimate ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    layout = HomeLayout(tmp_path_factory.mktemp("gemma-home"))
    return resolve_gguf(ModelRegistry.load(layout).lookup("gemma3-270m"), layout)


@pytest.mark.real_model
def test_smollm2_shape_is_read_from_its_metadata() -> None:
    shape = shape_of(read_gguf_metadata(smollm2_gguf()))
    # 30 layers × 3 KV heads × (64 + 64): head size is n_embd / n_head when key_length is absent.
    assert (shape.n_layer, shape.n_head_max, shape.n_vocab) == (30, 9, 49152)
    assert shape.kv_values_per_token == 30 * 3 * (64 + 64) and shape.sliding_window == 0


def test_gemma3_shape_uses_its_key_length_and_counts_the_window_layers_in_full(gemma_gguf: Path) -> None:
    shape = shape_of(read_gguf_metadata(gemma_gguf))
    assert (shape.architecture, shape.n_layer, shape.n_head_max, shape.n_vocab) == ("gemma3", 18, 4, 262144)
    assert shape.kv_values_per_token == 18 * 1 * (256 + 256) and shape.sliding_window == 512
    # Every 6th layer is global (llama.cpp's gemma3 pattern): 15 of 18 use the window.
    assert shape.window_kv_values_per_token == 15 * 512
    # The cache is full size for every layer, window or not (the worker runs with
    # swa_full); the snapshot keeps the window layers' window only.
    at_4096 = estimate(shape, 4096)
    assert at_4096.kv_cache_bytes == 4096 * 18 * 512 * 2
    assert at_4096.snapshot_bytes == (4096 * 3 * 512 + (512 + 256) * 15 * 512) * 2


def test_head_count_kv_given_per_layer_is_summed_over_layers(tmp_path: Path) -> None:
    path = tmp_path / "hybrid.gguf"
    path.write_bytes(gguf([
        ("general.architecture", GgufType.STRING, "hy"),
        ("hy.block_count", GgufType.UINT32, 4),
        ("hy.embedding_length", GgufType.UINT32, 256),
        ("hy.attention.head_count", GgufType.UINT32, 8),
        ("hy.attention.head_count_kv", GgufType.ARRAY, (GgufType.INT32, [2, 0, 2, 4])),
        ("tokenizer.ggml.tokens", GgufType.ARRAY, (GgufType.STRING, ["a", "b"])),
    ]))  # fmt: skip
    shape = shape_of(read_gguf_metadata(path))
    # No key_length: 256 / 8 = 32 per head for K and V; layer 1 has no KV at all.
    assert shape.kv_values_per_token == (2 + 0 + 2 + 4) * (32 + 32) and shape.n_vocab == 2


# RSS of real workers (MiB), measured once the context was ~97% full (the
# worst case the budget must cover) and, where known, after a ~1,500-token
# prompt; see memory.py.
MEASURED = {
    ("smollm2", 1024): {"full": 219},
    ("smollm2", 4096): {"full": 404, "short": 280},
    ("smollm2", 16384): {"full": 1391, "short": 551},
    ("gemma3", 1024): {"full": 386},
    ("gemma3", 4096): {"full": 474, "short": 453},
    ("gemma3", 16384): {"full": 827, "short": 674},
}


# What flash attention saved, measured with the engine alone in one process
# (context 97% full): the worker figures above were taken without it.
FLASH_ATTENTION_SAVED = {("smollm2", 4096): 52, ("smollm2", 16384): 225, ("gemma3", 4096): 15}


@pytest.mark.real_model
@pytest.mark.parametrize(("model", "n_ctx"), sorted(MEASURED))
def test_estimate_lands_within_a_quarter_of_measured_rss(model: str, n_ctx: int, gemma_gguf: Path) -> None:
    path = smollm2_gguf() if model == "smollm2" else gemma_gguf
    total = estimate(shape_of(read_gguf_metadata(path)), n_ctx, flash_attn=False).total / MiB
    measured = MEASURED[(model, n_ctx)]
    assert abs(total - measured["full"]) <= 0.25 * measured["full"], (total, measured)
    assert total >= 0.95 * measured.get("short", 0)  # never well under what a light load already holds


@pytest.mark.real_model
@pytest.mark.parametrize(("model", "n_ctx"), sorted(FLASH_ATTENTION_SAVED))
def test_with_flash_attention_the_estimate_drops_by_about_what_it_saves(model: str, n_ctx: int,
                                                                        gemma_gguf: Path) -> None:
    shape = shape_of(read_gguf_metadata(smollm2_gguf() if model == "smollm2" else gemma_gguf))
    saved = (estimate(shape, n_ctx, flash_attn=False).total - estimate(shape, n_ctx).total) / MiB
    assert abs(saved - FLASH_ATTENTION_SAVED[(model, n_ctx)]) <= 0.35 * FLASH_ATTENTION_SAVED[(model, n_ctx)] + 4
    expected = MEASURED[(model, n_ctx)]["full"] - FLASH_ATTENTION_SAVED[(model, n_ctx)]
    assert abs(estimate(shape, n_ctx).total / MiB - expected) <= 0.25 * expected


@pytest.mark.real_model
def test_a_q8_0_cache_is_estimated_at_about_what_it_saves() -> None:
    """Measured with the engine alone, SmolLM2 at 4096 with its context 97% full: 258 MiB with
    an f16 cache, 215 with q8_0."""
    shape = shape_of(read_gguf_metadata(smollm2_gguf()))
    f16, q8 = estimate(shape, 4096), estimate(shape, 4096, kv_cache_type=KvCacheType.Q8_0)
    assert abs((f16.kv_cache_bytes - q8.kv_cache_bytes) / MiB - 43) <= 5
    assert q8.snapshot_bytes < 0.55 * f16.snapshot_bytes


@pytest.mark.real_model
def test_each_parallel_sequence_adds_its_own_kv_cache() -> None:
    """Measured with the engine alone, SmolLM2 at 4096 per sequence, each sequence holding a
    prompt: 252 MiB RSS with one sequence, 523 MiB with four (90 MiB per added sequence)."""
    shape = shape_of(read_gguf_metadata(smollm2_gguf()))
    one, four = estimate(shape, 4096), estimate(shape, 4096, parallel=4)
    assert four.kv_cache_bytes == 4 * one.kv_cache_bytes
    assert four.snapshot_bytes == one.snapshot_bytes  # a snapshot is one sequence's
    assert abs((four.total - one.total) / MiB - (523 - 252)) <= 0.15 * (523 - 252)


@pytest.mark.real_model
def test_estimate_grows_with_the_context() -> None:
    shape = shape_of(read_gguf_metadata(smollm2_gguf()))
    small, large = estimate(shape, 512), estimate(shape, 8192)
    assert small.weights_bytes == large.weights_bytes == shape.weights_bytes
    assert large.kv_cache_bytes == 16 * small.kv_cache_bytes and large.compute_bytes > small.compute_bytes


# --- the budget and what to unload -----------------------------------------------------

BUDGET = MemoryBudget(bytes=1000 * MiB, source=MemoryBudgetSource.CONFIG, detail="set in a test")


def holder(name: str, mib: int, last_used: float, evictable: bool = True) -> Holder:
    return Holder(name=name, bytes=mib * MiB, last_used=last_used, evictable=evictable)


def test_a_model_that_fits_unloads_nothing() -> None:
    assert plan_admission("new", 300 * MiB, BUDGET, [holder("a", 600, 1.0)]) == []
    assert plan_admission("new", 1000 * MiB, BUDGET, []) == []


def test_least_recently_used_idle_models_go_first_and_only_as_many_as_needed() -> None:
    holders = [holder("recent", 300, 30.0), holder("oldest", 300, 10.0), holder("older", 300, 20.0)]
    assert plan_admission("new", 350 * MiB, BUDGET, holders) == ["oldest"]
    assert plan_admission("new", 650 * MiB, BUDGET, holders) == ["oldest", "older"]


def test_models_in_use_are_never_chosen_even_when_least_recent() -> None:
    holders = [holder("busy", 400, 1.0, evictable=False), holder("idle", 400, 50.0)]
    assert plan_admission("new", 500 * MiB, BUDGET, holders) == ["idle"]


def test_when_unloading_every_idle_model_is_not_enough_nothing_is_unloaded_and_the_error_explains() -> None:
    holders = [holder("busy", 700, 1.0, evictable=False), holder("idle", 200, 0.0)]
    with pytest.raises(InsufficientMemoryError) as caught:
        plan_admission("big", 400 * MiB, BUDGET, holders)
    message = caught.value.message
    assert caught.value.code.value == "insufficient_memory"
    for needle in ("big", "400 MiB", "1000 MiB", "busy 700 MiB", "bastion unload", "[memory] budget",
                   "--memory-budget", "set in a test"):
        assert needle in message, needle


def test_a_model_larger_than_the_whole_budget_fails_at_once() -> None:
    with pytest.raises(InsufficientMemoryError, match=r"more than the whole memory budget of 1000 MiB"):
        plan_admission("huge", 1200 * MiB, BUDGET, [])


def test_budget_precedence_is_flag_then_config_then_a_share_of_available() -> None:
    available = 10_000 * MiB
    flag = resolve_budget(123, BudgetSetting(bytes=456), available)
    assert (flag.bytes, flag.source) == (123, MemoryBudgetSource.FLAG)
    configured = resolve_budget(None, BudgetSetting(bytes=456), available)
    assert (configured.bytes, configured.source) == (456, MemoryBudgetSource.CONFIG)
    share = resolve_budget(None, BudgetSetting(share=0.5), available)
    assert (share.bytes, share.source) == (5000 * MiB, MemoryBudgetSource.CONFIG)
    default = resolve_budget(None, None, available)
    assert (default.bytes, default.source) == (8000 * MiB, MemoryBudgetSource.DEFAULT)
    assert "80% of the 9.8 GiB available when the supervisor started" == default.detail


# --- sizes and durations ------------------------------------------------------------------


def test_sizes_use_binary_units_unless_written_as_decimal() -> None:
    assert parse_size("8GiB") == parse_size("8G") == parse_size("8 gib") == 8 << 30
    assert parse_size("512MiB") == parse_size("512m") == 512 << 20
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size(4096) == parse_size("4096") == 4096
    for bad in ("", "lots", "-1G", "0", 0, True, "8 GiBs"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_budgets_are_sizes_or_shares() -> None:
    assert parse_budget("60%") == BudgetSetting(share=0.6)
    assert parse_budget("2GiB") == BudgetSetting(bytes=2 << 30)
    with pytest.raises(ValueError, match="at most 100%"):
        parse_budget("150%")
    assert memory_budget_argument(1000)("50%") == 500 and memory_budget_argument(1000)("1K") == 1024


def test_durations_read_like_ollamas_and_any_negative_means_never() -> None:
    assert [parse_duration(v) for v in ("5m", "90s", "1h30m", "500ms", "2.5", "0", 0, 300)] == [
        300, 90, 5400, 0.5, 2.5, 0, 0, 300]
    assert parse_duration("-1") == parse_duration(-5) == parse_duration("-10m") == -1
    for bad in ("soon", "5x", "", "m", "1m ago", float("nan")):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert [format_duration(s) for s in (-1, 0, 2.5, 300, 90, 5400)] == ["never", "0s", "2.5s", "5m", "1m30s",
                                                                           "1h30m"]


@pytest.mark.real_model
def test_a_real_worker_holds_about_what_was_estimated(bastion: Bastion) -> None:
    """The calibration still holds for the worker as it is today: SmolLM2 at
    n_ctx 1024, its context nearly filled by one prompt."""
    bastion.home.mkdir(parents=True, exist_ok=True)
    (bastion.home / "config.toml").write_text("[models.smollm2-135m]\nn_ctx = 1024\n")
    prompt = " ".join(f"Fact {i}: the number {i} is odd or even." for i in range(62))  # ~940 tokens
    code, lines = bastion.json("run", prompt, "--max-tokens", "4", "--temperature", "0")
    assert code == 0 and next(e for e in lines if e["type"] == "generation_stats")["prompt_tokens"] > 850
    code, (listing,) = bastion.json("ps")
    (model,) = listing["models"]
    assert abs(model["rss_bytes"] - model["memory_estimate_bytes"]) <= 0.25 * model["rss_bytes"], model
    assert model["flash_attn"] is True  # the default
    # Turned off in the model's entry: the next run gets a worker without it, estimated larger.
    (bastion.home / "config.toml").write_text("[models.smollm2-135m]\nn_ctx = 1024\nflash_attn = false\n")
    code, lines = bastion.json("run", prompt, "--max-tokens", "4", "--temperature", "0")
    assert code == 0 and next(e for e in lines if e["type"] == "generation_stats")["prompt_tokens"] > 850
    code, (listing,) = bastion.json("ps")
    (without,) = listing["models"]
    assert without["flash_attn"] is False and without["pid"] != model["pid"]
    assert without["memory_estimate_bytes"] > model["memory_estimate_bytes"]
    assert abs(without["rss_bytes"] - without["memory_estimate_bytes"]) <= 0.25 * without["rss_bytes"], without
    # A q8_0 cache: estimated smaller than f16, and the worker holds about that.
    (bastion.home / "config.toml").write_text('[models.smollm2-135m]\nn_ctx = 1024\nkv_cache_type = "q8_0"\n')
    code, lines = bastion.json("run", prompt, "--max-tokens", "4", "--temperature", "0")
    assert code == 0, lines
    code, (listing,) = bastion.json("ps")
    (q8,) = listing["models"]
    assert q8["kv_cache_type"] == "q8_0" and q8["flash_attn"] is True
    assert q8["memory_estimate_bytes"] < model["memory_estimate_bytes"]
    assert abs(q8["rss_bytes"] - q8["memory_estimate_bytes"]) <= 0.25 * q8["rss_bytes"], q8
