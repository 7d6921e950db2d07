"""Starting and stopping the supervisor (and the HTTP gateway beside it) from the CLI.

`ensure_supervisor` is what lets the first command a user types work: if no
supervisor holds this home's lock, it starts `python -m bastion.supervisor` in
its own session (so it outlives the CLI and a Ctrl-C in the terminal does not
reach it), with output appended to `<home>/logs/supervisor.log`, says so on
stderr, and waits for the hello handshake. `start_gateway`/`stop_gateway` do
the same for `python -m bastion.gateway` (`bastion up --http`, `bastion down`).
The CLI never imports the supervisor or gateway packages; it only runs them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bastion.client.connection import ClientError, ControlConnection
from bastion.protocol import ErrorCode, HomeLayout
from bastion.protocol.home import supervisor_running

_START_TIMEOUT_S = 60.0
_ALREADY_RUNNING_EXIT = 3


def supervisor_command() -> list[str]:
    return [sys.executable, "-m", "bastion.supervisor"]


def start_background(layout: HomeLayout) -> subprocess.Popen[bytes]:
    layout.ensure()
    log = open(layout.supervisor_log, "ab")  # noqa: SIM115 - handed to the child
    with log:
        return subprocess.Popen(
            supervisor_command(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )


def _log_tail(layout: HomeLayout, lines: int = 8) -> str:
    try:
        text = layout.supervisor_log.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def ensure_supervisor(layout: HomeLayout, say: Callable[[str], None]) -> ControlConnection:
    """A connection to a running supervisor, starting one if there is none."""
    process = None
    if not supervisor_running(layout):
        process = start_background(layout)
        say(f"started the bastion supervisor in the background (pid {process.pid}, log {layout.supervisor_log})")
    connection = ControlConnection(layout)
    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
        try:
            connection.open(timeout_s=1.0)
            return connection
        except ClientError as exc:
            if exc.code is not ErrorCode.SUPERVISOR_UNAVAILABLE:
                connection.close()
                raise
        returncode = process.poll() if process else None
        if returncode is not None and returncode != _ALREADY_RUNNING_EXIT:
            connection.close()
            raise ClientError(
                ErrorCode.SUPERVISOR_UNAVAILABLE,
                f"the supervisor exited with code {returncode} while starting:\n{_log_tail(layout)}",
            )
        if time.monotonic() > deadline:
            connection.close()
            raise ClientError(
                ErrorCode.SUPERVISOR_UNAVAILABLE,
                f"the supervisor did not answer within {_START_TIMEOUT_S:.0f} s; see {layout.supervisor_log}",
            )


def connect_running(layout: HomeLayout) -> ControlConnection | None:
    """A connection to the running supervisor, or None when none runs."""
    if not supervisor_running(layout):
        return None
    connection = ControlConnection(layout)
    try:
        connection.open(timeout_s=5.0)
    except ClientError:
        connection.close()
        raise
    return connection


def wait_until_stopped(layout: HomeLayout, timeout_s: float, pid: int = 0) -> bool:
    """Wait for the supervisor to release its lock and, given its pid, to exit
    (it releases the lock before the interpreter has finished tearing down).
    A supervisor started in the background belongs to init once its starter
    exits; an exited one can linger as a zombie until init reaps it (seconds,
    on some machines), and counts as stopped."""
    deadline = time.monotonic() + timeout_s
    while supervisor_running(layout):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    while pid and _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _alive(pid: int) -> bool:
    import psutil  # here, not at the top: every `bastion` command imports this module

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- the HTTP gateway beside the supervisor --------------------------------------------------

_GATEWAY_START_TIMEOUT_S = 30.0


def gateway_command(host: str, port: int, *, pid_file: str | None = None, cors_origins: tuple[str, ...] = (),
                    agent_runs: bool = False) -> list[str]:
    command = [sys.executable, "-m", "bastion.gateway", "--host", host, "--port", str(port)]
    if pid_file:
        command += ["--pid-file", pid_file]
    for origin in cors_origins:
        command += ["--cors-origin", origin]
    if agent_runs:
        command.append("--agent-runs")
    return command


def gateway_pid(layout: HomeLayout) -> int:
    """The pid of the gateway serving this home (started by `up --http` or `serve`), 0 when none runs.
    A stale pid file whose number now belongs to another process does not count."""
    try:
        pid = int(layout.gateway_pid_file.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0
    import psutil

    try:
        process = psutil.Process(pid)
        alive = process.status() != psutil.STATUS_ZOMBIE and "bastion.gateway" in " ".join(process.cmdline())
    except psutil.Error:
        return 0
    return pid if alive else 0


def start_gateway(layout: HomeLayout, host: str, port: int, *, api_key: str | None,
                  cors_origins: tuple[str, ...] = (), agent_runs: bool = False) -> int:
    """Start the gateway in the background and wait until it answers on its address, as itself (a
    port another server holds would answer too); its pid. The API key goes through the
    environment, never the command line (which `ps` shows)."""
    layout.ensure()
    env = dict(os.environ)
    if api_key:
        env["BASTION_API_KEY"] = api_key
    log = open(layout.gateway_log, "ab")  # noqa: SIM115 - handed to the child
    with log:
        process = subprocess.Popen(
            gateway_command(host, port, pid_file=str(layout.gateway_pid_file), cors_origins=cors_origins,
                            agent_runs=agent_runs),
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True, env=env,
        )  # fmt: skip
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/health"
    deadline = time.monotonic() + _GATEWAY_START_TIMEOUT_S
    while True:
        returncode = process.poll()
        if returncode is not None:
            raise ClientError(ErrorCode.SUPERVISOR_UNAVAILABLE,
                              f"the HTTP gateway exited with code {returncode} while starting:\n"
                              f"{_tail(layout.gateway_log)}")
        if _answers_as(url, process.pid, api_key):
            return process.pid
        if time.monotonic() > deadline:
            process.terminate()
            raise ClientError(ErrorCode.SUPERVISOR_UNAVAILABLE,
                              f"the HTTP gateway did not answer on {host}:{port} within "
                              f"{_GATEWAY_START_TIMEOUT_S:.0f} s; see {layout.gateway_log}")
        time.sleep(0.1)


def _answers_as(url: str, pid: int, api_key: str | None) -> bool:
    """Whether the gateway at `url` is process `pid` (its /health says which process answers)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=1) as response:
            body = response.read()
    except urllib.error.HTTPError as error:  # 503: up, but no supervisor yet
        body = error.read()
    except (OSError, ValueError):
        return False
    try:
        return json.loads(body).get("gateway_pid") == pid
    except (ValueError, AttributeError):
        return False


def stop_gateway(layout: HomeLayout, timeout_s: float) -> bool:
    """Stop the gateway serving this home, if one runs; False if it would not stop."""
    pid = gateway_pid(layout)
    if not pid:
        layout.gateway_pid_file.unlink(missing_ok=True)
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    layout.gateway_pid_file.unlink(missing_ok=True)
    return True


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""
