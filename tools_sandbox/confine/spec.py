"""The contract between the launcher and the confined child: what to run, which
layers to apply, and how the child says whether the wall went up.

Owns `Layer` (the names the probe reports), `ChildSpec` (the launcher writes it
as JSON into a memfd the child reads, so it never shares stdin with the tool)
and the status-pipe vocabulary. Stdlib only: the child imports this module on
every launch, and msgspec would add ~25 ms to each one (dataclasses ~12 ms), so
the spec is a NamedTuple with an explicit JSON codec instead of a Struct.

Status pipe (child -> launcher, close-on-exec so the tool never holds it):

    init <pid>\\n                the host pid of the call's pid 1 (without bwrap)
    { "child-pid": <pid>, ...}  the same, written by bwrap --json-status-fd
    exec\\n                      the next syscall is execve(tool)
    refused <stage>: <why>\\n    a layer could not be applied or the canary
                                failed; the child exits EXIT_REFUSED and the
                                tool never runs
    execfail <why>\\n            execve itself failed (exit 127, like a shell)
"""

from __future__ import annotations

import enum
import json
from typing import NamedTuple

EXIT_REFUSED = 121  # distinctive: the tool did not run because the wall is not there
EXIT_EXEC_FAILED = 127

STATUS_INIT = "init"
STATUS_EXEC = "exec"
STATUS_REFUSED = "refused"
STATUS_EXEC_FAILED = "execfail"


class Layer(enum.Enum):
    """One wall; the value is the `LayerStatus.name` the probe reports."""

    FRESH_PROCESS = "fresh_process"  # launcher child per call, new session, no TTY, fds closed
    CLEAN_ENVIRONMENT = "clean_environment"  # allow-listed env, stdin from /dev/null or the job
    RLIMITS = "rlimits"
    UID_DROP = "uid_drop"
    NO_NEW_PRIVS = "no_new_privs"
    MOUNT_NAMESPACE = "mount_namespace"  # idmapped workspace, hidden ancestors exposed, fresh /proc
    NETWORK_NAMESPACE = "network_namespace"
    PID_NAMESPACE = "pid_namespace"
    LANDLOCK = "landlock"
    SECCOMP = "seccomp"
    BUBBLEWRAP = "bubblewrap"


ALWAYS_ON = frozenset({Layer.FRESH_PROCESS, Layer.CLEAN_ENVIRONMENT, Layer.RLIMITS})
BWRAP_NOT_INSTALLED = "bwrap is not installed"  # the probe's detail; STRONG needs bwrap only when installed


class Stage(enum.Enum):
    """Where a refusal happened, for the launcher's loud message."""

    SPEC = "spec"
    MOUNTS = "mounts"
    NAMESPACES = "namespaces"
    IDENTITY = "identity"
    RLIMITS = "rlimits"
    LANDLOCK = "landlock"
    SECCOMP = "seccomp"
    CANARY = "canary"


class ChildLimits(NamedTuple):
    cpu_seconds: int
    memory_bytes: int
    file_size_bytes: int
    open_files: int
    processes: int


class ChildSpec(NamedTuple):
    argv: tuple[str, ...]  # argv[0] is an absolute path; execve does no PATH search
    env: tuple[tuple[str, str], ...]  # the tool's whole environment
    workspace: str  # realpath; the tool's cwd
    writable: bool
    scratch: str  # empty per-call HOME owned by `uid`
    uid: int  # also the gid; ignored unless UID_DROP is applied
    layers: frozenset[Layer]  # what to apply; the canary checks the same set
    limits: ChildLimits
    system_paths: tuple[str, ...]  # read-only (and executable) for every tool
    runtime_paths: tuple[str, ...]  # the interpreter the child itself needs (bound, not Landlock-allowed)
    read_only_paths: tuple[str, ...]  # extra read-only paths this job asked for
    python: str  # the interpreter that re-enters the child inside bubblewrap
    bwrap: str  # path of bwrap; used only when BUBBLEWRAP is in `layers`
    parent_pid: int  # the launcher; the child dies with it
    launcher_net: str  # readlink /proc/self/ns/net of the launcher, for the canary
    launcher_pid: str
    status_fd: int

    def encode(self) -> bytes:
        data = self._asdict()
        data["limits"] = self.limits._asdict()
        data["layers"] = sorted(layer.value for layer in self.layers)
        return json.dumps(data).encode()

    @classmethod
    def decode(cls, raw: bytes) -> ChildSpec:
        data = json.loads(raw)
        return cls(
            argv=tuple(data["argv"]),
            env=tuple((name, value) for name, value in data["env"]),
            workspace=data["workspace"],
            writable=bool(data["writable"]),
            scratch=data["scratch"],
            uid=int(data["uid"]),
            layers=frozenset(Layer(name) for name in data["layers"]),
            limits=ChildLimits(**data["limits"]),
            system_paths=tuple(data["system_paths"]),
            runtime_paths=tuple(data["runtime_paths"]),
            read_only_paths=tuple(data["read_only_paths"]),
            python=data["python"],
            bwrap=data["bwrap"],
            parent_pid=int(data["parent_pid"]),
            launcher_net=data["launcher_net"],
            launcher_pid=data["launcher_pid"],
            status_fd=int(data["status_fd"]),
        )
