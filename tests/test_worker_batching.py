"""WorkerCore with several engine sequences: generations decoded together (continuous batching),
driven in-process by FakeEngine. The same scheduling serves one sequence (test_worker_core.py)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from bastion.protocol import (
    CacheSource,
    ErrorCode,
    GenerationStats,
    RequestFailed,
    SamplingParams,
    StopReason,
    TokenDelta,
)
from bastion.protocol.worker_wire import FromWorker, Generate, GenerationFinished
from bastion.worker import core as core_module
from bastion.worker.core import CoreConfig, WorkerCore
from bastion.worker.fake import FakeEngine, FakeEngineConfig


def make_core(n_seq: int = 2, **fake: object) -> tuple[WorkerCore, FakeEngine]:
    engine = FakeEngine(FakeEngineConfig(n_seq=n_seq, **fake))  # type: ignore[arg-type]
    return WorkerCore(engine, CoreConfig(prefill_chunk=256)), engine


class Client:
    """One request's messages, as the process shell would carry them."""

    def __init__(self, core: WorkerCore, request_id: str, prompt: str, *, session: str = "",
                 cancelled: Callable[[], bool] = lambda: False, **sampling: object) -> None:
        self.messages: list[FromWorker] = []
        self.cancel = False
        request = Generate(request_id=request_id, session_id=session or request_id, prompt=prompt,
                           sampling=SamplingParams(**sampling))  # type: ignore[arg-type]
        core.start(request, self.messages.append, lambda: self.cancel or cancelled())

    @property
    def text(self) -> str:
        return "".join(m.text for m in self.messages if isinstance(m, TokenDelta))

    @property
    def finished(self) -> GenerationFinished | None:
        ends = [m for m in self.messages if isinstance(m, GenerationFinished)]
        assert len(ends) <= 1
        return ends[0] if ends else None

    @property
    def stats(self) -> GenerationStats:
        (stats,) = [m for m in self.messages if isinstance(m, GenerationStats)]
        return stats

    @property
    def failure(self) -> RequestFailed:
        (failed,) = [m for m in self.messages if isinstance(m, RequestFailed)]
        return failed


def drain(core: WorkerCore, limit: int = 10_000) -> int:
    steps = 0
    while core.active and steps < limit:
        core.step()
        steps += 1
    assert core.active == 0, "generations still active after the step limit"
    return steps


def test_two_generations_decode_together_each_with_its_own_reply() -> None:
    core, engine = make_core(script=("first reply", "second one"))
    a = Client(core, "a", "question a")
    b = Client(core, "b", "question b")
    assert core.active == 2
    drain(core)
    assert a.text == "first reply" and b.text == "second one"
    assert a.finished and a.finished.stop_reason is StopReason.STOP
    assert b.finished and b.finished.stop_reason is StopReason.STOP
    # Both prompts in one batch, then one token of each per batch.
    assert engine.batches[0] == [(0, 11), (1, 11)]
    decode_steps = [batch for batch in engine.batches[1:] if len(batch) == 2]
    assert len(decode_steps) >= 9 and all(batch == [(0, 1), (1, 1)] for batch in decode_steps)
    # Each sampled token is evaluated when another follows it: 11 + 11 and 11 + 10 held in all.
    assert core.kv_tokens == 43 and a.finished.kv_tokens in (42, 43) and b.finished.kv_tokens in (42, 43)


def test_a_request_takes_the_free_sequence_that_holds_most_of_its_prompt() -> None:
    core, engine = make_core(script=("ok",))
    Client(core, "a", "<s>alpha conversation, long enough to tell apart</s>", session="A")
    Client(core, "b", "<s>beta conversation, something else entirely</s>", session="B")
    drain(core)
    lanes_before = [seq.kv_token_ids() for seq in engine.sequences()]
    again = Client(core, "b2", "<s>beta conversation, something else entirely</s>ok</s><s>and more", session="B2")
    drain(core)
    assert again.stats.cached_tokens > 40 and again.stats.cache_source is CacheSource.LIVE
    # It went to the sequence that held beta; alpha's sequence is untouched.
    assert engine.sequences()[0].kv_token_ids() == lanes_before[0]


def test_ties_go_to_the_least_recently_used_sequence() -> None:
    core, engine = make_core(n_seq=3, script=("ok",))
    for name in ("a", "b", "c"):  # one sequence each: a BOS in common does not draw b to a's sequence
        Client(core, name, f"{name * 20}")
        drain(core)
    Client(core, "d", "zzzz")
    drain(core)
    # a's sequence was used longest ago: d replaced it, b and c stay.
    held = [bytes(t for t in seq.kv_token_ids() if t < 256) for seq in engine.sequences()]
    assert held[0].startswith(b"zzzz") and held[1].startswith(b"b" * 20) and held[2].startswith(b"c" * 20)


def test_cancelling_one_generation_leaves_the_other_running() -> None:
    core, _ = make_core(script=("a long reply that takes a while", "another long reply here"))
    a = Client(core, "a", "first")
    b = Client(core, "b", "second")
    for _ in range(5):
        core.step()
    a.cancel = True
    drain(core)
    assert a.finished and a.finished.stop_reason is StopReason.CANCELLED and len(a.text) < 10
    assert b.text == "another long reply here" and b.finished and b.finished.stop_reason is StopReason.STOP


def test_a_cancel_noticed_inside_a_shared_batch_keeps_the_others_tokens() -> None:
    core, engine = make_core(script=("steady reply", "never"))
    a = Client(core, "a", "short")
    core.step()  # a's prompt
    armed = False
    b = Client(core, "b", "x" * 600, cancelled=lambda: armed)
    armed = True  # noticed inside the next batch, which holds a's token and b's first chunk
    drain(core)
    assert b.finished and b.finished.stop_reason is StopReason.CANCELLED and b.text == ""
    assert engine.sequences()[1].kv_tokens() == 0
    assert a.text == "steady reply" and a.finished and a.finished.stop_reason is StopReason.STOP
    assert True in engine.checked_cancel_inside


def test_a_long_prompt_shares_batches_with_decoding_generations() -> None:
    core, engine = make_core(script=("decoding while the other prefills", "done"))
    a = Client(core, "a", "hi")
    core.step()
    b = Client(core, "b", "y" * 700)
    drain(core)
    assert a.finished and b.finished and b.text == "done"
    mixed = [batch for batch in engine.batches if len(batch) == 2 and batch[1][1] > 1]
    assert mixed, engine.batches
    assert all(sum(n for _, n in batch) <= 256 for batch in engine.batches)
    # The decoding generation's token comes first and is never held back by the prompt.
    assert all(batch[0] == (0, 1) for batch in mixed)
    # No prompt ends on a lone token (its last logits come from two or more).
    prompt_parts = [n for batch in engine.batches for seq, n in batch if seq == 1 and n > 1]
    assert sum(prompt_parts) == 701 and prompt_parts[-1] >= 2


def test_an_engine_failure_ends_only_the_generation_that_caused_it() -> None:
    core, engine = make_core(script=("survivor reply", "unused"))
    a = Client(core, "a", "fine prompt")
    core.step()
    b = Client(core, "b", "this prompt will <<fail>> in the engine")
    drain(core)
    assert b.failure.code is ErrorCode.INTERNAL and "scripted failure" in b.failure.message
    assert b.finished and b.finished.stop_reason is StopReason.ERROR
    assert engine.sequences()[1].kv_tokens() == 0  # its half-written state was dropped
    assert a.text == "survivor reply" and a.finished and a.finished.stop_reason is StopReason.STOP


def test_more_requests_than_sequences_are_refused_as_busy() -> None:
    core, _ = make_core(n_seq=1, script=("one",))
    Client(core, "a", "first")
    late = Client(core, "b", "second")
    assert late.failure.code is ErrorCode.BUSY and late.finished and late.finished.stop_reason is StopReason.ERROR
    drain(core)


def test_generate_serves_its_request_alongside_others_already_started() -> None:
    core, _ = make_core(script=("background", "foreground"))
    background = Client(core, "a", "first")
    out: list[FromWorker] = []
    request = Generate(request_id="b", session_id="b", prompt="second", sampling=SamplingParams())
    assert core.generate(request, out.append, lambda: False) is StopReason.STOP
    assert "".join(m.text for m in out if isinstance(m, TokenDelta)) == "foreground"
    drain(core)
    assert background.text == "background"


def test_shared_generations_send_their_text_at_most_once_an_interval() -> None:
    """Each message is a hop through the supervisor and the gateway, paid by every stream's decode:
    a generation's tokens travel together, the first at once."""
    core, _ = make_core(script=("a reply of several words", "another reply, also long"))
    a = Client(core, "a", "first")
    b = Client(core, "b", "second")
    drain(core)
    for client, reply in ((a, "a reply of several words"), (b, "another reply, also long")):
        deltas = [m for m in client.messages if isinstance(m, TokenDelta)]
        assert client.text == reply
        assert len(deltas[0].text) == 1  # the first token is not held back
        assert len(deltas) < len(reply)  # the rest travelled together
        counts = [d.n for d in deltas]
        assert counts == sorted(set(counts)) and counts[-1] == client.stats.completion_tokens


def test_a_generation_alone_is_held_to_the_interval_too() -> None:
    core, _ = make_core(script=("alone here",))
    a = Client(core, "a", "first")
    drain(core)
    deltas = [m for m in a.messages if isinstance(m, TokenDelta)]
    assert a.text == "alone here" and deltas[0].n == 1 and deltas[-1].n == len("alone here")
    assert len(deltas) < len("alone here")


def test_a_model_slower_than_the_interval_sends_every_token(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every reading of the clock is two intervals after the one before: tokens slower than the interval.
    ticks = itertools.count()
    monkeypatch.setattr(core_module.time, "perf_counter", lambda: next(ticks) * 2 * core_module.DELTA_INTERVAL_S)
    core, _ = make_core(script=("slow one",))
    a = Client(core, "a", "first")
    drain(core)
    assert [m.n for m in a.messages if isinstance(m, TokenDelta)] == list(range(1, len("slow one") + 1))


def test_log_probabilities_keep_one_message_per_token_even_when_shared() -> None:
    core, _ = make_core(script=("with logprobs", "other"))
    a = Client(core, "a", "first", logprobs=2)
    Client(core, "b", "second")
    drain(core)
    assert [m.n for m in a.messages if isinstance(m, TokenDelta)] == list(range(1, len("with logprobs") + 1))
