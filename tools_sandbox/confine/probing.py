"""`probe()`: what confinement actually works on this machine, measured once
when the sandbox starts.

Owns the report: the always-on layers, the kernel layers as the trials found
them (each tried in a throwaway fork of a throwaway child), then proof end to
end: a real call through the launcher with exactly those layers, once for the
shell and once for the Python interpreter the file tools need. If bubblewrap
passes its trial but breaks the real call, it is reported missing with the
error rather than used. The level follows from what is active:

    STRONG   uid drop, no-new-privs, network and PID namespaces, Landlock,
             seccomp, and bubblewrap too when it is installed
    PARTIAL  the always-on layers plus at least one kernel layer
    MINIMAL  the always-on layers only
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile

import msgspec

from bastion.protocol.sandbox_wire import ConfinementLevel, ConfinementReport, LayerStatus, ToolLimits
from bastion.tools_sandbox.confine.job import DEFAULT_SANDBOX_UID, ConfinedJob, interpreter_paths
from bastion.tools_sandbox.confine.launcher import CHILD_MODULE, TOOL_PATH, run_confined
from bastion.tools_sandbox.confine.spec import BWRAP_NOT_INSTALLED, Layer

ALWAYS_ON_STATUS = (
    LayerStatus(name=Layer.FRESH_PROCESS.value, active=True,
                detail="a new child per call: new session and process group, no TTY, only fds 0-2, "
                       "stdin /dev/null or the job's; the whole tree is killed when the call ends"),
    LayerStatus(name=Layer.CLEAN_ENVIRONMENT.value, active=True,
                detail="environment is PATH, HOME (an empty per-call directory), LANG, TERM; nothing inherited"),
    LayerStatus(name=Layer.RLIMITS.value, active=True,
                detail="CPU, address space, file size, open files, core=0 (and processes with a dropped uid); "
                       "wall-clock timeout; output capped keeping head and tail"),
)  # fmt: skip

STRONG_NEEDS = frozenset({Layer.UID_DROP, Layer.NO_NEW_PRIVS, Layer.NETWORK_NAMESPACE, Layer.PID_NAMESPACE,
                          Layer.LANDLOCK, Layer.SECCOMP})  # fmt: skip
_VERIFY_LIMITS = ToolLimits(timeout_s=20.0, max_output_bytes=4096, cpu_seconds=10)


class _Trial(msgspec.Struct, frozen=True):
    name: str
    active: bool
    detail: str
    fix: str


def run_trials(uid: int) -> list[LayerStatus]:
    bwrap = shutil.which("bwrap", path=TOOL_PATH) or ""
    done = subprocess.run([sys.executable, "-I", "-m", CHILD_MODULE, "trials", str(uid), bwrap],
                          capture_output=True, timeout=60, env={"PATH": TOOL_PATH, "LANG": "C.UTF-8"},
                          stdin=subprocess.DEVNULL, cwd="/")  # fmt: skip
    decoder = msgspec.json.Decoder(_Trial)
    trials = [decoder.decode(line) for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not trials:
        detail = f"the trials child failed (exit {done.returncode}): {done.stderr.decode(errors='replace')[-500:]}"
        return [LayerStatus(name=layer.value, active=False, detail=detail) for layer in Layer
                if layer.value not in {status.name for status in ALWAYS_ON_STATUS}]  # fmt: skip
    return [LayerStatus(name=t.name, active=t.active, detail=t.detail, fix=t.fix) for t in trials]


def level_of(layers: list[LayerStatus]) -> ConfinementLevel:
    active = {status.name for status in layers if status.active}
    bwrap = next((s for s in layers if s.name == Layer.BUBBLEWRAP.value), None)
    bwrap_installed = bwrap is not None and bwrap.detail != BWRAP_NOT_INSTALLED
    if {layer.value for layer in STRONG_NEEDS} <= active and (bwrap is None or bwrap.active or not bwrap_installed):
        return ConfinementLevel.STRONG
    always = {status.name for status in ALWAYS_ON_STATUS}
    return ConfinementLevel.PARTIAL if active - always else ConfinementLevel.MINIMAL


def _report(layers: list[LayerStatus]) -> ConfinementReport:
    return ConfinementReport(level=level_of(layers), layers=layers)


def verify(report: ConfinementReport, uid: int) -> str | None:
    """None when a real call (shell, then Python) runs under `report`; else why not."""
    with tempfile.TemporaryDirectory(prefix="bastion-probe-ws-") as workspace:
        jobs = [
            ConfinedJob(argv=("/bin/sh", "-c", "exit 0"), workspace=workspace, uid=uid, limits=_VERIFY_LIMITS),
            ConfinedJob(argv=(sys.executable, "-I", "-c", "import bastion.protocol.sandbox_wire"),
                        workspace=workspace, uid=uid, limits=_VERIFY_LIMITS, read_only_paths=interpreter_paths()),
        ]  # fmt: skip
        for job in jobs:
            envelope = run_confined(job, report=report, on_chunk=None, cancelled=lambda: False)
            if not envelope.ok:
                return f"{job.argv[0]} did not run: {envelope.content[:500]}"
    return None


def probe(*, uid: int = DEFAULT_SANDBOX_UID) -> ConfinementReport:
    """Measure every layer here; takes a fraction of a second."""
    layers = [*ALWAYS_ON_STATUS, *run_trials(uid)]
    report = _report(layers)
    failure = verify(report, uid)
    if failure and any(s.name == Layer.BUBBLEWRAP.value and s.active for s in layers):
        layers = [LayerStatus(name=s.name, active=False, detail=f"passes alone but a real call failed: {failure}",
                              fix="report this as a bastion bug") if s.name == Layer.BUBBLEWRAP.value else s
                  for s in layers]  # fmt: skip
        report = _report(layers)
        failure = verify(report, uid)
    if failure:
        layers = [*layers, LayerStatus(name="end_to_end", active=False, detail=failure,
                                       fix="report this as a bastion bug")]  # fmt: skip
        return ConfinementReport(level=ConfinementLevel.MINIMAL, layers=layers)
    return report
