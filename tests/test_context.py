"""Context pruning: whole turns, pinned and system messages kept, eviction in chunks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.protocol import ErrorCode
from bastion.protocol.sessions import ChatRole
from bastion.supervisor.errors import ContextOverflowError, TemplateError
from bastion.supervisor.harness.context import (
    ContextMessage,
    ContextPlan,
    plan_context,
    summary_message,
    summary_request,
)
from bastion.supervisor.templates.formatter import ChatMessage

S, U, A, T = ChatRole.SYSTEM, ChatRole.USER, ChatRole.ASSISTANT, ChatRole.TOOL
GENERATION_PROMPT = "<|im_start|>assistant\n"


def render(messages: list[ChatMessage]) -> str:
    body = "".join(f"<|im_start|>{m.role.value}\n{m.content}<|im_end|>\n" for m in messages)
    return body + GENERATION_PROMPT


class CharCounter:
    """One token per character; remembers the length of every text it counted."""

    def __init__(self) -> None:
        self.counted: list[int] = []

    def count(self, text: str) -> int:
        self.counted.append(len(text))
        return len(text)


class Conversation:
    def __init__(self) -> None:
        self.items: list[ContextMessage] = []

    def add(self, role: ChatRole, content: str, *, pinned: bool = False, tool: str = "") -> int:
        seq = len(self.items) + 1
        message = ChatMessage(role=role, content=content, tool_name=tool)
        self.items.append(ContextMessage(seq=seq, message=message, pinned=pinned))
        return seq

    def turn(self, text: str, size: int = 60, *, tool: bool = False) -> list[int]:
        seqs = [self.add(U, f"{text}: " + "u" * size)]
        if tool:
            seqs.append(self.add(A, f'<tool_call>{{"name": "ls", "for": "{text}"}}</tool_call>'))
            seqs.append(self.add(T, f"{text}: " + "x" * size, tool="ls"))
        seqs.append(self.add(A, f"{text}: " + "a" * size))
        return seqs

    def plan(
        self, window_start: int = 0, max_tokens: int = 1000, counter: CharCounter | None = None
    ) -> ContextPlan:
        return plan_context(self.items, window_start=window_start, render=render,
                            counter=counter or CharCounter(), max_prompt_tokens=max_tokens)  # fmt: skip

    def seqs_of(self, plan: ContextPlan) -> list[int]:
        """The seqs of the messages the plan kept (contents are unique, so equality identifies them)."""
        remaining = list(plan.messages)
        kept = []
        for item in self.items:
            if remaining and remaining[0] == item.message:
                kept.append(item.seq)
                remaining.pop(0)
        assert not remaining
        return kept


def test_prompt_that_fits_keeps_the_window_as_is() -> None:
    chat = Conversation()
    chat.add(S, "You are terse.")
    for i in range(3):
        chat.turn(f"q{i}")
    plan = chat.plan(window_start=2, max_tokens=10_000)
    assert plan.window_start == 2
    assert plan.messages == [item.message for item in chat.items]
    assert plan.pruned_messages == 0 and plan.pruned_turns == []
    assert plan.used_tokens == len(render(plan.messages))


def test_overflow_evicts_whole_oldest_turns_down_to_the_target() -> None:
    chat = Conversation()
    chat.add(S, "You are terse.")
    turns = [chat.turn(f"q{i}") for i in range(12)]
    plan = chat.plan(window_start=0, max_tokens=1200)
    assert plan.used_tokens <= 0.65 * 1200
    assert plan.used_tokens == len(render(plan.messages))
    evicted = len(plan.pruned_turns)
    assert plan.pruned_turns == turns[:evicted]
    assert plan.window_start == turns[evicted][0]
    assert chat.seqs_of(plan) == [1, *(seq for turn in turns[evicted:] for seq in turn)]
    assert plan.pruned_messages == 2 * evicted
    # The chunk is no bigger than needed: keeping one more turn would miss the target.
    one_more = chat.plan(window_start=turns[evicted - 1][0], max_tokens=10_000)
    assert one_more.used_tokens > 0.65 * 1200


def test_a_tool_call_and_its_result_leave_together() -> None:
    chat = Conversation()
    turns = [chat.turn(f"q{i}", size=40, tool=True) for i in range(8)]
    plan = chat.plan(max_tokens=900)
    assert plan.pruned_turns == turns[: len(plan.pruned_turns)]
    kept = chat.seqs_of(plan)
    for turn in turns:
        assert set(turn) <= set(kept) or not set(turn) & set(kept), turn


def test_pinned_and_system_messages_survive_in_their_places() -> None:
    chat = Conversation()
    system = chat.add(S, "You are terse.")
    first = chat.turn("q0")
    pinned = chat.add(U, "remember: the answer is 42", pinned=True)
    reply = chat.add(A, "noted " + "a" * 60)
    note = chat.add(S, "a system note in the middle")
    later = [chat.turn(f"q{i}") for i in range(1, 10)]
    plan = chat.plan(max_tokens=900)
    kept = chat.seqs_of(plan)
    assert plan.pruned_turns[:2] == [first, [reply]]
    assert kept[:3] == [system, pinned, note]
    assert kept[3:] == [seq for turn in later for seq in turn][-(len(kept) - 3) :]


def test_latest_turn_always_stays_even_above_the_target() -> None:
    chat = Conversation()
    for i in range(4):
        chat.turn(f"q{i}")
    latest = chat.turn("big", size=400)
    plan = chat.plan(max_tokens=1000)
    assert chat.seqs_of(plan) == latest
    assert 0.65 * 1000 < plan.used_tokens <= 1000
    assert plan.window_start == latest[0]


def test_pinned_and_latest_turn_too_big_is_an_overflow_error() -> None:
    chat = Conversation()
    chat.add(U, "p" * 500, pinned=True)
    chat.turn("q0")
    chat.turn("big", size=400)
    with pytest.raises(ContextOverflowError) as raised:
        chat.plan(max_tokens=1000)
    assert raised.value.code is ErrorCode.CONTEXT_OVERFLOW
    message = raised.value.message
    assert "1000" in message and "1 pinned or system" in message and "n_ctx" in message
    assert "unpin" in message


def test_appends_after_an_eviction_keep_the_prefix_until_the_next_overflow() -> None:
    chat = Conversation()
    chat.add(S, "You are terse.")
    window, previous = 0, ""
    evictions = 0
    for i in range(60):
        chat.turn(f"q{i}")
        plan = chat.plan(window_start=window, max_tokens=1500)
        text = render(plan.messages)[: -len(GENERATION_PROMPT)]
        if plan.pruned_messages:
            evictions += 1
            assert plan.window_start > window
        else:
            assert plan.window_start == window
            assert text.startswith(previous)  # byte-stable prefix for the worker's KV cache
        window, previous = plan.window_start, text
    # Evicting down to 65% leaves room for several turns before the next eviction.
    assert 1 < evictions <= 60 // 4


def test_eviction_counts_without_rerendering_once_per_turn() -> None:
    chat = Conversation()
    for i in range(200):
        chat.turn(f"q{i}", size=20)
    counter = CharCounter()
    plan = chat.plan(max_tokens=2000, counter=counter)
    full_renders = [n for n in counter.counted if n > 1000]
    assert len(plan.pruned_turns) > 150
    assert len(full_renders) <= 3, full_renders
    assert sum(counter.counted) < 5 * len(render([item.message for item in chat.items]))


def test_a_template_that_rejects_a_lone_turn_still_prunes() -> None:
    def strict(messages: list[ChatMessage]) -> str:
        if not messages or messages[0].role is not S:
            raise TemplateError("conversation must open with a system message")
        return render(messages)

    chat = Conversation()
    chat.add(S, "You are terse.")
    turns = [chat.turn(f"q{i}") for i in range(12)]
    plan = plan_context(
        chat.items, window_start=0, render=strict, counter=CharCounter(), max_prompt_tokens=1200
    )
    assert 0 < len(plan.pruned_turns) < len(turns)
    assert plan.used_tokens == len(strict(plan.messages)) <= 0.65 * 1200


def test_window_start_inside_a_turn_moves_back_to_its_start() -> None:
    chat = Conversation()
    turns = [chat.turn(f"q{i}", tool=True) for i in range(3)]
    plan = chat.plan(window_start=turns[1][2], max_tokens=10_000)
    assert plan.window_start == turns[1][0]
    assert chat.seqs_of(plan) == turns[1] + turns[2]


def test_messages_before_the_first_user_message_form_a_turn() -> None:
    chat = Conversation()
    chat.add(A, "Hello! " + "a" * 300)
    turns = [chat.turn(f"q{i}") for i in range(6)]
    plan = chat.plan(max_tokens=800)
    assert plan.pruned_turns[0] == [1]
    assert plan.window_start in {turn[0] for turn in turns}


def test_summary_request_carries_an_instruction_and_the_transcript() -> None:
    chat = Conversation()
    chat.turn("list files", size=3, tool=True)
    request = summary_request(chat.items)
    assert [m.role for m in request] == [S, U]
    transcript = request[1].content
    assert transcript.index("[user]") < transcript.index("[assistant]") < transcript.index("[tool ls]")
    assert "list files" in transcript
    note = summary_message("  The user listed files.\n")
    assert note.role is S and note.content.endswith("\nThe user listed files.")


_ROLES = st.sampled_from([S, U, U, A, A, T])


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(st.tuples(_ROLES, st.integers(0, 120), st.booleans()), max_size=40),
    window=st.integers(0, 45),
    max_tokens=st.integers(50, 2500),
)
def test_any_conversation_is_pruned_by_whole_turns(
    steps: list[tuple[ChatRole, int, bool]], window: int, max_tokens: int
) -> None:
    chat = Conversation()
    for i, (role, size, pin) in enumerate(steps):
        chat.add(role, f"{i}:" + "c" * size, pinned=pin and role is U)
    try:
        plan = chat.plan(window_start=window, max_tokens=max_tokens)
    except ContextOverflowError:
        return
    assert plan.used_tokens == len(render(plan.messages)) <= max_tokens
    kept = set(chat.seqs_of(plan))
    movable = [item for item in chat.items if not (item.pinned or item.message.role is S)]
    # Every always-kept message is kept; the movable ones kept are exactly those from window_start on.
    assert {item.seq for item in chat.items if item.seq not in {m.seq for m in movable}} <= kept
    assert {item.seq for item in movable if item.seq in kept} == {
        item.seq for item in movable if item.seq >= plan.window_start
    }
    # The window starts at a turn boundary (a user message, or the very first
    # message), or stays where it was, before everything.
    starts = {item.seq for item in chat.items if item.message.role is U}
    first_seq = chat.items[0].seq if chat.items else window + 1
    assert plan.window_start in starts | {first_seq} or plan.window_start == window <= first_seq
    # The latest turn is whole.
    last_user = max((item.seq for item in chat.items if item.message.role is U), default=None)
    if last_user is not None:
        assert all(item.seq in kept for item in movable if item.seq >= last_user)
