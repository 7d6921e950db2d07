"""The bubblewrap command line for one call.

Owns the flags and the file system view: system directories and the
interpreter read-only, the workspace read-write or read-only, the per-call
HOME, a fresh /proc and a minimal /dev, nothing else of the host. bwrap runs
as the unprivileged uid (bwrap run as root is not a sandbox) and re-enters
the child module inside, which then applies Landlock and seccomp (bwrap's own
setup needs mount and unshare, so those come after it). Stdlib only.
"""

from __future__ import annotations

import os

from bastion.tools_sandbox.confine.spec import ChildSpec

FLAGS = (
    "--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL", "--die-with-parent",
    "--new-session", "--hostname", "bastion-sandbox",
)  # fmt: skip

CHILD_MODULE = "bastion.tools_sandbox.confine.child"


def command(spec: ChildSpec, spec_fd: int, json_status_fd: int) -> list[str]:
    """`json_status_fd` must be a copy of the status pipe: bwrap keeps it from the sandbox."""
    binds: list[tuple[str, list[str]]] = []
    for path in spec.system_paths:
        if os.path.islink(path):
            binds.append((path, ["--symlink", os.readlink(path), path]))
        elif os.path.exists(path):
            binds.append((path, ["--ro-bind", path, path]))
    for path in dict.fromkeys(spec.runtime_paths + spec.read_only_paths):
        binds.append((path, ["--ro-bind-try", path, path]))
    binds.append((spec.workspace, ["--bind" if spec.writable else "--ro-bind", spec.workspace, spec.workspace]))
    binds.append((spec.scratch, ["--bind", spec.scratch, spec.scratch]))
    argv = [spec.bwrap, *FLAGS]
    # Parents before children, so a later bind lands inside an earlier one.
    for _, args in sorted(binds, key=lambda bind: bind[0].count("/")):
        argv += args
    argv += ["--proc", "/proc", "--dev", "/dev", "--chdir", spec.workspace]
    argv += ["--json-status-fd", str(json_status_fd)]  # names pid 1, which the launcher waits out
    return [*argv, "--", spec.python, "-I", "-m", CHILD_MODULE, "inner", str(spec_fd)]
