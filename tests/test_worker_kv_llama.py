"""KV snapshots and context shift with the real engines: SmolLM2 (a full
cache) and Gemma 3 270M (a sliding-window cache). The point of each test is
that reuse never changes the text: a restored or shifted state answers the
way the prompt says, and what the KV holds is exactly the prompt's tokens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest

from bastion.protocol import CacheSource, GenerationStats, HomeLayout, KvCacheType, SamplingParams, TokenDelta
from bastion.protocol.worker_wire import FromWorker, Generate
from bastion.supervisor.models.registry import ModelRegistry
from bastion.supervisor.models.sources import resolve_gguf
from bastion.worker.core import WorkerCore
from bastion.worker.engine import common_prefix_length
from bastion.worker.kv_snapshots import SnapshotStore, model_fingerprint
from bastion.worker.llama_engine import LlamaCppEngine, LlamaEngineConfig
from bastion.worker.run_report import token_digest
from tests.real_models import smollm2_gguf

pytestmark = pytest.mark.real_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def chatml(turns: list[tuple[str, str]], new: str, system: str = "You are a helpful assistant.") -> str:
    text = f"<|im_start|>system\n{system}<|im_end|>\n"
    text += "".join(f"<|im_start|>user\n{u}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n" for u, a in turns)
    return text + f"<|im_start|>user\n{new}<|im_end|>\n<|im_start|>assistant\n"


def gemma_chat(turns: list[tuple[str, str]], new: str) -> str:
    text = "".join(f"<start_of_turn>user\n{u}<end_of_turn>\n<start_of_turn>model\n{a}<end_of_turn>\n" for u, a in turns)
    return text + f"<start_of_turn>user\n{new}<end_of_turn>\n<start_of_turn>model\n"


def generate(
    core: WorkerCore, session: str, prompt: str, sampling: SamplingParams = GREEDY
) -> tuple[str, GenerationStats]:
    out: list[FromWorker] = []
    core.generate(Generate(request_id="r", session_id=session, prompt=prompt, sampling=sampling), out.append,
                  lambda: False)
    (stats,) = [m for m in out if isinstance(m, GenerationStats)]
    return "".join(m.text for m in out if isinstance(m, TokenDelta)), stats


def fresh_reply(engine: LlamaCppEngine, prompt: str) -> str:
    """The reply with nothing reused: the reference every cached path must match."""
    engine.sequences()[0].reset()
    text, stats = generate(WorkerCore(engine), "reference", prompt)
    assert stats.cached_tokens == 0
    return text


def store_for(engine: LlamaCppEngine, path: Path, kv_dir: Path) -> SnapshotStore:
    return SnapshotStore(model=model_fingerprint(str(path)), layout=engine.state_layout(), ram_bytes=256 << 20,
                         disk_dir=kv_dir, disk_bytes=1 << 30)


@pytest.fixture(scope="module")
def smol() -> Iterator[LlamaCppEngine]:
    engine = LlamaCppEngine(LlamaEngineConfig(model_path=str(smollm2_gguf()), n_ctx=1024, threads=2))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    layout = HomeLayout(tmp_path_factory.mktemp("gemma-kv-home"))
    return resolve_gguf(ModelRegistry.load(layout).lookup("gemma3-270m"), layout)


@pytest.fixture(scope="module")
def gemma(gemma_path: Path) -> Iterator[LlamaCppEngine]:
    engine = LlamaCppEngine(LlamaEngineConfig(model_path=str(gemma_path), n_ctx=2048, threads=2))
    yield engine
    engine.close()


QUESTION = "Name three colours of the rainbow and say which one you like best, with a reason."
OTHER = "What is the boiling point of water at sea level, in degrees Celsius? Answer briefly."


def test_switching_back_to_a_session_restores_its_snapshot_and_answers_the_same(
    smol: LlamaCppEngine, tmp_path: Path
) -> None:
    smol.sequences()[0].reset()
    core = WorkerCore(smol, snapshots=store_for(smol, smollm2_gguf(), tmp_path))
    reply_a, _ = generate(core, "A", chatml([], QUESTION))
    generate(core, "B", chatml([], OTHER, system="You answer in one short sentence."))
    follow_up = chatml([(QUESTION, reply_a)], "Why that one?")
    text, stats = generate(core, "A", follow_up)
    assert stats.cache_source is CacheSource.RAM
    # Everything but the new user turn (and the reply's end token) came back.
    new = smol.tokenize("<|im_end|>\n<|im_start|>user\nWhy that one?<|im_end|>\n<|im_start|>assistant\n")
    assert stats.cached_tokens >= stats.prompt_tokens - len(new) - 1
    assert stats.kv_digest == token_digest(smol.tokenize(follow_up))
    assert text == fresh_reply(smol, follow_up)


def test_a_new_session_with_a_known_system_prompt_starts_from_another_s_snapshot(
    smol: LlamaCppEngine, tmp_path: Path
) -> None:
    system = "You are the support assistant of a bicycle shop. " + "Be precise and friendly. " * 20
    smol.sequences()[0].reset()
    core = WorkerCore(smol, snapshots=store_for(smol, smollm2_gguf(), tmp_path))
    generate(core, "A", chatml([], QUESTION, system=system))
    generate(core, "B", chatml([], OTHER, system="You answer in one short sentence."))
    prompt = chatml([], "Do you repair brakes?", system=system)
    text, stats = generate(core, "C", prompt)
    shared = common_prefix_length(smol.tokenize(chatml([], QUESTION, system=system)), smol.tokenize(prompt))
    assert stats.cache_source is CacheSource.RAM and stats.cached_tokens == shared > 100
    assert stats.kv_digest == token_digest(smol.tokenize(prompt))
    assert text == fresh_reply(smol, prompt)


def test_a_q8_0_cache_restores_as_exactly_as_an_f16_one(tmp_path: Path) -> None:
    """The quantized cache's snapshot restores the same bytes it saved: the follow-up answers
    as a fresh prefill into that cache does, and an f16 worker refuses its snapshot."""
    path = smollm2_gguf()
    q8 = LlamaCppEngine(LlamaEngineConfig(model_path=str(path), n_ctx=1024, threads=2,
                                          kv_cache_type=KvCacheType.Q8_0))  # fmt: skip
    try:
        assert "kv q8_0" in q8.state_layout()
        core = WorkerCore(q8, snapshots=store_for(q8, path, tmp_path))
        reply_a, _ = generate(core, "A", chatml([], QUESTION))
        generate(core, "B", chatml([], OTHER, system="You answer in one short sentence."))
        follow_up = chatml([(QUESTION, reply_a)], "Why that one?")
        text, stats = generate(core, "A", follow_up)
        assert stats.cache_source is CacheSource.RAM and stats.kv_digest == token_digest(q8.tokenize(follow_up))
        assert text == fresh_reply(q8, follow_up)
        store_for(q8, path, tmp_path).close()
    finally:
        q8.close()
    f16 = LlamaCppEngine(LlamaEngineConfig(model_path=str(path), n_ctx=1024, threads=2))
    try:
        _, stats = generate(WorkerCore(f16, snapshots=store_for(f16, path, tmp_path)), "A", follow_up)
        assert stats.cache_source is CacheSource.NONE and "other context settings" in stats.cache_note
    finally:
        f16.close()


def test_a_new_worker_restores_the_session_from_disk_and_answers_the_same(tmp_path: Path) -> None:
    path = smollm2_gguf()
    first = LlamaCppEngine(LlamaEngineConfig(model_path=str(path), n_ctx=1024, threads=2))
    store = store_for(first, path, tmp_path)
    reply, _ = generate(WorkerCore(first, snapshots=store), "A", chatml([], QUESTION))
    store.close()
    first.close()
    second = LlamaCppEngine(LlamaEngineConfig(model_path=str(path), n_ctx=1024, threads=2))
    try:
        follow_up = chatml([(QUESTION, reply)], "Why that one?")
        text, stats = generate(WorkerCore(second, snapshots=store_for(second, path, tmp_path)), "A", follow_up)
        assert stats.cache_source is CacheSource.DISK and stats.cached_tokens > stats.prompt_tokens // 2
        assert text == fresh_reply(second, follow_up)
        # Another context size is another layout: that snapshot is discarded, not restored.
    finally:
        second.close()
    third = LlamaCppEngine(LlamaEngineConfig(model_path=str(path), n_ctx=2048, threads=2))
    try:
        text, stats = generate(WorkerCore(third, snapshots=store_for(third, path, tmp_path)), "A", follow_up)
        assert stats.cache_source is CacheSource.NONE and "other context settings" in stats.cache_note
        assert text == fresh_reply(third, follow_up)
    finally:
        third.close()
    # Without flash attention llama.cpp lays V out transposed: a snapshot of the other kind is discarded too.
    fourth = LlamaCppEngine(LlamaEngineConfig(model_path=str(path), n_ctx=1024, threads=2, flash_attn=False))
    try:
        assert fourth.state_layout() != first.state_layout()
        text, stats = generate(WorkerCore(fourth, snapshots=store_for(fourth, path, tmp_path)), "A", follow_up)
        assert stats.cache_source is CacheSource.NONE and "other context settings" in stats.cache_note
    finally:
        fourth.close()


def test_a_corrupt_snapshot_on_disk_is_discarded_and_the_answer_is_unchanged(
    smol: LlamaCppEngine, tmp_path: Path
) -> None:
    smol.sequences()[0].reset()
    store = store_for(smol, smollm2_gguf(), tmp_path)
    reply, _ = generate(WorkerCore(smol, snapshots=store), "A", chatml([], QUESTION))
    store.close()
    (snapshot,) = tmp_path.rglob("*.kv")
    raw = bytearray(snapshot.read_bytes())
    raw[len(raw) // 2] ^= 0x55  # inside the KV data: llama.cpp itself would accept it
    snapshot.write_bytes(bytes(raw))
    smol.sequences()[0].reset()
    follow_up = chatml([(QUESTION, reply)], "Why that one?")
    text, stats = generate(WorkerCore(smol, snapshots=store_for(smol, smollm2_gguf(), tmp_path)), "A", follow_up)
    assert stats.cache_source is CacheSource.NONE and "corrupt" in stats.cache_note
    assert text == fresh_reply(smol, follow_up)


def test_the_engine_refuses_a_state_of_another_model_without_crashing(
    smol: LlamaCppEngine, gemma: LlamaCppEngine
) -> None:
    gemma.sequences()[0].reset()
    generate(WorkerCore(gemma), "g", gemma_chat([], QUESTION))
    foreign = gemma.sequences()[0].save_sequence()
    tokens = gemma.sequences()[0].kv_token_ids()
    assert smol.sequences()[0].restore_sequence(foreign, tokens) is False
    assert smol.sequences()[0].kv_tokens() == 0
    assert fresh_reply(smol, chatml([], OTHER))  # still serves


def test_pruned_turns_are_shifted_out_and_the_kv_matches_a_fresh_render(smol: LlamaCppEngine) -> None:
    smol.sequences()[0].reset()
    core = WorkerCore(smol)
    turns: list[tuple[str, str]] = []
    for i in range(5):
        question = f"Question {i}: describe the number {i} and one of its properties in a few words."
        reply, _ = generate(core, "A", chatml(turns, question))
        turns.append((question, reply))
    pruned = chatml(turns[2:], "Which of those numbers is the largest?")  # the two oldest turns leave
    text, stats = generate(core, "A", pruned)
    wanted = smol.tokenize(pruned)
    assert stats.shifted_tokens > 0 and stats.cache_source is CacheSource.LIVE
    assert stats.prompt_tokens - stats.cached_tokens < 30  # only the new turn was evaluated
    # What the KV holds, position by position, is what a fresh render tokenizes to.
    assert stats.kv_digest == token_digest(wanted)
    memory = llama_cpp.llama_get_memory(smol._llama.ctx)
    assert llama_cpp.llama_memory_seq_pos_min(memory, 0) == 0
    assert llama_cpp.llama_memory_seq_pos_max(memory, 0) == smol.sequences()[0].kv_tokens() - 1
    assert text  # the shifted state still produces an answer


def test_gemma_sliding_window_restores_the_turn_boundary_snapshot_or_prefills_and_says_so(
    gemma: LlamaCppEngine, tmp_path: Path, gemma_path: Path
) -> None:
    gemma.sequences()[0].reset()
    assert gemma.describe().partial_reuse is False and not gemma.sequences()[0].can_shift()
    core = WorkerCore(gemma, snapshots=store_for(gemma, gemma_path, tmp_path))
    # Long enough that the window (512 positions) no longer reaches the start.
    history = [(f"Tell me fact number {i} about the ocean, in detail please.", "The ocean is vast. " * 12)
               for i in range(8)]
    prompt = gemma_chat(history, QUESTION)
    reply, first = generate(core, "A", prompt)
    assert first.prompt_tokens > 600
    generate(core, "B", gemma_chat([], OTHER))
    # Back to A: its snapshot was taken right after its prompt, which the next
    # prompt extends exactly, so it is restored whole.
    follow_up = gemma_chat([*history, (QUESTION, reply)], "Why?")
    text, stats = generate(core, "A", follow_up)
    assert stats.cache_source is CacheSource.RAM and stats.cached_tokens == first.prompt_tokens
    # A restored window holds only the last positions; a prompt that differs
    # near the start (an edited first message) cannot reuse it: prefilled, and said.
    edited = gemma_chat([("Tell me a fact about lakes.", "Lakes are calm."), *history[1:], (QUESTION, reply)], "Why?")
    edited_text, edited_stats = generate(core, "A", edited)
    assert edited_stats.cache_source is CacheSource.NONE and edited_stats.cached_tokens == 0
    assert "sliding-window" in edited_stats.cache_note and "prefilled the whole prompt" in edited_stats.cache_note
    assert text == fresh_reply(gemma, follow_up)
    assert edited_text == fresh_reply(gemma, edited)


def test_gemma_switching_sessions_restores_and_answers_the_same(gemma: LlamaCppEngine, tmp_path: Path,
                                                                gemma_path: Path) -> None:
    gemma.sequences()[0].reset()
    core = WorkerCore(gemma, snapshots=store_for(gemma, gemma_path, tmp_path))
    reply, _ = generate(core, "A", gemma_chat([], QUESTION))
    generate(core, "B", gemma_chat([], OTHER))
    follow_up = gemma_chat([(QUESTION, reply)], "Why that one?")
    text, stats = generate(core, "A", follow_up)
    assert stats.cache_source is CacheSource.RAM and stats.cached_tokens > 0
    assert text == fresh_reply(gemma, follow_up)


def test_gemma_sequences_decoded_together_give_exactly_their_tokens_alone(gemma: LlamaCppEngine,
                                                                          gemma_path: Path) -> None:
    """A sliding-window model batched: each sequence keeps its own window of cells."""
    prompts = [gemma_chat([], QUESTION), gemma_chat([], OTHER)]
    expected = [fresh_reply(gemma, prompt) for prompt in prompts]
    pair = LlamaCppEngine(LlamaEngineConfig(model_path=str(gemma_path), n_ctx=2048, threads=2, n_seq=2))
    try:
        core = WorkerCore(pair)
        outs: list[list[FromWorker]] = [[], []]
        for i, prompt in enumerate(prompts):
            core.start(Generate(request_id=f"r{i}", session_id=f"s{i}", prompt=prompt, sampling=GREEDY),
                       outs[i].append, lambda: False)
        for _ in range(500):
            if not core.active:
                break
            core.step()
        got = ["".join(m.text for m in out if isinstance(m, TokenDelta)) for out in outs]
        assert got == expected and all(got)
    finally:
        pair.close()
