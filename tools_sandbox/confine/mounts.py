"""The child's private mount namespace: what the unprivileged uid can reach.

Owns three things, all done as root before the uid drop and visible only to
this call's processes:
- the workspace comes back as an idmapped mount: files of the workspace's
  owner (root, or the user whose project it is) look owned by the sandbox
  uid, and files the tool creates land on disk owned by that owner; other
  owners' files show as nobody. It is mounted read-only when the call may not
  write;
- paths the tool needs (the interpreter, the workspace) under an ancestor the
  uid cannot search (`/root` is 0700 here) are re-exposed: the blocking
  ancestor is covered by a small tmpfs holding only those paths, which also
  hides everything else beneath it;
- a fresh /proc for a new PID namespace.
Must not touch the host's mount table: everything happens after
unshare(CLONE_NEWNS) with propagation made private. Stdlib only.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

from bastion.tools_sandbox.confine import syscalls


def enter_private_namespace() -> None:
    syscalls.unshare(syscalls.CLONE_NEWNS)
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)


def mount_fresh_proc() -> None:
    flags = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
    syscalls.mount("proc", "/proc", "proc", flags)


def user_namespace_fd(owner_uid: int, owner_gid: int, uid: int) -> int:
    """An fd of a throwaway user namespace mapping the workspace's owner to `uid` (the idmap)."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the fork
        os.close(ready_r)
        os.close(done_w)
        try:
            syscalls.unshare(syscalls.CLONE_NEWUSER)
            os.write(ready_w, b"1")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise OSError("could not create a user namespace for the workspace idmap")
        for name, owner in (("uid_map", owner_uid), ("gid_map", owner_gid)):
            with open(f"/proc/{pid}/{name}", "w") as mapping:
                mapping.write(f"{owner} {uid} 1\n")
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(done_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


def idmapped_tree(path: str, uid: int, *, writable: bool) -> int:
    owner = os.stat(path)
    tree = syscalls.clone_tree(path)
    userns = user_namespace_fd(owner.st_uid, owner.st_gid, uid)
    try:
        attrs = syscalls.MOUNT_ATTR_IDMAP | syscalls.MOUNT_ATTR_NOSUID | syscalls.MOUNT_ATTR_NODEV
        syscalls.set_mount_attr(tree, attrs | (0 if writable else syscalls.MOUNT_ATTR_RDONLY), userns)
    finally:
        os.close(userns)
    return tree


def blocking_ancestor(path: str) -> str | None:
    """The highest strict ancestor of `path` that others may not search, if any.

    The dropped uid has no groups, so only the "other" bits count."""
    current = "/"
    for part in [p for p in path.split("/") if p][:-1]:
        current = os.path.join(current, part)
        if not os.stat(current).st_mode & stat.S_IXOTH:
            return current
    return None


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def expose(workspace: str, uid: int, *, writable: bool, needed: Iterable[str]) -> None:
    """Mount the idmapped workspace over itself and re-expose hidden needed paths.

    Every tree is cloned before any tmpfs covers its blocking ancestor."""
    trees: dict[str, int] = {workspace: idmapped_tree(workspace, uid, writable=writable)}
    blockers: set[str] = set()
    workspace_blocker = blocking_ancestor(workspace)
    if workspace_blocker:
        blockers.add(workspace_blocker)
    for path in needed:
        blocker = blocking_ancestor(path)
        if blocker and path not in trees and not _is_under(path, workspace):
            trees[path] = syscalls.clone_tree(path)
            blockers.add(blocker)
    for blocker in sorted(blockers, key=len):
        if any(_is_under(blocker, other) and blocker != other for other in blockers):
            continue  # already covered by a higher skeleton
        flags = syscalls.MS_NOSUID | syscalls.MS_NODEV
        syscalls.mount("tmpfs", blocker, "tmpfs", flags, "mode=0755,size=1m")
    for path, tree in sorted(trees.items(), key=lambda item: len(item[0])):
        if any(_is_under(path, blocker) for blocker in blockers):
            _make_dirs(path)
        syscalls.attach_tree(tree, path)
        os.close(tree)


def _make_dirs(path: str) -> None:
    current = "/"
    for part in [p for p in path.split("/") if p]:
        current = os.path.join(current, part)
        if not os.path.isdir(current):
            os.mkdir(current)
            os.chmod(current, 0o755)  # the umask must not make the skeleton unsearchable
