"""Where a bastion home keeps its state, and the socket endpoints derived from it.

One home directory holds everything: `BASTION_HOME` if set, otherwise the
platform's user data directory. The supervisor and every client derive the same
paths from it, so agreeing on a home is agreeing on the sockets.

Unix socket paths are limited to about 107 bytes. When the home is too deep for
that, the sockets move to a short per-home directory under the system's runtime
or temp directory, named by a hash of the home's path (still mode 0700).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import platformdirs

HOME_ENV = "BASTION_HOME"
_MAX_SOCKET_PATH = 100


def default_home() -> Path:
    configured = os.environ.get(HOME_ENV)
    if configured:
        return Path(configured).expanduser().absolute()
    return Path(platformdirs.user_data_dir("bastion", appauthor=False))


@dataclass(frozen=True)
class HomeLayout:
    root: Path

    @classmethod
    def from_env(cls) -> HomeLayout:
        return cls(default_home())

    @property
    def runtime_dir(self) -> Path:
        preferred = self.root / "run"
        if len(str(preferred / "workers.sock")) <= _MAX_SOCKET_PATH:
            return preferred
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:12]
        base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
        return Path(base) / f"bastion-{os.getuid()}-{digest}"

    @property
    def control_socket(self) -> Path:
        return self.runtime_dir / "control.sock"

    @property
    def workers_socket(self) -> Path:
        return self.runtime_dir / "workers.sock"

    @property
    def tools_socket(self) -> Path:
        return self.runtime_dir / "tools.sock"

    @property
    def tools_endpoint(self) -> str:
        return f"ipc://{self.tools_socket}"

    @property
    def audit_log(self) -> Path:
        """Append-only, hash-chained record of every tool decision and execution."""
        return self.root / "audit.jsonl"

    @property
    def policy_file(self) -> Path:
        """The user's tool policy (absent: the bundled default)."""
        return self.root / "policy.toml"

    @property
    def control_endpoint(self) -> str:
        return f"ipc://{self.control_socket}"

    @property
    def workers_endpoint(self) -> str:
        return f"ipc://{self.workers_socket}"

    @property
    def lock_file(self) -> Path:
        """Held (flock, exclusive) by the running supervisor for its lifetime."""
        return self.runtime_dir / "supervisor.lock"

    @property
    def pid_file(self) -> Path:
        return self.runtime_dir / "supervisor.pid"

    @property
    def gateway_pid_file(self) -> Path:
        """Written by an HTTP gateway started beside the supervisor (`bastion up --http`)."""
        return self.runtime_dir / "gateway.pid"

    @property
    def gateway_log(self) -> Path:
        return self.logs_dir / "gateway.log"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def supervisor_log(self) -> Path:
        return self.logs_dir / "supervisor.log"

    @property
    def models_dir(self) -> Path:
        """Models assembled or converted by bastion (e.g. from chunked packages)."""
        return self.root / "models"

    @property
    def kv_dir(self) -> Path:
        """Per-session KV snapshots spilled by workers, one folder per model file."""
        return self.root / "kv"

    @property
    def config_file(self) -> Path:
        return self.root / "config.toml"

    def ensure(self) -> None:
        """Create the home and a private runtime directory (mode 0700)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(exist_ok=True)
        self.runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkdir's mode is masked by umask and ignored for existing directories.
        os.chmod(self.runtime_dir, 0o700)


def supervisor_running(layout: HomeLayout) -> bool:
    """True while some process holds the supervisor's lock for this home."""
    try:
        handle = open(layout.lock_file, "a+")  # noqa: SIM115
    except FileNotFoundError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def same_supervisor_running(layout: HomeLayout, pid: int) -> bool:
    """True while the supervisor a client said hello to (by pid) still runs this home;
    a restarted one holds the lock too, but knows nothing of that client's requests."""
    if not supervisor_running(layout):
        return False
    if not pid:
        return True
    try:
        return int(layout.pid_file.read_text().strip() or 0) == pid
    except (OSError, ValueError):
        return True  # between the lock and the pid file: give it the benefit of the doubt
