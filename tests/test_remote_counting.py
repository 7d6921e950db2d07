"""Counting a remote model's prompts: by its server's tokenizer through its worker, waited for from
the threads the budget plans in, with the estimate standing in wherever an answer cannot come."""

from __future__ import annotations

import asyncio

from bastion.protocol.agent_events import TokenCounting
from bastion.supervisor.models.tokenizer import (
    ESTIMATE_BYTES_PER_TOKEN,
    EstimatedTokenCounter,
    RemoteTokenCounter,
)


def test_a_remote_count_is_the_server_s_answer_asked_from_a_planning_thread() -> None:
    asked: list[str] = []

    async def server_count(text: str) -> int:
        asked.append(text)
        return len(text.split())

    async def plan() -> tuple[int, int]:
        counter = RemoteTokenCounter(server_count)
        assert counter.counting is TokenCounting.REMOTE
        return await asyncio.to_thread(counter.count, "three small words"), counter.estimated

    assert asyncio.run(plan()) == (3, 0) and asked == ["three small words"]


def test_a_count_that_fails_or_is_asked_on_the_loop_is_estimated_not_lost() -> None:
    async def broken(text: str) -> int:
        raise ConnectionError("the server went away")

    async def plan() -> tuple[int, int, int]:
        counter = RemoteTokenCounter(broken)
        failed = await asyncio.to_thread(counter.count, "x" * 30)
        on_loop = counter.count("y" * 30)  # waiting here would block the answer it waits for
        return failed, on_loop, counter.estimated

    estimate = EstimatedTokenCounter().count("x" * 30)
    assert estimate == 30 // ESTIMATE_BYTES_PER_TOKEN + 1
    assert asyncio.run(plan()) == (estimate, estimate, 2)
