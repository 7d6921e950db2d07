"""Driving the real `bastion` CLI and supervisor from end-to-end tests.

`Bastion` runs the installed `bastion` command as a subprocess against one
home (`BASTION_HOME` in a temp dir), so a test exercises the real supervisor,
real worker processes, real ZeroMQ sockets and the real models. Polls that
only read state (`ps`, `status`) go through a control connection held in the
test process (`Bastion.ask`) instead of a new CLI process each time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import msgspec
import psutil

from bastion.client.connection import ControlConnection
from bastion.protocol import HomeLayout
from bastion.protocol.control import ControlEvent, ListModels, ModelList, ModelStatus
from tests.waiting import wait_until

BASTION = str(Path(sys.executable).with_name("bastion"))


class Bastion:
    """Runs the `bastion` CLI against one home."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {**os.environ, "BASTION_HOME": str(home)}

    def __call__(self, *args: str, timeout: float = 240, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [BASTION, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL, cwd=cwd,
        )  # fmt: skip

    def popen(self, *args: str, cwd: Path | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [BASTION, *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            stdin=subprocess.DEVNULL, bufsize=1, cwd=cwd,
        )  # fmt: skip

    def json(self, *args: str, timeout: float = 240, cwd: Path | None = None) -> tuple[int, list[dict]]:
        done = self(*args, "--json", timeout=timeout, cwd=cwd)
        return done.returncode, [msgspec.json.decode(line) for line in done.stdout.splitlines() if line.strip()]

    # --- reading the supervisor's state from the test process ---------------

    def ask(self, request: object) -> ControlEvent:
        """One request over a control connection of the test's own (the supervisor must be running)."""
        with ControlConnection(HomeLayout(self.home)) as connection:
            connection.open()
            return connection.request(request)  # type: ignore[arg-type]

    def models(self) -> dict[str, ModelStatus]:
        """`bastion ps`, by model name."""
        listing = self.ask(ListModels(request_id=uuid.uuid4().hex[:8]))
        assert isinstance(listing, ModelList), listing
        return {model.name: model for model in listing.models}

    def wait_for_model(self, name: str, ready, timeout: float = 60.0) -> ModelStatus:
        """The model's status once `ready(status)` holds (status is None while it is not listed)."""
        return wait_until(lambda: (entry := self.models().get(name)) is not None and ready(entry) and entry,
                          timeout=timeout, interval=0.05, what=f"model {name} to be ready")

    # --- processes -------------------------------------------------------------

    def processes(self) -> list[psutil.Process]:
        """Every live process that belongs to this home (supervisor and workers)."""
        found = []
        marker = str(self.home)
        for process in psutil.process_iter(["cmdline", "environ", "status"]):
            try:
                if process.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                cmdline = " ".join(process.info["cmdline"] or [])
                environ = process.info["environ"] or {}
                if "bastion." in cmdline and (marker in cmdline or environ.get("BASTION_HOME") == marker):
                    found.append(process)
            except psutil.Error:
                continue
        return found

    def workers(self) -> list[psutil.Process]:
        return [p for p in self.processes() if "bastion.worker" in " ".join(p.info["cmdline"] or [])]

    def cleanup(self) -> None:
        self("down", timeout=60)
        for process in self.processes():
            process.send_signal(signal.SIGKILL)


def events_of(lines: list[dict], kind: str) -> list[dict]:
    return [line for line in lines if line["type"] == kind]


def _read_json_lines(process: subprocess.Popen[str], sink: list[tuple[float, dict]],
                     first_token: threading.Event) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        if line.strip():
            event = msgspec.json.decode(line)
            sink.append((time.monotonic(), event))
            if event["type"] == "token":
                first_token.set()


def start_streaming(bastion: Bastion, *args: str, cwd: Path | None = None):
    """`bastion run ... --json` in the background: (process, timed events, first-token event, reader thread)."""
    process = bastion.popen("run", *args, "--json", cwd=cwd)
    events: list[tuple[float, dict]] = []
    first_token = threading.Event()
    reader = threading.Thread(target=_read_json_lines, args=(process, events, first_token), daemon=True)
    reader.start()
    return process, events, first_token, reader


def wait_for_supervisor(bastion: Bastion, pid: int, timeout: float = 60) -> None:
    """Until the supervisor started by the test (not one the CLI would start) serves this home."""
    pid_file = bastion.home / "run" / "supervisor.pid"
    wait_until(lambda: pid_file.exists() and pid_file.read_text().strip() == str(pid), timeout=timeout,
               what="the test's supervisor to start")


def run_json(bastion: Bastion, *args: str, cwd: Path) -> tuple[int, list[dict]]:
    return bastion.json(*args, cwd=cwd)


def approve_when_asked(bastion: Bastion, *, deny: bool = False, uses: int = 1, session: str | None = None) -> None:
    """Answer the first approval request from another client, as a user in another terminal would."""

    def first_pending() -> str:
        _, listing = bastion.json("approvals")
        return listing[0]["approvals"][0]["approval_id"] if listing and listing[0]["approvals"] else ""

    approval_id = wait_until(first_pending, timeout=120, interval=0.1, what="an approval request")
    if session is not None:
        _, (sessions,) = bastion.json("sessions", "list")
        states = {s["name"]: s["state"] for s in sessions["sessions"]}
        assert states[session] == "waiting_for_approval"
    verb = ["deny", approval_id] if deny else ["approve", approval_id, "--uses", str(uses)]
    assert bastion(*verb).returncode == 0


def write_config(bastion: Bastion, text: str) -> None:
    bastion.home.mkdir(parents=True, exist_ok=True)
    (bastion.home / "config.toml").write_text(text)

