"""Several sequences of the real SmolLM2 GGUF decoded together in one llama.cpp context:
each gives exactly the tokens it gives alone, with flash attention on, and per-sequence
cancellation, snapshots and prefix reuse keep working."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from bastion.protocol import GenerationStats, SamplingParams, StopReason, TokenDelta
from bastion.protocol.worker_wire import FromWorker, Generate, GenerationFinished
from bastion.worker.core import WorkerCore
from bastion.worker.engine import BatchPart
from bastion.worker.kv_snapshots import SnapshotStore
from bastion.worker.llama_engine import LlamaCppEngine, LlamaEngineConfig
from tests.real_models import smollm2_gguf

pytestmark = pytest.mark.real_model

TOPICS = ("the sea", "a mountain village", "old clocks", "a rainy city")
PROMPTS = [
    f"<|im_start|>system\nYou are a concise assistant.<|im_end|>\n<|im_start|>user\n"
    f"Write two sentences about {topic}.<|im_end|>\n<|im_start|>assistant\n"
    for topic in TOPICS
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, loop_guard=False)


@pytest.fixture(scope="module")
def single() -> Iterator[LlamaCppEngine]:
    engine = LlamaCppEngine(LlamaEngineConfig(model_path=str(smollm2_gguf()), n_ctx=1024, threads=2))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def batched() -> Iterator[LlamaCppEngine]:
    engine = LlamaCppEngine(LlamaEngineConfig(model_path=str(smollm2_gguf()), n_ctx=1024, threads=2, n_seq=4))
    yield engine
    engine.close()


class Recorded:
    """What one request streamed."""

    def __init__(self) -> None:
        self.messages: list[FromWorker] = []
        self.cancel = False

    @property
    def text(self) -> str:
        return "".join(m.text for m in self.messages if isinstance(m, TokenDelta))

    @property
    def stats(self) -> GenerationStats:
        (stats,) = [m for m in self.messages if isinstance(m, GenerationStats)]
        return stats

    @property
    def finished(self) -> GenerationFinished:
        (finished,) = [m for m in self.messages if isinstance(m, GenerationFinished)]
        return finished


def reset(engine: LlamaCppEngine) -> None:
    for sequence in engine.sequences():
        sequence.reset()


def alone(engine: LlamaCppEngine, prompt: str, sampling: SamplingParams = GREEDY) -> Recorded:
    reset(engine)
    out = Recorded()
    WorkerCore(engine).generate(Generate(request_id="r", session_id="s", prompt=prompt, sampling=sampling),
                                out.messages.append, lambda: False)
    return out


def together(core: WorkerCore, prompts: Sequence[str], sampling: SamplingParams = GREEDY,
             sessions: Sequence[str] = ()) -> list[Recorded]:
    outs = []
    for i, prompt in enumerate(prompts):
        out = Recorded()
        session = sessions[i] if sessions else f"s{i}"
        core.start(Generate(request_id=f"r{i}", session_id=session, prompt=prompt, sampling=sampling),
                   out.messages.append, lambda out=out: out.cancel)
        outs.append(out)
    for _ in range(2000):
        if not core.active:
            break
        core.step()
    assert core.active == 0
    return outs


def batch_sizes(engine: LlamaCppEngine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records how many sequences each llama_decode carried."""
    sizes: list[int] = []
    evaluate = engine.evaluate_batch

    def recording(parts: Sequence[BatchPart], cancelled=None) -> None:  # noqa: ANN001
        sizes.append(len(parts))
        evaluate(parts, cancelled)

    monkeypatch.setattr(engine, "evaluate_batch", recording)
    return sizes


def test_four_sequences_decoded_together_give_exactly_their_tokens_alone(
    single: LlamaCppEngine, batched: LlamaCppEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = [alone(single, prompt) for prompt in PROMPTS]
    assert len({e.text for e in expected}) == 4 and all(len(e.text) > 40 for e in expected)
    reset(batched)
    sizes = batch_sizes(batched, monkeypatch)
    got = together(WorkerCore(batched), PROMPTS)
    assert max(sizes) == 4 and sizes.count(4) >= 10  # they really were decoded together
    for want, have in zip(expected, got):
        assert have.text == want.text
        assert have.stats.kv_digest == want.stats.kv_digest
        assert have.stats.completion_tokens == want.stats.completion_tokens


def test_a_sequence_joining_midway_gets_its_own_exact_reply_and_the_others_are_undisturbed(
    single: LlamaCppEngine, batched: LlamaCppEngine
) -> None:
    expected = [alone(single, prompt).text for prompt in PROMPTS[:2]]
    reset(batched)
    core = WorkerCore(batched)
    first = Recorded()
    core.start(Generate(request_id="a", session_id="a", prompt=PROMPTS[0], sampling=GREEDY),
               first.messages.append, lambda: False)
    for _ in range(10):
        core.step()  # a is decoding when b's prompt arrives
    second = Recorded()
    core.start(Generate(request_id="b", session_id="b", prompt=PROMPTS[1], sampling=GREEDY),
               second.messages.append, lambda: False)
    while core.active:
        core.step()
    assert [first.text, second.text] == expected


def test_cancelling_one_sequence_leaves_the_others_exact(single: LlamaCppEngine, batched: LlamaCppEngine) -> None:
    expected = alone(single, PROMPTS[2]).text
    reset(batched)
    core = WorkerCore(batched)
    outs = [Recorded() for _ in range(3)]
    for i, out in enumerate(outs):
        core.start(Generate(request_id=f"r{i}", session_id=f"s{i}", prompt=PROMPTS[i], sampling=GREEDY),
                   out.messages.append, lambda out=out: out.cancel)
    for _ in range(8):
        core.step()
    outs[0].cancel = outs[1].cancel = True
    while core.active:
        core.step()
    assert outs[0].finished.stop_reason is outs[1].finished.stop_reason is StopReason.CANCELLED
    assert outs[2].text == expected and outs[2].finished.stop_reason is not StopReason.CANCELLED


def test_a_sequence_s_snapshot_restores_into_another_sequence(batched: LlamaCppEngine, tmp_path: Path) -> None:
    """Snapshots are per session, not per sequence: a session continued on another sequence
    (its own is busy) restores its state there and answers as if it had stayed."""
    store = SnapshotStore(model="smol", layout=batched.state_layout(), ram_bytes=64 << 20)
    reset(batched)
    core = WorkerCore(batched, snapshots=store)
    first_turn = PROMPTS[0]
    (turn,) = together(core, [first_turn], sessions=["kept"])
    follow_up = first_turn + turn.text + "<|im_end|>\n<|im_start|>user\nAnd one more.<|im_end|>\n<|im_start|>assistant\n"
    # Another long request holds the session's sequence; the follow-up must go elsewhere.
    blocker = Recorded()
    core.start(Generate(request_id="blk", session_id="other", prompt=first_turn + turn.text + " filler",
                        sampling=SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)),
               blocker.messages.append, lambda: False)
    (moved,) = together(core, [follow_up], sessions=["kept"])
    reset_and_fresh = alone(batched, follow_up)
    assert moved.stats.cache_source.value == "ram"
    assert moved.stats.cached_tokens >= len(batched.tokenize(first_turn)) - 2
    assert moved.text == reset_and_fresh.text
    assert moved.stats.kv_digest == reset_and_fresh.stats.kv_digest


def test_parts_given_out_of_order_are_computed_in_sequence_order_and_keep_their_own_logits(
    batched: LlamaCppEngine,
) -> None:
    """llama.cpp computes an out-of-order batch of a non-unified cache a token at a time (half the
    speed): the engine orders the parts, and each sequence must still sample from its own logits."""
    reset(batched)
    sequences = list(batched.sequences())[:3]
    prompts = [batched.tokenize(prompt) for prompt in PROMPTS[:3]]
    batched.evaluate_batch([(sequences[i], prompts[i]) for i in (2, 0, 1)])
    batch = batched._batch
    order = [batch.seq_id[i][0] for i in range(batch.n_tokens)]
    assert order == sorted(order)
    greedy = SamplingParams(temperature=0.0)
    mixed = []
    for sequence in sequences:
        sequence.begin_sampling(greedy)
        mixed.append(sequence.sample())
        sequence.end_sampling()
    alone = []
    for sequence, prompt in zip(sequences, prompts):
        sequence.reset()
        sequence.evaluate(prompt)
        sequence.begin_sampling(greedy)
        alone.append(sequence.sample())
        sequence.end_sampling()
    assert mixed == alone and len(set(alone)) > 1
