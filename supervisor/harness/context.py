"""Fitting a conversation into a model's context: which messages the next prompt holds.

Owns the pruning policy (DESIGN §4 Context) and the prompts of the optional
summary of pruned turns. It is pure logic: it renders and counts through the
callables it is given and does no I/O, loads no model and calls no worker.

The prompt holds every system and pinned message, plus the *window*: every
message from `window_start` on. The window only ever moves forward, by whole
turns, and only when the prompt no longer fits; it then moves far enough to
bring the prompt down to `evict_to` of the budget, so that the prefix the
worker has cached stays byte-identical for many turns instead of shifting by
one turn every time.

A turn starts at a user message and runs until the next one: the user's
request, the assistant's replies, its tool calls and their results. A turn
leaves the prompt whole, so a tool call never survives without its result or a
result without its call. Its system and pinned messages stay (a user who pins
an assistant message in the middle of a tool exchange asked for exactly that).
The latest turn always stays; if it cannot fit beside the pinned and system
messages, planning fails with `ContextOverflowError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import msgspec

from bastion.protocol.sessions import ChatRole
from bastion.supervisor.errors import ContextOverflowError, TemplateError
from bastion.supervisor.models.tokenizer import TokenCounter
from bastion.supervisor.templates.formatter import ChatMessage

Render = Callable[[list[ChatMessage]], str]


class ContextMessage(msgspec.Struct, frozen=True, kw_only=True):
    seq: int  # position in the session, strictly increasing
    message: ChatMessage
    pinned: bool = False


class ContextPlan(msgspec.Struct, frozen=True, kw_only=True):
    messages: list[ChatMessage]  # the prompt's messages, in session order
    window_start: int  # pass this back next time
    pruned_messages: int  # how many left the prompt in this plan
    pruned_turns: list[list[int]]  # the seqs that left, one list per turn, oldest first
    used_tokens: int  # the rendered prompt, counted as the worker will tokenize it
    max_prompt_tokens: int


class _Turn(msgspec.Struct, frozen=True, kw_only=True):
    start: int  # seq of its first message
    movable: list[ContextMessage]  # what leaves with it: neither system nor pinned


def _always_kept(item: ContextMessage) -> bool:
    return item.pinned or item.message.role is ChatRole.SYSTEM


def _turns(messages: Sequence[ContextMessage]) -> list[_Turn]:
    """Group messages into turns; messages before the first user message form a turn of their own."""
    groups: list[list[ContextMessage]] = []
    for item in messages:
        if not groups or item.message.role is ChatRole.USER:
            groups.append([])
        groups[-1].append(item)
    return [_Turn(start=group[0].seq, movable=[i for i in group if not _always_kept(i)]) for group in groups]


def plan_context(
    messages: Sequence[ContextMessage],
    *,
    window_start: int,
    render: Render,
    counter: TokenCounter,
    max_prompt_tokens: int,
    evict_to: float = 0.65,
) -> ContextPlan:
    """Choose the prompt's messages for the next model call.

    `max_prompt_tokens` is what the prompt may use (the context size minus
    room for the reply). A `window_start` inside a turn is moved back to that
    turn's start, so a turn is never cut."""
    if max_prompt_tokens <= 0:
        raise ValueError(f"max_prompt_tokens must be positive, not {max_prompt_tokens}")
    if not 0 < evict_to <= 1:
        raise ValueError(f"evict_to must be in (0, 1], not {evict_to}")
    ordered = sorted(messages, key=lambda item: item.seq)
    turns = _turns(ordered)
    was_first = _first_in_window(turns, window_start)
    latest = max(len(turns) - 1, 0)

    def prompt(first: int) -> list[ChatMessage]:
        start = turns[first].start if turns else window_start
        return [item.message for item in ordered if _always_kept(item) or item.seq >= start]

    first, used = was_first, counter.count(render(prompt(was_first)))
    if used > max_prompt_tokens:
        target = int(max_prompt_tokens * evict_to)
        first, used = _evict(turns, first, latest, used, target, prompt, render, counter)
    if used > max_prompt_tokens:
        raise _overflow(turns, ordered, used, max_prompt_tokens)
    pruned = [[item.seq for item in turn.movable] for turn in turns[was_first:first] if turn.movable]
    return ContextPlan(
        messages=prompt(first),
        window_start=_new_window_start(turns, first, window_start),
        pruned_messages=sum(len(seqs) for seqs in pruned),
        pruned_turns=pruned,
        used_tokens=used,
        max_prompt_tokens=max_prompt_tokens,
    )


def _first_in_window(turns: list[_Turn], window_start: int) -> int:
    """Index of the turn holding `window_start` (the latest turn if the window starts past it)."""
    index = 0
    for i, turn in enumerate(turns):
        if turn.start <= window_start:
            index = i
    return index


def _new_window_start(turns: list[_Turn], first: int, requested: int) -> int:
    """The first kept turn's start; or `requested` itself while it lies before
    every message, where it already means the same window."""
    if not turns or (first == 0 and requested <= turns[0].start):
        return requested
    return turns[first].start


def _evict(
    turns: list[_Turn],
    first: int,
    latest: int,
    used: int,
    target: int,
    prompt: Callable[[int], list[ChatMessage]],
    render: Render,
    counter: TokenCounter,
) -> tuple[int, int]:
    """Move the window forward by whole turns until the prompt is at most `target` tokens.

    Each turn's share is estimated by rendering it alone, so the conversation
    is not re-rendered once per candidate turn; the estimate only picks how
    far to jump, and every jump is checked with a real render of the whole
    prompt. A turn rendered alone carries the template's fixed framing (BOS,
    generation prompt), so the raw estimates err high; after each jump they
    are scaled by how much the real count actually fell, so the next jump
    lands close. Returns the new first turn and the real count of its prompt."""
    estimates: dict[int, int] = {}
    scale = 1.0
    predicted: float
    while True:
        predicted, jump_to, estimated = used, first, 0
        while jump_to < latest and predicted > target:
            if jump_to not in estimates:
                estimates[jump_to] = _estimate(turns[jump_to], render, counter)
            estimated += estimates[jump_to]
            predicted = used - estimated * scale
            jump_to += 1
        if jump_to == first:
            return first, used
        before, first = used, jump_to
        used = counter.count(render(prompt(first)))
        if used <= target:
            return first, used
        if estimated > 0 and before > used:
            scale = (before - used) / estimated


def _estimate(turn: _Turn, render: Render, counter: TokenCounter) -> int:
    messages = [item.message for item in turn.movable]
    if not messages:
        return 0
    try:
        return counter.count(render(messages))
    except TemplateError:
        # A template may reject a fragment that it accepts as part of the whole
        # conversation (one that must open with a system message, say). The
        # bare text is a fair estimate, and a real count decides anyway.
        return counter.count("\n".join(message.content for message in messages))


def _overflow(
    turns: list[_Turn], ordered: list[ContextMessage], used: int, max_prompt_tokens: int
) -> ContextOverflowError:
    kept = sum(1 for item in ordered if _always_kept(item))
    latest = len(turns[-1].movable) if turns else 0
    return ContextOverflowError(
        f"the prompt needs {used} tokens but only {max_prompt_tokens} fit (the context size minus room "
        f"for the reply), even with every older turn pruned: {kept} pinned or system message(s) and "
        f"the latest turn of {latest} message(s) remain. Shorten the prompt or the tool output, "
        f"unpin messages, or use a model setting with a larger n_ctx."
    )


_SUMMARY_INSTRUCTION = (
    "You summarize conversations between a user and an AI assistant so the assistant can continue "
    "without the full transcript. Write a short summary in plain prose: what the user wants, what "
    "was decided or done, facts learned from tools (names, paths, values, errors), and what is "
    "still open. Do not invent anything. Write only the summary."
)
_SUMMARY_HEADING = "Summary of the earlier conversation (older turns were removed to fit the context):"


def summary_request(turns: Sequence[ContextMessage]) -> list[ChatMessage]:
    """The messages of the extra model call that folds `turns` (the oldest, pruned ones) into a summary.

    The transcript goes in as plain text inside one user message: as chat
    messages, the model would answer the conversation instead of summarizing it.
    """
    lines = []
    for item in sorted(turns, key=lambda item: item.seq):
        message = item.message
        speaker = message.role.value
        if message.role is ChatRole.TOOL and message.tool_name:
            speaker = f"tool {message.tool_name}"
        lines.append(f"[{speaker}]\n{message.content.strip()}")
    transcript = "\n\n".join(lines)
    return [
        ChatMessage(role=ChatRole.SYSTEM, content=_SUMMARY_INSTRUCTION),
        ChatMessage(role=ChatRole.USER, content=f"Conversation to summarize:\n\n{transcript}"),
    ]


def summary_message(text: str) -> ChatMessage:
    """How a summary appears in the prompt: a system note, which the caller
    stores pinned and orders before the window so the prefix stays stable."""
    return ChatMessage(role=ChatRole.SYSTEM, content=f"{_SUMMARY_HEADING}\n{text.strip()}")
