"""Confinement of one tool call: a fresh, walled-in child process per call.

Supervisor side (imports `bastion.protocol` and msgspec; call these):

    job.py        ConfinedJob (what to run) and python_job() for Python tool entries
    launcher.py   run_confined(job, report=, on_chunk=, cancelled=) -> ToolEnvelope
    probing.py    probe() -> ConfinementReport, measured once at sandbox startup
    watch.py      the read loop of one running call: pipes, deadline, cancel, kill
    status.py     reading the child's status pipe; pins the call's pid 1 with a pidfd
    output.py     the head-and-tail output cap and streamed chunk decoding

Child side (stdlib only, so each launch starts fast; never imports msgspec or
`bastion.protocol`):

    child.py      `python -m bastion.tools_sandbox.confine.child`: applies the
                  layers to itself in order, then execve()s the tool
    spec.py       ChildSpec, the launcher -> child contract, and the status pipe
    syscalls.py   ctypes bindings of the syscalls the layers need
    mounts.py     private mount namespace, idmapped workspace, hidden-path exposure
    bwrap.py      the bubblewrap command line (bwrap runs as the dropped uid)
    identity.py   uid drop, capability bounding set, no-new-privs, parent-death signal
    landlock.py   the file system (and TCP) ruleset
    seccomp.py    the hand-built BPF deny-list
    canary.py     the last check before execve: is the wall really there?
    trials.py     each layer tried in a throwaway fork (for the probe)

Public API: `from bastion.tools_sandbox.confine import ConfinedJob, python_job,
run_confined, probe`. Those names load lazily: the child imports this package
on every launch and must not pay for msgspec and `bastion.protocol`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bastion.tools_sandbox.confine.job import SANDBOX_UID_BASE, ConfinedJob, OutputMode, python_job
    from bastion.tools_sandbox.confine.launcher import run_confined
    from bastion.tools_sandbox.confine.probing import probe

_EXPORTS = {
    "ConfinedJob": "bastion.tools_sandbox.confine.job",
    "OutputMode": "bastion.tools_sandbox.confine.job",
    "python_job": "bastion.tools_sandbox.confine.job",
    "SANDBOX_UID_BASE": "bastion.tools_sandbox.confine.job",
    "run_confined": "bastion.tools_sandbox.confine.launcher",
    "probe": "bastion.tools_sandbox.confine.probing",
}
__all__ = ["SANDBOX_UID_BASE", "ConfinedJob", "OutputMode", "probe", "python_job", "run_confined"]


def __getattr__(name: str) -> object:
    """The public API, imported on first use (PEP 562) so the child stays light."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
