"""Streaming prose to an API client while never streaming a call (supervisor/tools/call_hold.py)."""

from __future__ import annotations

import pytest

from bastion.supervisor.tools.call_hold import CallHold
from tests.call_samples import CASES, TOOLS, parse


def stream(reply: str, piece: int = 1) -> tuple[CallHold, str]:
    hold = CallHold(frozenset(TOOLS))
    shown = "".join(hold.feed(reply[i : i + piece]) for i in range(0, len(reply), piece))
    return hold, shown


@pytest.mark.parametrize("piece", [1, 3, 1000])
@pytest.mark.parametrize("reply", [case[2] for case in CASES], ids=[case[0] for case in CASES])
def test_no_call_text_is_ever_streamed(reply: str, piece: int) -> None:
    hold, shown = stream(reply, piece)
    assert shown == hold.streamed and reply.startswith(shown)
    for call in parse(reply).calls:
        start = reply.find(call.raw)
        assert start >= len(shown) or start < 0, f"streamed {shown!r} reaches into {call.raw!r}"


@pytest.mark.parametrize("piece", [1, 4, 1000])
def test_prose_streams_as_it_comes_and_the_rest_follows_after_parsing(piece: int) -> None:
    reply = 'I will check the weather.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    hold, shown = stream(reply, piece)
    assert shown == "I will check the weather.\n"
    outcome = parse(reply)
    assert [call.name for call in outcome.calls] == ["get_weather"]
    assert hold.remainder(outcome.prose) == ""  # the prose was all streamed


def test_a_reply_without_calls_is_held_from_a_bracket_and_released_by_the_remainder() -> None:
    reply = "The list [1, 2, 3] has three items."
    hold, shown = stream(reply)
    assert shown == "The list "
    assert shown + hold.remainder(reply) == reply


def test_a_partial_opener_at_the_end_waits_for_the_next_piece() -> None:
    hold = CallHold()
    assert hold.feed("Done. ``") == "Done. "  # could become a ``` fence
    assert hold.feed("`python\nprint(1)\n```") == ""  # it did: held
    hold = CallHold()
    assert hold.feed("Use `x`") == "Use `x"  # the last backtick might still grow into a fence...
    assert hold.feed(" here.") == "` here."  # ...and did not


def test_a_first_line_that_is_a_bare_name_is_held_for_functionary() -> None:
    hold, shown = stream('special_function\n{"arg1": 1}')
    assert shown == ""
    # A first line that is only a word, then prose, is prose.
    for piece in (1, 1000):
        hold, shown = stream("Sure\nHere you are.", piece)
        assert shown == "Sure\nHere you are."
