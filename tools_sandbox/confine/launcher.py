"""`run_confined`: one tool call in a fresh confined child, as a ToolEnvelope.

Owns the supervisor side of a call: the ChildSpec built from the job and the
probe's report, the spawn (Popen without preexec_fn: this process is
threaded, so every layer is applied by the child to itself), and the watch
that reads output against a deadline and the cancel flag and kills the
call's whole tree. The kill is a SIGKILL to the child's process group; the
child's pid-1 process dies with its parent (parent-death signal, bwrap's
--die-with-parent), and the kernel then kills everything left in the call's
PID namespace, `setsid` grandchildren included.

Must not import the child side's modules (they are stdlib-only and run in the
child) beyond `spec`, and never applies a layer the report does not list as
active: the report is what the supervisor was told.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack

from bastion.protocol.sandbox_wire import ConfinementReport, ToolEnvelope, TruncationReason
from bastion.tools_sandbox.confine.job import ConfinedJob, OutputMode, interpreter_paths
from bastion.tools_sandbox.confine.output import ChunkSink
from bastion.tools_sandbox.confine.spec import ALWAYS_ON, ChildLimits, ChildSpec, Layer
from bastion.tools_sandbox.confine.watch import Outcome, watch

log = logging.getLogger(__name__)

CHILD_MODULE = "bastion.tools_sandbox.confine.child"
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
GUARDED_PATHS = ("/boot", "/dev", "/proc", "/sys")
TOOL_PATH = "/usr/bin:/bin"


class LaunchRefused(Exception):
    """The call cannot be confined as reported; nothing was run."""


def active_layers(report: ConfinementReport) -> frozenset[Layer]:
    known = {layer.value for layer in Layer}
    return frozenset(Layer(status.name) for status in report.layers if status.active and status.name in known)


def tool_environment(home: str) -> dict[str, str]:
    """The whole environment a tool sees: nothing of this process leaks."""
    return {"PATH": TOOL_PATH, "HOME": home, "LANG": "C.UTF-8", "TERM": "dumb"}


def _overlaps(path: str, other: str) -> bool:
    return path == other or path.startswith(other.rstrip("/") + "/") or other.startswith(path.rstrip("/") + "/")


def _check_workspace(workspace: str, *, writable: bool) -> str:
    """The workspace's real path, or LaunchRefused.

    A writable workspace must not overlap the system directories or the code
    this launcher runs as root (interpreter, virtualenv, bastion's packages):
    the idmapped workspace writes as its owner on disk, so a tool could
    otherwise rewrite what the next call's child executes as root."""
    real = os.path.realpath(workspace)
    if not os.path.isabs(workspace) or not os.path.isdir(real):
        raise LaunchRefused(f"the workspace {workspace!r} is not an absolute path to a directory")
    if real == "/" or real in SYSTEM_PATHS:
        raise LaunchRefused(f"the workspace {real!r} is a system directory")
    if writable:
        guarded = [os.path.realpath(path) for path in (*SYSTEM_PATHS, *GUARDED_PATHS) if os.path.lexists(path)]
        for path in [*guarded, *interpreter_paths()]:
            if _overlaps(real, path):
                raise LaunchRefused(f"the workspace {real!r} overlaps {path!r}, which a writable call must not "
                                    "reach (system files, or the code the sandbox runs as root)")  # fmt: skip
    return real


def _make_scratch(uid: int, layers: frozenset[Layer]) -> str:
    scratch = tempfile.mkdtemp(prefix="bastion-home-")
    if Layer.UID_DROP in layers:
        os.chown(scratch, uid, uid)
    return scratch


def build_spec(job: ConfinedJob, layers: frozenset[Layer], *, workspace: str, scratch: str,
               status_fd: int) -> ChildSpec:  # fmt: skip
    if Layer.UID_DROP in layers and job.uid <= 0:
        raise LaunchRefused(f"refusing to run a confined call as uid {job.uid}")
    if job.writable and Layer.MOUNT_NAMESPACE in layers and Layer.SECCOMP not in layers:
        raise LaunchRefused("a writable call needs the seccomp layer: without it a tool could leave a setuid "
                            "file owned by the workspace's owner (root) in the idmapped workspace")  # fmt: skip
    limits = job.limits
    return ChildSpec(
        argv=job.argv,
        env=tuple(tool_environment(scratch).items()),
        workspace=workspace,
        writable=job.writable,
        scratch=scratch,
        uid=job.uid,
        layers=layers | ALWAYS_ON,
        limits=ChildLimits(cpu_seconds=limits.cpu_seconds, memory_bytes=limits.memory_bytes,
                           file_size_bytes=limits.file_size_bytes, open_files=limits.open_files,
                           processes=limits.processes),  # fmt: skip
        system_paths=tuple(path for path in SYSTEM_PATHS if os.path.lexists(path)),
        runtime_paths=interpreter_paths(),
        read_only_paths=tuple(os.path.realpath(path) for path in job.read_only_paths),
        python=sys.executable,
        bwrap=shutil.which("bwrap", path=TOOL_PATH) or "",
        parent_pid=os.getpid(),
        launcher_net=os.readlink("/proc/self/ns/net"),
        launcher_pid=os.readlink("/proc/self/ns/pid"),
        status_fd=status_fd,
    )


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name)  # close-on-exec; pass_fds hands it to the child only
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def spawn(spec: ChildSpec, *, spec_fd: int, stdin_fd: int | None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-I", "-m", CHILD_MODULE, "outer", str(spec_fd)],
        stdin=stdin_fd if stdin_fd is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(spec.env), cwd="/",
        close_fds=True, pass_fds=(spec_fd, spec.status_fd), start_new_session=True,
    )  # fmt: skip


def run_confined(job: ConfinedJob, *, report: ConfinementReport, on_chunk: ChunkSink | None,
                 cancelled: Callable[[], bool]) -> ToolEnvelope:  # fmt: skip
    """Run `job` confined by every layer `report` lists as active.

    Blocks the calling thread until the call ends. TEXT jobs stream stdout and
    stderr through `on_chunk` while they run and return the combined output,
    capped keeping head and tail; ENVELOPE jobs return the ToolEnvelope the
    tool wrote to stdout. A timeout or `cancelled()` turning true kills the
    whole tree and returns ok=False with that truncation reason. When a layer
    cannot be applied or the canary finds the wall missing, the tool does not
    run and the envelope says so (ok=False)."""
    started = time.monotonic()
    layers = active_layers(report)
    with ExitStack() as call:
        try:
            workspace = _check_workspace(job.workspace, writable=job.writable)
            scratch = _make_scratch(job.uid, layers)
            call.callback(shutil.rmtree, scratch, ignore_errors=True)
            status_r, status_w = os.pipe()
            call.callback(os.close, status_r)
            with ExitStack() as child_ends:  # ours to close once the child holds them
                child_ends.callback(os.close, status_w)
                spec = build_spec(job, layers, workspace=workspace, scratch=scratch, status_fd=status_w)
                spec_fd = _memfd("bastion-spec", spec.encode())
                child_ends.callback(os.close, spec_fd)
                stdin_fd = _memfd("bastion-stdin", job.stdin_bytes) if job.stdin_bytes else None
                if stdin_fd is not None:
                    child_ends.callback(os.close, stdin_fd)
                process = spawn(spec, spec_fd=spec_fd, stdin_fd=stdin_fd)
        except LaunchRefused as error:
            return _refused(str(error), started)
        except OSError as error:
            log.exception("could not start a confined call")
            return ToolEnvelope(ok=False, content=f"[bastion sandbox] could not start the tool: {error}",
                                duration_ms=(time.monotonic() - started) * 1000)  # fmt: skip
        outcome = watch(process, status_r, job, on_chunk=on_chunk, cancelled=cancelled,
                        deadline=started + job.limits.timeout_s)  # fmt: skip
    return _envelope(outcome, job, started)


def _refused(reason: str, started: float) -> ToolEnvelope:
    log.error("confinement refused, the tool did not run: %s", reason)
    return ToolEnvelope(ok=False, content=f"[bastion sandbox] REFUSED, the tool did not run: {reason}",
                        duration_ms=(time.monotonic() - started) * 1000)  # fmt: skip


def _envelope(outcome: Outcome, job: ConfinedJob, started: float) -> ToolEnvelope:
    if outcome.refusal is not None:
        return _refused(outcome.refusal, started)
    duration_ms = (time.monotonic() - started) * 1000
    if outcome.killed_for is None and job.output is OutputMode.ENVELOPE:
        return outcome.tool_envelope(duration_ms)
    content = outcome.text()
    reason = outcome.killed_for or (TruncationReason.OUTPUT_CAP if outcome.output_truncated else None)
    return ToolEnvelope(
        ok=outcome.killed_for is None and outcome.exit_code == 0,
        content=content,
        truncated=reason is not None,
        truncated_reason=reason,
        exit_code=None if outcome.killed_for else outcome.exit_code,
        duration_ms=duration_ms,
    )

