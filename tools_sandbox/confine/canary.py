"""The last look before execve: is every wall the launcher asked for really up?

Owns the checks, one per claimed layer, each observing the effect rather than
trusting the code that applied it: namespaces differ from the launcher's, no
interface but loopback exists, no uid or gid is 0, no-new-privs and the
seccomp filter read back from the kernel, the file system root is not
listable. A failure makes the child refuse (EXIT_REFUSED); the tool is never
run with less confinement than reported. Stdlib only.

Facts that need /proc are gathered by `observe_namespaces` before Landlock
closes /proc; the rest are read in `failures` at the very end.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from bastion.tools_sandbox.confine import identity, seccomp
from bastion.tools_sandbox.confine.spec import Layer


class NamespaceFacts(NamedTuple):
    net: str  # readlink /proc/self/ns/net
    pid: str
    interfaces: tuple[str, ...]  # from /proc/net/dev


def observe_namespaces() -> NamespaceFacts:
    with open("/proc/net/dev") as table:
        lines = table.read().splitlines()[2:]
    return NamespaceFacts(
        net=os.readlink("/proc/self/ns/net"),
        pid=os.readlink("/proc/self/ns/pid"),
        interfaces=tuple(line.split(":", 1)[0].strip() for line in lines if ":" in line),
    )


def failures(layers: frozenset[Layer], facts: NamespaceFacts, *, launcher_net: str, launcher_pid: str) -> list[str]:
    found: list[str] = []
    if Layer.NO_NEW_PRIVS in layers and not identity.no_new_privileges_set():
        found.append("no-new-privs is not set")
    if Layer.UID_DROP in layers:
        ids = (*os.getresuid(), *os.getresgid())
        if 0 in ids or 0 in os.getgroups():
            found.append(f"still privileged: uids/gids {ids}, groups {os.getgroups()}")
    if Layer.NETWORK_NAMESPACE in layers:
        if facts.net == launcher_net:
            found.append("the network namespace is the launcher's")
        others = [name for name in facts.interfaces if name != "lo"]
        if others:
            found.append(f"network interfaces besides loopback: {', '.join(others)}")
    if Layer.PID_NAMESPACE in layers and facts.pid == launcher_pid:
        found.append("the PID namespace is the launcher's")
    if Layer.SECCOMP in layers and not seccomp.active():
        found.append("no seccomp filter is loaded")
    if Layer.LANDLOCK in layers and _root_listable():
        found.append("Landlock did not close the file system: / is listable")
    return found


def _root_listable() -> bool:
    try:
        os.listdir("/")
    except PermissionError:
        return False
    return True
