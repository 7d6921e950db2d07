"""Per-session KV snapshots: the store (RAM cap, LRU, disk spill, checks) and
how `WorkerCore` chooses between the live state, a snapshot and a prefill,
driven with `FakeEngine` (the real engines are in test_worker_kv_llama.py)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import msgspec
import pytest

from bastion.protocol import CacheSource, GenerationStats, SamplingParams
from bastion.protocol.worker_wire import FromWorker, Generate
from bastion.worker.core import WorkerCore
from bastion.worker.engine import EngineError, common_prefix_length
from bastion.worker.fake import FakeEngine, FakeEngineConfig
from bastion.worker.kv_snapshots import SnapshotHeader, SnapshotStore, model_fingerprint
from bastion.worker.run_report import token_digest

MODEL = "m" * 32
LAYOUT = "fake; n_ctx 4096"


def store(tmp_path: Path, *, ram: int = 1 << 20, disk: int = 1 << 30, layout: str = LAYOUT) -> SnapshotStore:
    return SnapshotStore(model=MODEL, layout=layout, ram_bytes=ram, disk_dir=tmp_path / "kv", disk_bytes=disk)


def kv_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "kv").rglob("*.kv"))


# --- the store ----------------------------------------------------------------


def test_ram_is_capped_and_evicts_the_least_recently_used(tmp_path: Path) -> None:
    s = SnapshotStore(model=MODEL, layout=LAYOUT, ram_bytes=250)
    s.put("a", [1], b"x" * 100)
    s.put("b", [2], b"x" * 100)
    s.load("a")  # a is now more recent than b
    s.put("c", [3], b"x" * 100)
    assert s.ram_count == 2 and s.ram_bytes == 200
    assert s.tokens_of("b").tokens is None
    assert s.tokens_of("a").tokens == (1,) and s.tokens_of("c").tokens == (3,)


def test_a_snapshot_larger_than_the_ram_cap_is_not_held(tmp_path: Path) -> None:
    s = SnapshotStore(model=MODEL, layout=LAYOUT, ram_bytes=10)
    s.put("a", [1], b"x" * 11)
    assert s.ram_count == 0 and s.ram_bytes == 0


def test_replacing_a_session_counts_its_bytes_once(tmp_path: Path) -> None:
    s = SnapshotStore(model=MODEL, layout=LAYOUT, ram_bytes=1000)
    s.put("a", [1], b"x" * 100)
    s.put("a", [1, 2], b"x" * 300)
    assert s.ram_count == 1 and s.ram_bytes == 300


def test_snapshots_spill_to_disk_and_a_new_store_restores_them(tmp_path: Path) -> None:
    first = store(tmp_path)
    first.put("session one", [5, 6, 7], b"payload-1")
    first.close()
    assert first.disk_count == 1 and first.disk_bytes == kv_files(tmp_path)[0].stat().st_size
    second = store(tmp_path)  # a restarted worker
    assert second.disk_count == 1
    assert second.tokens_of("session one").tokens == (5, 6, 7)
    snapshot, from_disk, note = second.load("session one")
    assert snapshot is not None and snapshot.data == b"payload-1" and from_disk and note == ""
    assert second.ram_count == 1  # promoted
    assert second.load("session one")[1] is False


def test_evicted_from_ram_still_loads_from_disk(tmp_path: Path) -> None:
    s = store(tmp_path, ram=150)
    s.put("a", [1], b"a" * 100)
    s.put("b", [2], b"b" * 100)
    assert s.flush()
    snapshot, from_disk, _ = s.load("a")
    assert snapshot is not None and snapshot.data == b"a" * 100 and from_disk


def test_the_disk_cap_removes_the_oldest_files(tmp_path: Path) -> None:
    s = store(tmp_path, ram=0, disk=2 * 70_000)
    for age, name in enumerate(("old", "mid", "new")):
        s.put(name, [age], bytes([age]) * 60_000)
        assert s.flush()
        for path in kv_files(tmp_path):  # make the order of writing unambiguous
            os.utime(path, (path.stat().st_mtime - 10, path.stat().st_mtime - 10))
    assert s.disk_count == 2 and s.disk_bytes <= 2 * 70_000
    assert s.tokens_of("old").tokens is None
    assert s.tokens_of("mid").tokens == (1,) and s.tokens_of("new").tokens == (2,)


@pytest.mark.parametrize(
    ("layout", "expected"),
    [("fake; n_ctx 2048", "other context settings"), (LAYOUT, "")],
)
def test_a_snapshot_made_under_other_settings_is_discarded_with_a_note(
    tmp_path: Path, layout: str, expected: str
) -> None:
    first = store(tmp_path)
    first.put("a", [1, 2], b"data")
    first.close()
    second = store(tmp_path, layout=layout)
    lookup = second.tokens_of("a")
    if expected:
        assert lookup.tokens is None and expected in lookup.note
        assert kv_files(tmp_path) == [] and second.disk_count == 0
    else:
        assert lookup.tokens == (1, 2) and lookup.note == ""


def test_a_snapshot_of_another_model_file_is_discarded(tmp_path: Path) -> None:
    first = store(tmp_path)
    first.put("a", [1], b"data")
    first.close()
    # Same fingerprint prefix (same folder), different model: the header decides.
    other = SnapshotStore(model=MODEL[:16] + "n" * 16, layout=LAYOUT, ram_bytes=0, disk_dir=tmp_path / "kv",
                          disk_bytes=1 << 30)
    lookup = other.tokens_of("a")
    assert lookup.tokens is None and "another model file" in lookup.note


@pytest.mark.parametrize("damage", ["flip a payload byte", "truncate", "garbage", "empty"])
def test_a_corrupt_snapshot_is_discarded_never_restored(tmp_path: Path, damage: str) -> None:
    first = store(tmp_path)
    first.put("a", [1, 2, 3], b"0123456789" * 100)
    first.close()
    (path,) = kv_files(tmp_path)
    raw = bytearray(path.read_bytes())
    match damage:
        case "flip a payload byte":
            raw[-10] ^= 0xFF
        case "truncate":
            raw = raw[:-100]
        case "garbage":
            raw = bytearray(os.urandom(len(raw)))
        case "empty":
            raw = bytearray()
    path.write_bytes(bytes(raw))
    second = store(tmp_path)
    snapshot, _from_disk, note = second.load("a")
    assert snapshot is None
    assert note.startswith("KV snapshot discarded") and "prefilled instead" in note
    assert kv_files(tmp_path) == []
    assert second.load("a") == (None, False, "")  # gone, not reported twice


def test_a_disk_that_cannot_be_written_costs_only_the_spill(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the folder should be")
    s = SnapshotStore(model=MODEL, layout=LAYOUT, ram_bytes=1000, disk_dir=blocker, disk_bytes=1 << 30)
    s.put("a", [1], b"data")
    assert s.flush(5)
    assert s.load("a")[0] is not None and s.disk_count == 0


def test_a_failed_write_is_logged_and_the_writer_keeps_going(tmp_path: Path, caplog) -> None:
    s = store(tmp_path)
    target = s._path("a")
    assert target is not None
    target.mkdir()  # the rename onto it fails, whoever we run as
    s.put("a", [1], b"data")
    assert s.flush(5)
    assert "not written" in caplog.text and not list(target.parent.glob("*.tmp"))
    s.put("b", [2], b"data")
    assert s.flush(5) and s.disk_count == 1


def test_model_fingerprint_tells_files_apart(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"GGUF" + b"\0" * 100)
    b.write_bytes(b"GGUF" + b"\1" * 100)
    assert model_fingerprint(str(a)) != model_fingerprint(str(b))
    assert model_fingerprint(str(a)) == model_fingerprint(str(a))


# --- the core's choices ---------------------------------------------------------

GREEDY = SamplingParams(max_tokens=50, temperature=0.0)


def generate(core: WorkerCore, session: str, prompt: str, *, snapshot: bool = True) -> GenerationStats:
    out: list[FromWorker] = []
    core.generate(
        Generate(request_id="r", session_id=session, prompt=prompt, sampling=GREEDY, snapshot=snapshot),
        out.append,
        lambda: False,
    )
    (stats,) = [m for m in out if isinstance(m, GenerationStats)]
    return stats


def fake_core(tmp_path: Path, **config) -> tuple[FakeEngine, SnapshotStore, WorkerCore]:
    engine = FakeEngine(FakeEngineConfig(script=("ok",), **config))
    s = SnapshotStore(model=MODEL, layout=engine.state_layout(), ram_bytes=1 << 20, disk_dir=tmp_path / "kv",
                      disk_bytes=1 << 30)
    return engine, s, WorkerCore(engine, snapshots=s)


A1 = "<s>session A says hello, and a lot more besides. " * 4
B1 = "<s>session B is someone else entirely, talking. " * 4


def test_switching_sessions_restores_from_ram_instead_of_prefilling(tmp_path: Path) -> None:
    engine, _s, core = fake_core(tmp_path)
    first = generate(core, "A", A1)
    assert first.cache_source is CacheSource.NONE and first.cached_tokens == 0
    again = generate(core, "A", A1 + "ok</s> more")
    assert again.cache_source is CacheSource.LIVE and again.cached_tokens == len(engine.tokenize(A1 + "ok"))
    generate(core, "B", B1)
    back = generate(core, "A", A1 + "ok</s> more" + "ok</s> and more")
    assert back.cache_source is CacheSource.RAM
    assert back.cached_tokens == len(engine.tokenize(A1 + "ok</s> moreok"))


SHARED = "<s>You are the release assistant. Follow the checklist: " + "step, " * 40


def test_a_new_session_reuses_another_session_s_snapshot_by_exact_token_prefix(tmp_path: Path) -> None:
    """A stateless client (a new session name each time) or agents sharing a long system prompt:
    the snapshot sharing the longest prefix is restored and cut back to what is shared."""
    engine, store, core = fake_core(tmp_path)
    generate(core, "A", SHARED + "first question")
    generate(core, "B", B1)  # the live state is someone else's now
    reused = generate(core, "C", SHARED + "another question")
    shared = common_prefix_length(engine.tokenize(SHARED + "first question"), engine.tokenize(SHARED + "another"))
    assert reused.cache_source is CacheSource.RAM and reused.cached_tokens == shared
    # What the cache holds after the prefill is exactly the prompt, token for token.
    assert reused.cache_note == "" and reused.kv_digest == token_digest(engine.tokenize(SHARED + "another question"))


def test_a_near_miss_is_reused_only_up_to_where_it_differs(tmp_path: Path) -> None:
    """A prompt that differs from a snapshot in one token gets exactly the tokens before it: the
    state after the prefill is the new prompt's, never the snapshot's tail."""
    engine, _store, core = fake_core(tmp_path)
    generate(core, "A", SHARED + "first question")
    generate(core, "B", B1)
    near_miss = SHARED[:150] + "X" + SHARED[151:] + "first question"  # one byte-token changed
    reused = generate(core, "C", near_miss)
    before_the_change = common_prefix_length(engine.tokenize(SHARED + "first question"), engine.tokenize(near_miss))
    assert reused.cache_source is CacheSource.RAM and reused.cached_tokens == before_the_change > 100
    assert reused.kv_digest == token_digest(engine.tokenize(near_miss))
    # A short shared prefix is not worth replacing the live state for.
    generate(core, "D", B1 + "ok</s> more")
    short = generate(core, "E", SHARED[:40] + "zzz")
    assert short.cache_source is not CacheSource.RAM and short.cached_tokens <= 1


def test_a_restarted_worker_restores_a_session_from_disk(tmp_path: Path) -> None:
    engine, s, core = fake_core(tmp_path)
    generate(core, "A", A1)
    s.close()
    engine2, _s2, core2 = fake_core(tmp_path)
    stats = generate(core2, "A", A1 + "ok</s> next")
    assert stats.cache_source is CacheSource.DISK
    assert stats.cached_tokens == len(engine2.tokenize(A1 + "ok"))


def test_a_restarted_worker_finds_another_session_s_snapshot_on_disk_by_prefix(tmp_path: Path) -> None:
    engine, store, core = fake_core(tmp_path)
    generate(core, "A", SHARED + "first question")
    store.close()  # a new worker: nothing in RAM, the files on disk
    engine2, _store2, core2 = fake_core(tmp_path)
    stats = generate(core2, "C", SHARED + "another question")
    shared = common_prefix_length(engine2.tokenize(SHARED + "first question"), engine2.tokenize(SHARED + "another"))
    assert stats.cache_source is CacheSource.DISK and stats.cached_tokens == shared
    assert stats.kv_digest == token_digest(engine2.tokenize(SHARED + "another question"))


def test_one_shot_calls_leave_no_snapshot(tmp_path: Path) -> None:
    _engine, s, core = fake_core(tmp_path)
    generate(core, "oneshot-1", A1, snapshot=False)
    assert s.ram_count == 0 and s.flush() and s.disk_count == 0


def test_a_corrupt_disk_snapshot_gives_a_note_and_a_full_prefill(tmp_path: Path) -> None:
    _engine, s, core = fake_core(tmp_path)
    generate(core, "A", A1)
    s.close()
    (path,) = kv_files(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    _engine2, _s2, core2 = fake_core(tmp_path)
    stats = generate(core2, "A", A1 + "ok</s> next")
    assert stats.cache_source is CacheSource.NONE and stats.cached_tokens == 0
    assert "checksum" in stats.cache_note


def test_a_snapshot_the_engine_refuses_is_dropped_and_the_prompt_prefilled(tmp_path: Path) -> None:
    engine, s, core = fake_core(tmp_path)
    s.put("A", engine.tokenize(A1), b"not a fake state")
    stats = generate(core, "A", A1 + "more")
    assert stats.cache_source is CacheSource.NONE
    assert "engine refused" in stats.cache_note
    assert s.tokens_of("A").tokens != tuple(engine.tokenize(A1)) or s.ram_count == 1


def test_a_sliding_window_cache_snapshots_the_prompt_and_says_what_it_did(tmp_path: Path) -> None:
    engine, s, core = fake_core(tmp_path, partial_removal=False)
    generate(core, "A", A1)
    # Taken right after the prompt, so the next prompt extends it exactly.
    assert s.tokens_of("A").tokens == tuple(engine.tokenize(A1))
    # The reply comes back changed (e.g. trimmed by the template): the live
    # state cannot be cut back, the snapshot is restored.
    stats = generate(core, "A", A1 + "OK</s> next")
    assert stats.cache_source is CacheSource.RAM
    assert stats.cached_tokens == len(engine.tokenize(A1))
    assert "cannot be cut back" in stats.cache_note and "restored the turn-boundary snapshot" in stats.cache_note


def test_a_sliding_window_cache_without_a_snapshot_prefills_and_says_so(tmp_path: Path) -> None:
    engine = FakeEngine(FakeEngineConfig(script=("ok",), partial_removal=False))
    core = WorkerCore(engine)
    generate(core, "A", A1)
    stats = generate(core, "A", A1 + "OK</s> next")
    assert stats.cache_source is CacheSource.NONE and stats.cached_tokens == 0
    assert "prefilled the whole prompt" in stats.cache_note


def turns(n: int, first: int = 0) -> str:
    return "".join(f"<s>user {i}: a question of some length here</s>ok</s>" for i in range(first, first + n))


def test_pruned_turns_are_shifted_out_instead_of_evaluating_what_followed(tmp_path: Path) -> None:
    engine, _s, core = fake_core(tmp_path)
    system = "<s>system: be brief</s>"
    generate(core, "A", system + turns(6) + "<s>now</s>")
    held = engine.sequences()[0].kv_token_ids()
    # Turns 0-2 leave the prompt; the system message stays pinned at the top.
    pruned_prompt = system + turns(3, first=3) + "<s>now</s>ok</s><s>next</s>"
    stats = generate(core, "A", pruned_prompt)
    wanted = engine.tokenize(pruned_prompt)
    # The dropped range is exactly three turns long (it starts where the
    # prompts first differ, a few tokens into the first turn).
    assert stats.shifted_tokens == len(engine.tokenize(turns(3)))
    ((start, end),) = engine.shifted
    assert end - start == stats.shifted_tokens and start >= len(engine.tokenize(system))
    # Only the new tokens were evaluated, and the state holds exactly the new prompt.
    # (The reply's end token was sampled, never evaluated: it is new too.)
    assert stats.cached_tokens == len(wanted) - 1 - len(engine.tokenize("<s>next</s>"))
    assert stats.kv_digest == token_digest(wanted)
    assert len(held) > len(wanted) - 6


def test_no_shift_when_it_would_save_little(tmp_path: Path) -> None:
    engine, _s, core = fake_core(tmp_path)
    generate(core, "A", "<s>abcdefgh</s>xyz12</s>")
    stats = generate(core, "A", "<s>abcdefgh</s>xyz1")
    assert stats.shifted_tokens == 0 and engine.shifted == []


def test_a_run_cancelled_before_it_evaluated_anything_keeps_the_good_snapshot(tmp_path: Path) -> None:
    engine, s, core = fake_core(tmp_path)
    system = "<s>system: be brief</s>"
    generate(core, "A", system + turns(6) + "<s>now</s>")
    good = s.tokens_of("A").tokens
    # Pruned turns: the worker shifts the cache, then the cancel lands before
    # the first prefill chunk. The half-prepared state must not be kept.
    out: list[FromWorker] = []
    core.generate(Generate(request_id="c", session_id="A", prompt=system + turns(3, first=3) + "<s>x</s>",
                           sampling=GREEDY), out.append, lambda: True)
    assert engine.shifted and s.tokens_of("A").tokens == good


def test_a_snapshot_that_fails_to_load_leaves_the_live_reuse_alone(tmp_path: Path) -> None:
    engine = FakeEngine(FakeEngineConfig(script=("ok",)))
    disk_only = SnapshotStore(model=MODEL, layout=engine.state_layout(), ram_bytes=0, disk_dir=tmp_path / "kv",
                              disk_bytes=1 << 30)
    core = WorkerCore(engine, snapshots=disk_only)
    generate(core, "A", A1)
    half = A1[: len(A1) // 2]
    generate(core, "B", half + "something else entirely")  # live now shares half of A's prompt
    path = disk_only._path("A")
    assert path is not None
    raw = bytearray(path.read_bytes())
    raw[-2] ^= 0xFF
    path.write_bytes(bytes(raw))
    stats = generate(core, "A", A1 + "ok</s> more")
    assert "checksum" in stats.cache_note
    assert stats.cache_source is CacheSource.LIVE and stats.cached_tokens == len(engine.tokenize(half))


def test_a_damaged_token_in_the_header_fails_the_checksum(tmp_path: Path) -> None:
    first = store(tmp_path)
    first.put("a", [1, 2, 3], b"payload")
    first.close()
    (path,) = kv_files(tmp_path)
    raw = path.read_bytes()
    start = len(b"BASTIONKV1\n") + 4
    (length,) = struct.unpack("<I", raw[start - 4 : start])
    header = msgspec.msgpack.decode(raw[start : start + length], type=SnapshotHeader)
    forged = msgspec.msgpack.encode(msgspec.structs.replace(header, tokens=[1, 2, 4]))
    path.write_bytes(raw[: start - 4] + struct.pack("<I", len(forged)) + forged + raw[start + length :])
    snapshot, _from_disk, note = store(tmp_path).load("a")
    assert snapshot is None and "checksum" in note


def test_a_refused_context_shift_costs_a_prefill_not_the_request(tmp_path: Path, monkeypatch) -> None:
    engine, _s, core = fake_core(tmp_path)
    system = "<s>system: be brief</s>"
    generate(core, "A", system + turns(6) + "<s>now</s>")

    def refuse(start: int, end: int) -> None:
        raise EngineError("no shifting today")

    monkeypatch.setattr(engine.sequences()[0], "shift_out", refuse)
    stats = generate(core, "A", system + turns(3, first=3) + "<s>next</s>")
    assert stats.cache_source is CacheSource.NONE and stats.cached_tokens == 0
    assert "context shift refused" in stats.cache_note
