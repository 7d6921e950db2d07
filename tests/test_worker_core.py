"""WorkerCore driven in-process by FakeEngine: the generation contract, no sockets."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bastion.protocol import ErrorCode, GenerationStats, RequestFailed, SamplingParams, StopReason, TokenDelta
from bastion.protocol.worker_wire import FromWorker, Generate, GenerationFinished
from bastion.worker.core import CoreConfig, WorkerCore, prefill_chunks
from bastion.worker.fake import FakeEngine, FakeEngineConfig
from bastion.worker.text import TextStream


def make_core(**fake: object) -> tuple[WorkerCore, FakeEngine]:
    engine = FakeEngine(FakeEngineConfig(**fake))  # type: ignore[arg-type]
    return WorkerCore(engine, CoreConfig(prefill_chunk=256, delta_interval_s=0.0)), engine  # token by token


def run(
    core: WorkerCore,
    prompt: str,
    *,
    request_id: str = "r1",
    cancelled: Callable[[], bool] = lambda: False,
    **sampling: object,
) -> list[FromWorker]:
    out: list[FromWorker] = []
    params = SamplingParams(**sampling)  # type: ignore[arg-type]
    request = Generate(request_id=request_id, session_id="s", prompt=prompt, sampling=params)
    core.generate(request, out.append, cancelled)
    return out


def text_of(messages: list[FromWorker]) -> str:
    return "".join(m.text for m in messages if isinstance(m, TokenDelta))


def ending(messages: list[FromWorker]) -> tuple[GenerationStats, GenerationFinished]:
    """The last two messages must be the one stats and the one finished."""
    assert sum(isinstance(m, GenerationStats) for m in messages) == 1
    assert sum(isinstance(m, GenerationFinished) for m in messages) == 1
    stats, finished = messages[-2], messages[-1]
    assert isinstance(stats, GenerationStats) and isinstance(finished, GenerationFinished)
    assert all(isinstance(m, TokenDelta) for m in messages[:-2])
    return stats, finished


def failure(messages: list[FromWorker]) -> RequestFailed:
    assert len(messages) == 2, messages
    failed, finished = messages
    assert isinstance(failed, RequestFailed) and isinstance(finished, GenerationFinished)
    assert finished.stop_reason is StopReason.ERROR and failed.request_id == finished.request_id
    return failed


def test_streams_reply_then_one_stats_and_one_finished() -> None:
    core, _ = make_core(script=("Hello there.",))
    out = run(core, "Hi")
    stats, finished = ending(out)
    deltas = [m for m in out if isinstance(m, TokenDelta)]
    assert text_of(out) == "Hello there."
    assert [d.n for d in deltas] == list(range(1, 13))
    assert all(d.request_id == "r1" and d.tokens_per_s >= 0 for d in deltas)
    assert finished.stop_reason is StopReason.STOP
    assert finished.completion_tokens == stats.completion_tokens == 12
    assert stats.prompt_tokens == 3  # BOS + "Hi"
    assert stats.cached_tokens == 0
    assert stats.kv_tokens == finished.kv_tokens == 3 + 12
    assert stats.ttft_ms > 0 and stats.prefill_ms > 0 and stats.decode_ms >= 0


def test_progress_only_grows_with_evaluated_tokens() -> None:
    core, _ = make_core(script=("abc",))
    assert core.progress == 0
    run(core, "xy")
    first = core.progress
    assert first == 3 + 3  # BOS x y, then a b c
    run(core, "xy")
    assert core.progress > first


def test_extended_prompt_reuses_common_prefix() -> None:
    core, engine = make_core(script=("ok",))
    first = run(core, "The quick brown fox")
    assert ending(first)[0].cached_tokens == 0
    engine.evaluated_chunks.clear()
    second = run(core, "The quick brown fox jumps")
    stats, _ = ending(second)
    assert stats.prompt_tokens == 1 + len("The quick brown fox jumps")
    assert stats.cached_tokens == 1 + len("The quick brown fox")
    assert engine.evaluated_chunks[0] == stats.prompt_tokens - stats.cached_tokens


def test_same_prompt_again_reevaluates_two_tokens() -> None:
    core, _ = make_core(script=("ok",))
    run(core, "repeat me")
    stats, _ = ending(run(core, "repeat me"))
    assert stats.cached_tokens == stats.prompt_tokens - 2


def test_engine_refusing_partial_removal_reports_nothing_cached() -> None:
    core, _ = make_core(script=("ok",), partial_removal=False)
    run(core, "The quick brown fox")
    stats, finished = ending(run(core, "The quick brown fox jumps"))
    assert stats.cached_tokens == 0
    assert finished.stop_reason is StopReason.STOP


def test_max_tokens_stops_with_length() -> None:
    core, _ = make_core(script=("abcdefghij",))
    out = run(core, "go", max_tokens=4)
    stats, finished = ending(out)
    assert text_of(out) == "abcd"
    assert finished.stop_reason is StopReason.LENGTH and stats.completion_tokens == 4


def test_zero_max_tokens_only_prefills() -> None:
    core, engine = make_core()
    stats, finished = ending(run(core, "warm the cache", max_tokens=0))
    assert finished.stop_reason is StopReason.LENGTH and stats.completion_tokens == 0
    assert engine.sequences()[0].kv_tokens() == stats.prompt_tokens


def test_full_context_stops_with_length() -> None:
    core, _ = make_core(script=("x" * 50,), n_ctx=16)
    out = run(core, "0123456789")  # 11 tokens with BOS
    stats, finished = ending(out)
    assert finished.stop_reason is StopReason.LENGTH
    assert stats.kv_tokens == 16
    assert stats.completion_tokens == 16 - 11 + 1  # the last one is streamed, not evaluated


def test_ignore_eos_keeps_generating() -> None:
    core, _ = make_core(script=("ab",))
    stats, finished = ending(run(core, "go", ignore_eos=True, max_tokens=7))
    assert finished.stop_reason is StopReason.LENGTH and stats.completion_tokens == 7


def test_stop_string_ends_generation_and_is_not_emitted() -> None:
    core, _ = make_core(script=("Answer: 42\nUser: more?",))
    out = run(core, "q", stop=("\nUser:",))
    _, finished = ending(out)
    assert finished.stop_reason is StopReason.STOP
    assert text_of(out) == "Answer: 42"


def test_partial_stop_string_is_released_when_it_does_not_match() -> None:
    core, _ = make_core(script=("a\nUs b",))
    out = run(core, "q", stop=("\nUser:",))
    assert text_of(out) == "a\nUs b"
    assert ending(out)[1].stop_reason is StopReason.STOP


def test_split_utf8_never_yields_replacement_characters() -> None:
    reply = "héllo 🌊 wörld"
    core, _ = make_core(script=(reply,))
    out = run(core, "q")
    deltas = [m.text for m in out if isinstance(m, TokenDelta)]
    assert "".join(deltas) == reply
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # the wave took four tokens, three of them showed nothing


def test_text_stream_drops_an_unfinished_character_at_the_end() -> None:
    stream = TextStream()
    assert stream.push(b"ok") == ("ok", False)
    assert stream.push("🌊".encode()[:2]) == ("", False)
    assert stream.flush() == ""


def test_cancel_between_tokens() -> None:
    core, _ = make_core(script=("abcdefghijklmnop",))
    out: list[FromWorker] = []

    def cancelled() -> bool:
        return sum(isinstance(m, TokenDelta) for m in out) >= 3

    core.generate(Generate(request_id="r1", session_id="s", prompt="q", sampling=SamplingParams()), out.append,
                  cancelled)
    stats, finished = ending(out)
    assert finished.stop_reason is StopReason.CANCELLED
    assert text_of(out) == "abc" and stats.completion_tokens == 3


def test_cancel_during_prefill_stops_between_chunks() -> None:
    core, engine = make_core()
    prompt = "x" * 700  # 701 tokens: three chunks of at most 256
    chunks_seen: list[int] = []

    def cancelled() -> bool:
        chunks_seen.append(len(engine.evaluated_chunks))
        return len(engine.evaluated_chunks) >= 1

    out = run(core, prompt, cancelled=cancelled)
    stats, finished = ending(out)
    assert finished.stop_reason is StopReason.CANCELLED
    assert engine.evaluated_chunks == [256]
    assert stats.completion_tokens == 0 and finished.kv_tokens == 256
    # What was evaluated stays usable: the retry reuses it.
    assert ending(run(core, prompt))[0].cached_tokens == 256


def test_a_cancel_noticed_inside_a_chunk_keeps_only_the_chunks_before_it() -> None:
    """The engine is handed the cancel check for every prefill chunk (llama.cpp calls it between
    graph nodes); a chunk interrupted that way leaves nothing, the ones before it stay."""
    core, engine = make_core()
    prompt = "x" * 700

    def inside_the_second_chunk() -> bool:
        return len(engine.checked_cancel_inside) >= 2  # the fake notes each evaluation before it checks

    out = run(core, prompt, cancelled=inside_the_second_chunk)
    stats, finished = ending(out)
    assert finished.stop_reason is StopReason.CANCELLED and engine.checked_cancel_inside == [True, True]
    assert engine.evaluated_chunks == [256] and finished.kv_tokens == 256 and engine.sequences()[0].kv_tokens() == 256
    assert ending(run(core, prompt))[0].cached_tokens == 256
    # Single-token decode steps are never handed the check (it would cost each step dearly).
    assert engine.checked_cancel_inside[-1] is False


def test_prompt_longer_than_context_is_refused() -> None:
    core, engine = make_core(n_ctx=32)
    failed = failure(run(core, "y" * 40))
    assert failed.code is ErrorCode.CONTEXT_OVERFLOW
    assert engine.evaluated_chunks == []


def test_negative_max_tokens_is_an_invalid_request() -> None:
    core, _ = make_core()
    assert failure(run(core, "q", max_tokens=-1)).code is ErrorCode.INVALID_REQUEST


def test_engine_failure_is_reported_and_the_next_request_is_served() -> None:
    core, engine = make_core(script=("fine",))
    failed = failure(run(core, "please <<fail>> now"))
    assert failed.code is ErrorCode.INTERNAL and "scripted failure" in failed.message
    assert engine.sequences()[0].kv_tokens() == 0  # the half-written state was dropped
    out = run(core, "and now something else", request_id="r2")
    assert text_of(out) == "fine"
    assert ending(out)[1].stop_reason is StopReason.STOP


def test_prefill_chunks_never_end_with_a_lone_token() -> None:
    assert [len(c) for c in prefill_chunks(list(range(257)), 256)] == [255, 2]
    assert [len(c) for c in prefill_chunks(list(range(512)), 256)] == [256, 256]
    assert [len(c) for c in prefill_chunks([7], 256)] == [1]
    assert prefill_chunks([], 256) == []


@pytest.mark.parametrize("prompt", ["<s>already has BOS", "no BOS yet"])
def test_fake_tokenizer_never_doubles_bos(prompt: str) -> None:
    tokens = FakeEngine().tokenize(prompt)
    assert tokens[0] == 256 and tokens[1] != 256
