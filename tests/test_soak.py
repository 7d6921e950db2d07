"""A few minutes of real traffic: two models, concurrent sessions, cancels, a crash.

One supervisor serves SmolLM2 under two registry names (two worker
processes; one decodes its two sessions together, `parallel = 2`). Four named sessions take turns concurrently for several rounds;
some runs are cancelled mid-stream, and in the middle one worker is killed
with SIGKILL while it streams. Afterwards every session must read back
consistently, the supervisor's memory must be flat between the first and
second half, and `bastion down` must leave no process behind.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.e2e_support import Bastion, start_streaming
from tests.real_models import smollm2_gguf

pytestmark = [pytest.mark.real_model, pytest.mark.soak]

ROUNDS = 12
KILL_ROUND = 6  # the first round of the second half
# Sessions and their models; s3 also has the file tools, so a sandbox process takes part.
SESSIONS = {"s0": "soak-a", "s1": "soak-a", "s2": "soak-b", "s3": "soak-b"}
TOPICS = ["rivers", "owls", "bread", "trains", "maps", "tea", "bees", "boats", "clocks", "stars", "moss", "kites"]
# Supervisor RSS may grow this much from the end of the first half to the end of the second.
RSS_GROWTH_LIMIT = 12 * 2**20


class Turn:
    """One `bastion run --json` of a session, as a process the test steers."""

    def __init__(self, bastion: Bastion, session: str, prompt: str, *extra: str) -> None:
        self.session = session
        self.process, self.events, self.first_token, self.reader = start_streaming(
            bastion, prompt, "--session", session, "--model", SESSIONS[session], "--temperature", "0.7", *extra)

    def worker_pid(self) -> int:
        return next(e["worker_pid"] for _, e in self.events if e["type"] == "run_start")

    def finish(self) -> tuple[int, list[dict]]:
        code = self.process.wait(timeout=240)
        self.reader.join(10)
        return code, [event for _, event in self.events]


def register_models(bastion: Bastion) -> None:
    bastion.home.mkdir(parents=True, exist_ok=True)
    gguf = smollm2_gguf()
    # One thread each: two workers share the two cores instead of fighting over them. soak-a decodes
    # its two sessions together (two sequences in one context), soak-b one at a time.
    (bastion.home / "config.toml").write_text("".join(
        f'[models.{name}]\npath = "{gguf}"\nn_ctx = 2048\nthreads = 1\nparallel = {parallel}\n'
        for name, parallel in (("soak-a", 2), ("soak-b", 1))))


def play_round(bastion: Bastion, number: int, workspace: Path) -> dict[str, tuple[int, list[dict], str]]:
    """Every session takes one turn at once; returns (exit code, events, what the test did) per session."""
    # Every other round one run is cancelled, each session in turn.
    cancel = list(SESSIONS)[(number // 2) % len(SESSIONS)] if number % 2 == 1 else None
    doomed = "s0" if number == KILL_ROUND else None
    turns = {}
    for session in SESSIONS:
        long = session in (cancel, doomed)
        extra = ["--max-tokens", "400", "--ignore-eos"] if long else ["--max-tokens", "12"]
        if session == "s3":
            extra += ["--tools", "files", "--workspace", str(workspace), "--max-iterations", "2"]
        turns[session] = Turn(bastion, session, f"Round {number}: one short fact about {TOPICS[number]}, please.",
                              *extra)
    if doomed is not None:
        assert turns[doomed].first_token.wait(180), "no token before the kill"
        os.kill(turns[doomed].worker_pid(), signal.SIGKILL)
    if cancel is not None:
        assert turns[cancel].first_token.wait(180), "no token before the cancel"
        turns[cancel].process.send_signal(signal.SIGINT)
    actions = {session: "killed" if session == doomed else "cancelled" if session == cancel
               else "shared" if doomed is not None and SESSIONS[session] == SESSIONS[doomed] else "ran"
               for session in SESSIONS}
    return {session: (*turn.finish(), actions[session]) for session, turn in turns.items()}


def check_outcome(session: str, code: int, events: list[dict], action: str) -> str:
    """What the session's turn should read back as: `reply`, `unanswered`
    (the last tool results were never answered), `interrupted`, or `nothing`
    (cut before any text)."""
    end = events[-1]
    assert end["type"] == "run_end", (session, events[-3:])
    errors = [e for e in events if e["type"] == "error"]
    streamed = "".join(e["text"] for e in events if e["type"] == "token")
    # A session whose model's worker was killed under another: on a `parallel` worker it may have been
    # decoding in the same context and ends as the killed one does; queued, it ran once the worker was back.
    shared_crash = action == "shared" and any(e["code"] == "worker_died" for e in errors)
    if action == "killed" or shared_crash:
        assert code == 1 and errors[0]["code"] == "worker_died" and "SIGKILL" in errors[0]["message"], errors
        return "interrupted" if streamed else "nothing"
    if action == "cancelled":
        assert code == 130 and end["stop_reason"] == "cancelled", (session, errors)
        return "interrupted" if streamed else "nothing"
    assert not errors and end["stop_reason"] in ("stop", "length", "max_iterations", "repair_limit"), (session, events)
    # s3 may stop at its iteration ceiling, or give up on tool calls the small model garbles.
    return "reply" if end["stop_reason"] in ("stop", "length") else "unanswered"


def check_session(bastion: Bastion, name: str, expected: list[str]) -> None:
    """Messages alternate sensibly and match what each turn did."""
    code, (detail,) = bastion.json("sessions", "show", name)
    assert code == 0 and detail["session"]["state"] == "idle"
    assert bastion("sessions", "show", name).returncode == 0
    messages = detail["messages"]
    assert messages[0]["role"] == "user"
    turns: list[list[dict]] = []
    for message in messages:
        if message["role"] == "user":
            turns.append([])
        else:
            turns[-1].append(message)
    assert len(turns) == len(expected)
    for replies, outcome in zip(turns, expected):
        if outcome == "nothing":
            assert replies == []
            continue
        # Tool results may sit between assistant messages; a finished turn's last word is the model's.
        assert replies and replies[0]["role"] == "assistant", replies
        assert all(m["role"] in ("assistant", "tool") for m in replies)
        assert replies[-1]["role"] == "assistant" or outcome == "unanswered", replies
        assert replies[-1]["interrupted"] is (outcome == "interrupted")
        assert not any(m["interrupted"] for m in replies[:-1])


def test_sessions_stay_consistent_and_memory_flat_through_crashes_and_cancels(bastion: Bastion,
                                                                             tmp_path: Path) -> None:
    register_models(bastion)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "notes.txt").write_text("Owls can turn their heads about 270 degrees.\n")
    assert bastion("up").returncode == 0
    supervisor = psutil.Process(bastion.json("status")[1][0]["pid"])
    expected: dict[str, list[str]] = {session: [] for session in SESSIONS}
    rss = []
    started = time.monotonic()
    for number in range(ROUNDS):
        for session, (code, events, action) in play_round(bastion, number, workspace).items():
            expected[session].append(check_outcome(session, code, events, action))
        if number in (ROUNDS // 2 - 1, ROUNDS - 1):
            rss.append(supervisor.memory_info().rss)
    elapsed = time.monotonic() - started
    models = {m["name"]: m for m in bastion.json("ps")[1][0]["models"]}
    assert models["soak-a"]["restarts"] == 1 and models["soak-b"]["restarts"] == 0
    assert {m["state"] for m in models.values()} == {"idle"}
    for session, outcomes in expected.items():
        check_session(bastion, session, outcomes)
    growth = rss[1] - rss[0]
    print(f"\n{ROUNDS} rounds in {elapsed:.0f} s; supervisor RSS {rss[0] / 2**20:.1f} -> {rss[1] / 2**20:.1f} MiB")
    assert growth < RSS_GROWTH_LIMIT, f"supervisor RSS grew {growth / 2**20:.1f} MiB in the second half"
    running = [" ".join(p.info["cmdline"] or []) for p in bastion.processes()]
    assert sum("bastion.worker" in c for c in running) == 2 and any("bastion.tools_sandbox" in c for c in running)
    assert bastion("down").returncode == 0
    assert bastion.processes() == [], "a worker or sandbox outlived `bastion down`"
