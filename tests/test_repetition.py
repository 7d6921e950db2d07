"""Noticing a reply that keeps repeating itself (worker/repetition.py), and the
worker cutting it there with stop reason `repetition` (worker/core.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bastion.protocol import SamplingParams, StopReason, TokenDelta
from bastion.protocol.worker_wire import Generate, GenerationFinished
from bastion.worker.core import WorkerCore
from bastion.worker.fake import FakeEngine, FakeEngineConfig
from bastion.worker.repetition import RepetitionGuard, keep_whole_words


def first_loop(tokens: list[int], **limits: int) -> int | None:
    guard = RepetitionGuard(**limits)
    for index, token in enumerate(tokens):
        if guard.push(token):
            assert guard.loop_start is not None
            return index
    return None


def test_a_span_repeated_back_to_back_is_a_loop_and_its_first_occurrence_is_kept() -> None:
    span = [5, 6, 7, 8]
    tokens = [1, 2, 3] + span * 12
    guard = RepetitionGuard()
    stopped_at = next(i for i, token in enumerate(tokens) if guard.push(token))
    assert guard.loop_start == 3 + len(span)  # what came before, and the span once
    assert stopped_at + 1 == 3 + len(span) + 32  # 32 tokens matched the span four back: eight repeats
    assert guard.push(99)  # once looping, always looping


def test_one_token_over_and_over_is_a_loop_only_past_the_minimum() -> None:
    assert first_loop([7] * 32) is None
    assert first_loop([7] * 33) == 32


def test_a_long_period_needs_three_occurrences() -> None:
    span = list(range(100, 160))  # 60 tokens
    assert first_loop(span * 2 + [0]) is None
    assert first_loop(span * 3) == 3 * 60 - 1


def test_text_that_varies_is_never_a_loop() -> None:
    counting = [token for n in range(200) for token in (1000 + n, 44)]  # "1000, 1001, 1002, ..."
    assert first_loop(counting) is None


@given(st.lists(st.integers(0, 50), max_size=400))
def test_a_loop_is_reported_exactly_when_the_tail_repeats(tokens: list[int]) -> None:
    index = first_loop(tokens)
    if index is None:
        return
    seen = tokens[: index + 1]
    period = next(p for p in range(1, 65) if all(seen[j] == seen[j - p] for j in range(len(seen) - max(2 * p, 32), len(seen))))
    assert max(2 * period, 32) + period <= len(seen)


def generate(script: str, **sampling: object) -> tuple[str, GenerationFinished]:
    core = WorkerCore(FakeEngine(FakeEngineConfig(script=(script,))))
    events: list[object] = []
    core.generate(Generate(request_id="g", session_id="s", prompt="<s>hi", sampling=SamplingParams(**sampling)),
                  events.append, lambda: False)  # type: ignore[arg-type]
    text = "".join(e.text for e in events if isinstance(e, TokenDelta))
    (finished,) = [e for e in events if isinstance(e, GenerationFinished)]
    return text, finished


def test_the_worker_stops_a_looping_reply_and_says_how_much_came_before_the_loop() -> None:
    text, finished = generate("Hi! " + "That's me. " * 20, max_tokens=400)
    assert finished.stop_reason is StopReason.REPETITION
    # The loop is found at its earliest phase (" That's me." repeats from the first space on).
    assert text[: finished.keep_chars] == "Hi! That's me."
    assert len(text) < len("Hi! " + "That's me. " * 20)  # it stopped early, not at the end of the script


def test_the_loop_guard_is_off_when_asked_or_when_a_fixed_length_is_wanted() -> None:
    looping = "ab" * 100
    _, off = generate(looping, max_tokens=400, loop_guard=False)
    _, fixed = generate(looping, max_tokens=150, ignore_eos=True)
    assert off.stop_reason is StopReason.STOP and off.keep_chars is None
    assert fixed.stop_reason is StopReason.LENGTH and fixed.completion_tokens == 150


def test_a_cut_inside_a_word_moves_back_to_the_last_whole_word() -> None:
    text = "So, that's me. That's me. That's me."
    assert keep_whole_words(text, 16) == len("So, that's me.")  # "So, that's me. T|hat's"
    assert keep_whole_words(text, 14) == 14  # already between words
    assert keep_whole_words("abcabc", 3) == 3  # nothing before the word: keep what there is
