"""A supervisor killed with SIGKILL in the middle of a turn, then started again
by the next `bastion` command: every committed session, message, approval and
audit record is intact, the interrupted turn is marked as such, and no worker
of the dead supervisor is left running."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
from pathlib import Path

import psutil
import pytest

from tests.e2e_support import Bastion, approve_when_asked, run_json, start_streaming, wait_for_supervisor
from tests.scripted import script
from tests.scripted import tool_call as call
from tests.waiting import wait_gone

pytestmark = pytest.mark.real_model


def table(home: Path, query: str) -> list[tuple]:
    with sqlite3.connect(home / "bastion.db") as db:
        return db.execute(query).fetchall()


def test_kill_9_mid_turn_loses_nothing_committed_and_leaves_no_worker(bastion: Bastion, tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    # Committed before the crash: a session whose tool call was approved (a
    # stored grant with uses left, audit records) and a plain two-turn session.
    model = script(tmp_path, call("write_file", path="out.txt", content="kept\n"), "Done.")
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(zip(("code", "lines"), run_json(
        bastion, "run", "write it", "--model", model, "--tools", "files", "--allow-write", "--session", "tools",
        cwd=workspace))))  # fmt: skip
    runner.start()
    approve_when_asked(bastion, uses=5)
    runner.join(120)
    assert result["code"] == 0
    for prompt in ("My name is Ada.", "What is my name?"):
        assert bastion("run", "--session", "story", "--max-tokens", "16", prompt).returncode == 0
    _, (before,) = bastion.json("sessions", "list")
    messages_before = {s["name"]: s["messages"] for s in before["sessions"]}
    grants_before = table(bastion.home, "SELECT tool, arguments, uses_left FROM grants")
    assert grants_before and grants_before[0][2] == 4  # one of five uses spent
    audit_before = (bastion.home / "audit.jsonl").read_text().splitlines()

    # Mid-turn: the supervisor dies with SIGKILL while the worker streams.
    process, _events, first_token, reader = start_streaming(
        bastion, "Write a very long story about a lighthouse keeper.", "--session", "story", "--max-tokens", "3000"
    )
    assert first_token.wait(120)
    _, (status,) = bastion.json("status")
    supervisor = psutil.Process(status["pid"])
    workers = [p for p in supervisor.children() if "bastion.worker" in " ".join(p.cmdline())]
    assert workers
    os.kill(supervisor.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == 1
    reader.join(10)
    # No orphan: the workers see their supervisor go and exit by themselves.
    alive = wait_gone(workers)
    assert not alive, f"workers outlived their supervisor: {[p.pid for p in alive]}"

    # The next command starts a new supervisor, which finds everything committed.
    listed = bastion("sessions", "show", "story")
    assert listed.returncode == 0, listed.stderr
    _, (status_after,) = bastion.json("status")
    assert status_after["pid"] != supervisor.pid
    wait_for_supervisor(bastion, status_after["pid"])
    _, (after,) = bastion.json("sessions", "list")
    messages_after = {s["name"]: s["messages"] for s in after["sessions"]}
    assert messages_after["tools"] == messages_before["tools"]
    # The interrupted turn's user message was committed when the turn began; its reply never finished.
    assert messages_after["story"] == messages_before["story"] + 1
    statuses = [row[0] for row in table(bastion.home, "SELECT status FROM runs r JOIN sessions s ON "
                                                      "r.session_id = s.id WHERE s.name = 'story' ORDER BY r.id")]
    assert statuses[-1] == "interrupted" and set(statuses[:-1]) == {"finished"}
    assert "last run interrupted" in listed.stdout
    assert {s["name"]: s["last_run"] for s in after["sessions"]} == {"tools": "finished", "story": "interrupted"}
    assert table(bastion.home, "SELECT tool, arguments, uses_left FROM grants") == grants_before
    audit_after = (bastion.home / "audit.jsonl").read_text().splitlines()
    assert audit_after[: len(audit_before)] == audit_before
    verified = bastion("audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # And the session goes on.
    assert bastion("run", "--session", "story", "--max-tokens", "8", "Thanks.").returncode == 0
