"""`python -I -m bastion.tools_sandbox.confine.child MODE SPEC_FD`: the
process that walls itself in and then becomes the tool.

Owns the order of the layers. The launcher starts it (as root on these
machines) with the ChildSpec in a memfd and a status pipe:

    outer   private mount namespace: idmapped workspace, hidden paths exposed
            with bubblewrap:  drop uid, no-new-privs -> execve bwrap ... child inner
            without:          unshare pid+net+ipc+uts, fork an init (pid 1) that
                              mounts /proc, drops the uid and forks the tool stage
    inner   (inside bwrap) the tool stage
    tool stage: rlimits, Landlock, seccomp, canary, close fds, execve(tool)

Nothing here runs the tool unless every layer in the spec went up; any failure
is reported on the status pipe and the process exits EXIT_REFUSED. It must
stay stdlib-only and import nothing heavy: it starts on every call.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
from collections.abc import Callable
from typing import NoReturn, ParamSpec, TypeVar

from bastion.tools_sandbox.confine import bwrap, canary, identity, landlock, mounts, seccomp, syscalls
from bastion.tools_sandbox.confine.spec import (
    EXIT_EXEC_FAILED,
    EXIT_REFUSED,
    STATUS_EXEC,
    STATUS_EXEC_FAILED,
    STATUS_INIT,
    STATUS_REFUSED,
    ChildSpec,
    Layer,
    Stage,
)

P = ParamSpec("P")
T = TypeVar("T")


class Refused(Exception):
    """A layer did not go up; the tool must not run."""

    def __init__(self, stage: Stage, reason: str) -> None:
        super().__init__(f"{stage.value}: {reason}")
        self.stage = stage


def _status(fd: int, line: str) -> None:
    try:
        os.write(fd, (line.replace("\n", " ") + "\n").encode())
    except OSError:
        pass  # the launcher is gone; the parent-death signal finishes us


def _refuse(spec: ChildSpec, error: Refused) -> NoReturn:
    _status(spec.status_fd, f"{STATUS_REFUSED} {error}")
    os._exit(EXIT_REFUSED)


def _step(stage: Stage, action: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    try:
        return action(*args, **kwargs)
    except (OSError, ValueError) as error:
        raise Refused(stage, str(error)) from error


def _in_fork(spec: ChildSpec, stage: Callable[[], NoReturn]) -> NoReturn:
    """Never let an unexpected error unwind a forked child back into its parent's code."""
    try:
        stage()
    except BaseException as error:  # noqa: BLE001 - reported, then the fork ends here
        _refuse(spec, Refused(Stage.SPEC, f"unexpected {type(error).__name__}: {error}"))
    os._exit(EXIT_REFUSED)


def _exit_code(wait_status: int) -> int:
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code  # a signal N reads as 128+N, as in a shell


def _quiet_stdio() -> None:
    """A waiting parent must not keep the tool's pipes open."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def outer(spec: ChildSpec, spec_fd: int) -> NoReturn:
    layers = spec.layers
    try:
        _step(Stage.IDENTITY, syscalls.prctl, syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != spec.parent_pid:
            raise Refused(Stage.IDENTITY, "the launcher died before the child started")
        if Layer.MOUNT_NAMESPACE in layers:
            _step(Stage.MOUNTS, mounts.enter_private_namespace)
            _step(Stage.MOUNTS, mounts.expose, spec.workspace, spec.uid, writable=spec.writable,
                  needed=spec.runtime_paths + spec.read_only_paths)  # fmt: skip
        if Layer.BUBBLEWRAP in layers:
            _become_unprivileged(spec)
            _step(Stage.IDENTITY, syscalls.prctl, syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != spec.parent_pid:
                raise Refused(Stage.IDENTITY, "the launcher died during setup")
            json_status_fd = os.dup(spec.status_fd)
            os.set_inheritable(json_status_fd, True)
            argv = bwrap.command(spec, spec_fd, json_status_fd)
            _step(Stage.NAMESPACES, os.execve, argv[0], argv, dict(spec.env))
        flags = 0
        if Layer.PID_NAMESPACE in layers:
            flags |= syscalls.CLONE_NEWPID
        if Layer.NETWORK_NAMESPACE in layers:
            flags |= syscalls.CLONE_NEWNET
        if flags:
            _step(Stage.NAMESPACES, syscalls.unshare, flags | syscalls.CLONE_NEWIPC | syscalls.CLONE_NEWUTS)
        alive_r, alive_w = os.pipe()
        pid = os.fork()
    except Refused as error:
        _refuse(spec, error)
    if pid == 0:
        os.close(alive_w)
        _in_fork(spec, lambda: _init(spec, alive_r))
    os.close(alive_r)
    _status(spec.status_fd, f"{STATUS_INIT} {pid}")
    os.close(spec.status_fd)
    _quiet_stdio()
    _, wait_status = os.waitpid(pid, 0)
    os._exit(_exit_code(wait_status))


def _become_unprivileged(spec: ChildSpec) -> None:
    if Layer.UID_DROP in spec.layers:
        _step(Stage.IDENTITY, identity.drop_bounding_set)
        _step(Stage.IDENTITY, identity.drop_to, spec.uid)
    if Layer.NO_NEW_PRIVS in spec.layers:
        _step(Stage.IDENTITY, identity.forbid_new_privileges)


def _init(spec: ChildSpec, alive_r: int) -> NoReturn:
    """pid 1 of the call's PID namespace: when it exits, the kernel kills everything left."""
    try:
        if Layer.PID_NAMESPACE in spec.layers and Layer.MOUNT_NAMESPACE in spec.layers:
            _step(Stage.MOUNTS, mounts.mount_fresh_proc)
        _step(Stage.MOUNTS, os.chdir, spec.workspace)
        _become_unprivileged(spec)
        _step(Stage.IDENTITY, identity.die_with_parent, alive_r)
        tool = os.fork()
    except Refused as error:
        _refuse(spec, error)
    if tool == 0:
        os.close(alive_r)
        _in_fork(spec, lambda: tool_stage(spec))
    os.close(spec.status_fd)
    _quiet_stdio()
    while True:
        pid, wait_status = os.wait()
        if pid == tool:
            os._exit(_exit_code(wait_status))


def _apply_rlimits(spec: ChildSpec) -> None:
    limits = spec.limits
    wanted = [
        (resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1),  # SIGXCPU, then SIGKILL
        (resource.RLIMIT_AS, limits.memory_bytes, limits.memory_bytes),
        (resource.RLIMIT_FSIZE, limits.file_size_bytes, limits.file_size_bytes),
        (resource.RLIMIT_NOFILE, limits.open_files, limits.open_files),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    if Layer.UID_DROP in spec.layers:  # counted per real uid: only meaningful for a dedicated uid
        wanted.append((resource.RLIMIT_NPROC, limits.processes, limits.processes))
    for which, soft, hard in wanted:
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:
            hard = min(hard, current_hard)
        resource.setrlimit(which, (min(soft, hard), hard))


def _new_session() -> None:
    """The tool leads its own session: no controlling terminal to reach (TIOCSTI), its own group."""
    if os.getsid(0) != os.getpid():
        os.setsid()


def tool_stage(spec: ChildSpec) -> NoReturn:
    layers = spec.layers
    try:
        _step(Stage.IDENTITY, _new_session)
        facts = _step(Stage.CANARY, canary.observe_namespaces)
        _step(Stage.RLIMITS, _apply_rlimits, spec)
        if Layer.NO_NEW_PRIVS in layers or Layer.LANDLOCK in layers or Layer.SECCOMP in layers:
            _step(Stage.IDENTITY, identity.forbid_new_privileges)
        if Layer.LANDLOCK in layers:
            writable = [spec.workspace] if spec.writable else []
            read = [*spec.system_paths, *spec.read_only_paths] + ([] if spec.writable else [spec.workspace])
            _step(Stage.LANDLOCK, landlock.restrict, read=read, read_write=[*writable, spec.scratch])
        if Layer.SECCOMP in layers:
            _step(Stage.SECCOMP, seccomp.install)
        found = canary.failures(layers, facts, launcher_net=spec.launcher_net, launcher_pid=spec.launcher_pid)
        if found:
            raise Refused(Stage.CANARY, "; ".join(found))
    except Refused as error:
        _refuse(spec, error)
    _exec_tool(spec)


def _exec_tool(spec: ChildSpec) -> NoReturn:
    # Python ignores these at startup; the tool must get the defaults back.
    for name in ("SIGPIPE", "SIGXFSZ", "SIGXCPU"):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    os.set_inheritable(spec.status_fd, False)
    os.closerange(3, spec.status_fd)
    os.closerange(spec.status_fd + 1, 1 << 20)
    _status(spec.status_fd, STATUS_EXEC)
    try:
        os.execve(spec.argv[0], list(spec.argv), dict(spec.env))
    except OSError as error:
        _status(spec.status_fd, f"{STATUS_EXEC_FAILED} {spec.argv[0]}: {error.strerror}")
        os._exit(EXIT_EXEC_FAILED)


def _read_spec(spec_fd: int) -> ChildSpec:
    chunks = []
    offset = 0
    while chunk := os.pread(spec_fd, 1 << 16, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return ChildSpec.decode(b"".join(chunks))


def main(argv: list[str]) -> NoReturn:
    mode, spec_fd = argv[1], int(argv[2])
    spec = _read_spec(spec_fd)
    if mode == "outer":
        outer(spec, spec_fd)
    if mode == "inner":
        tool_stage(spec)
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["trials"]:
        from bastion.tools_sandbox.confine import trials

        trials.main(sys.argv[2:])
    main(sys.argv)
