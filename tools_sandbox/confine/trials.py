"""`python -I -m bastion.tools_sandbox.confine.child trials UID [BWRAP]`: try
each kernel layer in a throwaway fork and print what worked, as JSON lines.

Owns the trials and the reason/fix text for each missing layer. A trial
applies the layer to a fork of this process and observes its effect; the fork
exits, so nothing here confines the caller. Stdlib only.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import NoReturn

from bastion.tools_sandbox.confine import bwrap, canary, identity, landlock, mounts, seccomp, syscalls
from bastion.tools_sandbox.confine.spec import BWRAP_NOT_INSTALLED, Layer

USERNS_FIX = ("allow unprivileged user namespaces: sysctl -w user.max_user_namespaces=15000 "
              "(and kernel.unprivileged_userns_clone=1 or kernel.apparmor_restrict_unprivileged_userns=0 "
              "where those exist)")  # fmt: skip
ROOT_FIX = "start the tool sandbox as root, so each call can set this up before dropping to its uid"


def in_fork(check: Callable[[], str]) -> tuple[bool, str]:
    """Run `check` in a fork: (True, its detail) or (False, what went wrong)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the fork
        os.close(read_end)
        try:
            result = [True, check()]
        except BaseException as error:  # noqa: BLE001 - any failure means the layer is missing
            result = [False, f"{type(error).__name__}: {error}"]
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        raw = pipe.read()
    _, wait_status = os.waitpid(pid, 0)
    if not raw:
        return False, f"the trial died (wait status {wait_status})"
    ok, detail = json.loads(raw)
    return bool(ok), str(detail)


def _uid_drop(uid: int) -> str:
    identity.drop_bounding_set()
    identity.drop_to(uid)
    return f"each call runs as uid/gid {uid}, no groups, empty capability bounding set"


def _no_new_privs() -> str:
    identity.forbid_new_privileges()
    if not identity.no_new_privileges_set():
        raise OSError("PR_GET_NO_NEW_PRIVS reads 0")
    return "PR_SET_NO_NEW_PRIVS: setuid binaries and file capabilities grant nothing"


def _mount_namespace(uid: int, scratch: str) -> str:
    mounts.enter_private_namespace()
    mounts.expose(scratch, uid, writable=True, needed=())
    owner = os.stat(scratch).st_uid
    if owner != uid:
        raise OSError(f"the idmapped workspace shows owner {owner}, not {uid}")
    return "private mounts; the workspace is idmapped to the call's uid; unsearchable ancestors re-exposed"


def _network_namespace() -> str:
    syscalls.unshare(syscalls.CLONE_NEWNET)
    interfaces = canary.observe_namespaces().interfaces
    if list(interfaces) != ["lo"]:
        raise OSError(f"interfaces in the new namespace: {interfaces}")
    return "a new network namespace per call: loopback only, and down"


def _pid_namespace() -> str:
    syscalls.unshare(syscalls.CLONE_NEWPID)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the fork
        os._exit(0 if os.getpid() == 1 else 1)
    _, wait_status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(wait_status) != 0:
        raise OSError("the first child of the new namespace is not pid 1")
    return "a new PID namespace per call: when the call ends its init dies and takes every process with it"


def _landlock() -> str:
    abi = landlock.abi_version()
    if abi < 1:
        raise OSError("the kernel has no Landlock, or it is not in the lsm= list")
    identity.forbid_new_privileges()
    landlock.restrict(read=["/usr"], read_write=[])
    try:
        os.listdir("/")
    except PermissionError:
        return f"ABI v{abi}: file system{', TCP' if abi >= 4 else ''}{', signal scoping' if abi >= 6 else ''}"
    raise OSError("/ is still listable under the ruleset")


def _seccomp() -> str:
    identity.forbid_new_privileges()
    seccomp.install()
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return f"BPF deny-list for {syscalls.MACHINE}: {len(seccomp.DENIED)} syscalls, inet sockets, TIOCSTI"
    raise OSError("an AF_INET socket was still created")


def _bubblewrap(path: str, uid: int) -> str:
    if os.geteuid() == 0:
        identity.drop_to(uid)
    identity.forbid_new_privileges()
    argv = [path, *bwrap.FLAGS, "--ro-bind", "/usr", "/usr"]
    for link in ("/bin", "/lib", "/lib64"):
        if os.path.islink(link):
            argv += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            argv += ["--ro-bind", link, link]
    done = subprocess.run([*argv, "--proc", "/proc", "--", "/bin/true"], capture_output=True, text=True,
                          timeout=10, stdin=subprocess.DEVNULL)  # fmt: skip
    if done.returncode != 0:
        raise OSError(done.stderr.strip() or f"bwrap exited {done.returncode}")
    version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    return f"{version} as uid {os.getuid()}: own user, pid, net, ipc, uts, cgroup namespaces; no capabilities"


def trials(uid: int, bwrap_path: str) -> list[tuple[Layer, bool, str, str]]:
    """(layer, active, detail, fix) for each kernel layer."""
    root = os.geteuid() == 0
    found: list[tuple[Layer, bool, str, str]] = []

    def record(layer: Layer, check: Callable[[], str], fix: str) -> None:
        ok, detail = in_fork(check)
        found.append((layer, ok, detail, "" if ok else fix))

    if root:
        record(Layer.UID_DROP, lambda: _uid_drop(uid), "")
    else:
        found.append((Layer.UID_DROP, False, f"the sandbox runs as uid {os.geteuid()}, not root", ROOT_FIX))
    record(Layer.NO_NEW_PRIVS, _no_new_privs, "a kernel >= 3.5")
    if root:
        scratch = tempfile.mkdtemp(prefix="bastion-probe-")
        try:
            record(Layer.MOUNT_NAMESPACE, lambda: _mount_namespace(uid, scratch),
                   "a kernel >= 5.12 with idmapped mounts for this file system")  # fmt: skip
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        record(Layer.NETWORK_NAMESPACE, _network_namespace, "a kernel with CONFIG_NET_NS")
        record(Layer.PID_NAMESPACE, _pid_namespace, "a kernel with CONFIG_PID_NS")
    else:
        for layer in (Layer.MOUNT_NAMESPACE, Layer.NETWORK_NAMESPACE, Layer.PID_NAMESPACE):
            found.append((layer, False, "set up by the launcher only when it runs as root", ROOT_FIX))
    record(Layer.LANDLOCK, _landlock, "boot a kernel >= 5.13 with CONFIG_SECURITY_LANDLOCK=y and landlock in lsm=")
    record(Layer.SECCOMP, _seccomp, "a kernel with CONFIG_SECCOMP_FILTER on x86_64 or aarch64")
    if not bwrap_path or not os.access(bwrap_path, os.X_OK):
        found.append((Layer.BUBBLEWRAP, False, BWRAP_NOT_INSTALLED, "apt-get install bubblewrap"))
    else:
        record(Layer.BUBBLEWRAP, lambda: _bubblewrap(bwrap_path, uid), USERNS_FIX)
    return found


def main(argv: list[str]) -> NoReturn:
    uid = int(argv[0])
    bwrap_path = argv[1] if len(argv) > 1 else ""
    for layer, active, detail, fix in trials(uid, bwrap_path):
        print(json.dumps({"name": layer.value, "active": active, "detail": detail, "fix": fix}))
    sys.stdout.flush()
    os._exit(0)
