"""The confinement launcher against the real kernel: what the probe finds on
this machine, and that the always-on layers (environment, rlimits, timeout,
output cap, cancel, kill of the whole tree) hold for real calls.

These machines run the sandbox as root on a kernel with every layer, so a
missing layer fails here instead of being skipped (the issue's CI rule).
"""

from __future__ import annotations

import ast
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import psutil
import pytest

from bastion.protocol.sandbox_wire import (
    ConfinementLevel,
    ConfinementReport,
    LayerStatus,
    ShellArgs,
    ToolEnvelope,
    ToolLimits,
    ToolStream,
    TruncationReason,
)
from bastion.tools_sandbox.confine import (
    ConfinedJob,
    OutputMode,
    canary,
    launcher,
    probe,
    python_job,
    run_confined,
    seccomp,
    watch,
)
from bastion.tools_sandbox.confine.job import interpreter_paths
from bastion.tools_sandbox.confine.output import CappedOutput
from bastion.tools_sandbox.confine.probing import level_of
from bastion.tools_sandbox.confine.spec import BWRAP_NOT_INSTALLED, EXIT_REFUSED, ChildSpec, Layer
from bastion.tools_sandbox.shell_tool import run_shell

pytestmark = pytest.mark.e2e

UID = 61500  # this file's own sandbox uid, so its leftovers cannot be confused with another test's
LIMITS = ToolLimits(timeout_s=10.0, max_output_bytes=64 * 1024, cpu_seconds=10, memory_bytes=512 << 20,
                    processes=64)  # fmt: skip
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report() -> ConfinementReport:
    return probe(uid=UID)


@pytest.fixture(params=["bubblewrap", "direct"])
def mode_report(request: pytest.FixtureRequest, report: ConfinementReport) -> ConfinementReport:
    """Both real launch paths: through bwrap, and the one used where bwrap is missing."""
    if request.param == "bubblewrap":
        return report
    layers = [msgspec.structs.replace(s, active=False) if s.name == "bubblewrap" else s for s in report.layers]
    return ConfinementReport(level=level_of(layers), layers=layers)


def sandbox_processes(uid: int = UID) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["uids", "status"]):
        try:
            if process.info["uids"].real == uid and process.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.Error, AttributeError):
            continue
    return found


@pytest.fixture(autouse=True)
def nothing_survives() -> None:
    yield
    assert sandbox_processes() == [], "a sandboxed process outlived its call"


def sh(command: str, report: ConfinementReport, workspace: Path, *, limits: ToolLimits = LIMITS,
       writable: bool = False, **kwargs: object) -> ToolEnvelope:  # fmt: skip
    job = ConfinedJob(argv=("/bin/sh", "-c", command), workspace=str(workspace), limits=limits, uid=UID,
                      writable=writable)  # fmt: skip
    return run_confined(job, report=report, on_chunk=kwargs.get("on_chunk"),
                        cancelled=kwargs.get("cancelled", lambda: False))  # fmt: skip


# --- the probe -----------------------------------------------------------------------------------------


def test_probe_reports_every_layer_with_a_reason(report: ConfinementReport) -> None:
    names = [status.name for status in report.layers]
    assert names == [layer.value for layer in Layer]
    for status in report.layers:
        assert status.detail, status
        assert status.active or status.fix, f"{status.name} is missing without a fix"
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(report), type=ConfinementReport) == report


def test_every_layer_is_active_on_this_machine(report: ConfinementReport) -> None:
    missing = {s.name: s.detail for s in report.layers if not s.active}
    assert missing == {}
    assert report.level is ConfinementLevel.STRONG
    assert os.geteuid() == 0, "these machines run the sandbox as root"


def test_level_follows_the_active_layers(report: ConfinementReport) -> None:
    def without(*names: str) -> list[LayerStatus]:
        return [msgspec.structs.replace(s, active=False) if s.name in names else s for s in report.layers]

    assert level_of(report.layers) is ConfinementLevel.STRONG
    assert level_of(without("landlock")) is ConfinementLevel.PARTIAL
    assert level_of(without("bubblewrap")) is ConfinementLevel.PARTIAL  # installed but broken is not strong
    absent = [LayerStatus(name="bubblewrap", active=False, detail=BWRAP_NOT_INSTALLED, fix="apt-get install")
              if s.name == "bubblewrap" else s for s in report.layers]  # fmt: skip
    assert level_of(absent) is ConfinementLevel.STRONG
    kernel = [layer.value for layer in Layer if layer not in {Layer.FRESH_PROCESS, Layer.CLEAN_ENVIRONMENT,
                                                              Layer.RLIMITS}]  # fmt: skip
    assert level_of(without(*kernel)) is ConfinementLevel.MINIMAL


def test_a_missing_bwrap_is_reported_with_its_fix() -> None:
    done = subprocess.run([sys.executable, "-I", "-m", launcher.CHILD_MODULE, "trials", str(UID),
                           "/nonexistent/bwrap"], capture_output=True, timeout=60, check=True)  # fmt: skip
    trials = {t["name"]: t for t in map(msgspec.json.decode, done.stdout.splitlines())}
    assert trials["bubblewrap"] == {"name": "bubblewrap", "active": False, "detail": "bwrap is not installed",
                                    "fix": "apt-get install bubblewrap"}  # fmt: skip
    assert trials["landlock"]["active"] and trials["uid_drop"]["active"]


# --- always-on layers ----------------------------------------------------------------------------------


def test_environment_is_the_allow_list(mode_report: ConfinementReport, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("BASTION_SECRET_TEST", "1")
    job = ConfinedJob(argv=("/usr/bin/env",), workspace=str(tmp_path), uid=UID, limits=LIMITS)
    envelope = run_confined(job, report=mode_report, on_chunk=None, cancelled=lambda: False)
    assert envelope.ok, envelope.content
    env = dict(line.split("=", 1) for line in envelope.content.splitlines())
    assert set(env) == {"PATH", "HOME", "LANG", "TERM"}
    assert env["PATH"] == "/usr/bin:/bin" and env["LANG"] == "C.UTF-8" and env["TERM"] == "dumb"
    assert env["HOME"].startswith("/tmp/bastion-home-") and not Path(env["HOME"]).exists()  # per call, removed


def test_rlimits_are_applied(mode_report: ConfinementReport, tmp_path: Path) -> None:
    limits = ToolLimits(timeout_s=10, cpu_seconds=7, memory_bytes=300 << 20, file_size_bytes=1 << 20,
                        open_files=33, processes=17)  # fmt: skip
    envelope = sh("ulimit -t; ulimit -v; ulimit -f; ulimit -n; ulimit -c; ulimit -p", mode_report, tmp_path,
                  limits=limits)  # fmt: skip
    assert envelope.ok, envelope.content
    assert envelope.content.split() == ["7", str(300 << 10), str((1 << 20) // 512), "33", "0", "17"]


def test_no_tty_new_session_and_only_three_fds(mode_report: ConfinementReport, tmp_path: Path) -> None:
    script = (
        "import os\n"
        "def is_open(fd):\n"
        "    try:\n        os.fstat(fd)\n        return True\n"
        "    except OSError:\n        return False\n"
        "print(os.isatty(0), os.isatty(1), os.getsid(0) == os.getpid(), [fd for fd in range(256) if is_open(fd)])\n"
    )
    job = ConfinedJob(argv=("/usr/bin/python3", "-c", script), workspace=str(tmp_path), uid=UID, limits=LIMITS)
    envelope = run_confined(job, report=mode_report, on_chunk=None, cancelled=lambda: False)
    assert envelope.content.strip() == "False False True [0, 1, 2]"


def test_stdin_is_the_jobs_bytes_or_empty(mode_report: ConfinementReport, tmp_path: Path) -> None:
    job = ConfinedJob(argv=("/bin/cat",), workspace=str(tmp_path), uid=UID,
                      limits=msgspec.structs.replace(LIMITS, max_output_bytes=1 << 20),
                      stdin_bytes=b"fed \xe2\x9c\x93\n" * 20000)  # fmt: skip  (more than a pipe holds)
    envelope = run_confined(job, report=mode_report, on_chunk=None, cancelled=lambda: False)
    assert envelope.ok and envelope.content == "fed ✓\n" * 20000
    empty = sh("cat; echo end", mode_report, tmp_path)
    assert empty.content == "end\n"


def test_timeout_kills_sleep_within_the_limit(mode_report: ConfinementReport, tmp_path: Path) -> None:
    started = time.monotonic()
    envelope = sh("echo before; sleep 60", mode_report, tmp_path, limits=msgspec.structs.replace(LIMITS,
                  timeout_s=1.0))  # fmt: skip
    elapsed = time.monotonic() - started
    assert elapsed < 4.0
    assert not envelope.ok and envelope.truncated and envelope.truncated_reason is TruncationReason.TIMEOUT
    assert envelope.exit_code is None
    assert envelope.content.startswith("before\n") and "timed out after 1 s" in envelope.content


def test_output_cap_keeps_head_and_tail(mode_report: ConfinementReport, tmp_path: Path) -> None:
    limits = msgspec.structs.replace(LIMITS, max_output_bytes=2000)
    envelope = sh("seq 1 100000", mode_report, tmp_path, limits=limits)
    assert envelope.ok and envelope.truncated and envelope.truncated_reason is TruncationReason.OUTPUT_CAP
    assert envelope.content.startswith("1\n2\n3\n")
    assert envelope.content.endswith("99999\n100000\n")
    assert "bytes of output cut here" in envelope.content
    assert len(envelope.content) < 2300


def test_chunks_stream_while_the_command_runs(mode_report: ConfinementReport, tmp_path: Path) -> None:
    seen: list[tuple[ToolStream, str, float]] = []
    started = time.monotonic()
    envelope = sh("echo first; sleep 0.5; echo second >&2", mode_report, tmp_path,
                  on_chunk=lambda stream, text: seen.append((stream, text, time.monotonic() - started)))
    assert envelope.ok and envelope.content == "first\nsecond\n"
    assert [(stream, text) for stream, text, _ in seen] == [(ToolStream.STDOUT, "first\n"),
                                                            (ToolStream.STDERR, "second\n")]  # fmt: skip
    assert seen[1][2] - seen[0][2] > 0.3, "the first chunk came only at the end"


def test_cancel_kills_the_whole_tree(mode_report: ConfinementReport, tmp_path: Path) -> None:
    flag = threading.Event()
    threading.Timer(0.7, flag.set).start()
    started = time.monotonic()
    envelope = sh("sleep 60 & setsid sleep 61 & (trap '' TERM HUP; sleep 62) & echo up; wait", mode_report,
                  tmp_path, cancelled=flag.is_set)  # fmt: skip
    assert time.monotonic() - started < 4.0
    assert envelope.truncated_reason is TruncationReason.CANCELLED and not envelope.ok
    assert envelope.content.startswith("up\n")
    # nothing_survives checks there is no process of the sandbox uid left


def test_concurrent_calls_do_not_mix(report: ConfinementReport, tmp_path: Path) -> None:
    results: dict[int, ToolEnvelope] = {}

    def call(n: int) -> None:
        results[n] = sh(f"echo start {n}; sleep 0.3; echo end {n}", report, tmp_path)

    threads = [threading.Thread(target=call, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {n: e.content for n, e in results.items()} == {n: f"start {n}\nend {n}\n" for n in range(4)}


def test_background_child_holding_the_pipe_does_not_hang_the_call(mode_report: ConfinementReport,
                                                                    tmp_path: Path) -> None:  # fmt: skip
    started = time.monotonic()
    envelope = sh("sleep 30 & setsid sleep 31 & echo done", mode_report, tmp_path)
    assert envelope.ok and envelope.content == "done\n" and envelope.exit_code == 0
    assert time.monotonic() - started < 3.0


def test_exit_codes_and_signals(mode_report: ConfinementReport, tmp_path: Path) -> None:
    assert sh("exit 3", mode_report, tmp_path).exit_code == 3
    killed = sh("kill -USR1 $$", mode_report, tmp_path)
    assert killed.exit_code == 128 + 10 and "killed by SIGUSR1" in killed.content and not killed.ok
    missing = run_confined(ConfinedJob(argv=("/nonexistent/tool",), workspace=str(tmp_path), uid=UID),
                           report=mode_report, on_chunk=None, cancelled=lambda: False)  # fmt: skip
    assert missing.exit_code == 127 and "No such file or directory" in missing.content


def test_workspace_is_read_only_unless_writable(mode_report: ConfinementReport, tmp_path: Path) -> None:
    (tmp_path / "kept.txt").write_text("original\n")
    tmp_path.chmod(0o700)
    refused = sh("echo changed > kept.txt; touch new.txt", mode_report, tmp_path)
    assert not refused.ok
    assert (tmp_path / "kept.txt").read_text() == "original\n" and not (tmp_path / "new.txt").exists()
    allowed = sh("cat kept.txt; echo changed > kept.txt; mkdir d; echo x > d/new.txt", mode_report, tmp_path,
                 writable=True)  # fmt: skip
    assert allowed.ok and allowed.content == "original\n", allowed.content
    assert (tmp_path / "kept.txt").read_text() == "changed\n"
    assert (tmp_path / "d" / "new.txt").stat().st_uid == 0, "files the tool makes belong to the user on disk"


def test_a_users_workspace_stays_the_users(mode_report: ConfinementReport, tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("alice's\n")
    for path in (tmp_path, tmp_path / "mine.txt"):
        os.chown(path, 1234, 1234)
    tmp_path.chmod(0o700)
    envelope = sh("cat mine.txt && echo more >> mine.txt && echo new > made.txt && id -u", mode_report, tmp_path,
                  writable=True)  # fmt: skip
    assert envelope.ok and envelope.content == f"alice's\n{UID}\n", envelope.content
    made = (tmp_path / "made.txt").stat()
    assert (made.st_uid, made.st_gid) == (1234, 1234)
    assert (tmp_path / "mine.txt").read_text() == "alice's\nmore\n"


def test_a_workspace_under_an_unsearchable_ancestor_is_reachable(mode_report: ConfinementReport,
                                                                  tmp_path: Path) -> None:  # fmt: skip
    hidden = tmp_path / "private"
    (hidden / "ws").mkdir(parents=True)
    (hidden / "sibling-secret").write_text("do not show")
    hidden.chmod(0o700)
    envelope = sh("pwd; ls ..", mode_report, hidden / "ws")
    assert envelope.content.startswith(f"{hidden / 'ws'}\n")
    assert "sibling-secret" not in envelope.content


def test_system_directory_workspace_is_refused(report: ConfinementReport) -> None:
    envelope = sh("true", report, Path("/"))
    assert not envelope.ok and "REFUSED" in envelope.content and "system directory" in envelope.content


@pytest.mark.parametrize("workspace", ["/usr/lib", "/root", str(ROOT), str(ROOT / "tools_sandbox"), "/etc/ssl"])
def test_a_writable_workspace_cannot_reach_the_code_run_as_root(report: ConfinementReport, workspace: str) -> None:
    """The idmapped workspace writes as its owner (root): it must not contain the interpreter, the
    virtualenv or bastion's own packages, which the next call's child runs as root."""
    envelope = sh("echo pwned > planted", report, Path(workspace), writable=True)
    assert not envelope.ok and "REFUSED" in envelope.content and "overlaps" in envelope.content
    assert not (Path(workspace) / "planted").exists()
    assert sh("true", report, Path(workspace), writable=False).ok  # reading is the user's call


# --- the canary ----------------------------------------------------------------------------------------


def test_canary_refuses_when_the_namespaces_are_missing(report: ConfinementReport, tmp_path: Path) -> None:
    """The tool stage run outside bwrap (as if bwrap had silently not unshared) must not exec the tool."""
    marker = tmp_path / "ran"
    layers = launcher.active_layers(report) - {Layer.UID_DROP, Layer.MOUNT_NAMESPACE, Layer.BUBBLEWRAP}
    job = ConfinedJob(argv=("/bin/sh", "-c", f"touch {marker}"), workspace=str(tmp_path), uid=UID, writable=True)
    status_r, status_w = os.pipe()
    spec = launcher.build_spec(job, layers, workspace=str(tmp_path), scratch=str(tmp_path), status_fd=status_w)
    spec_fd = os.memfd_create("spec")
    os.write(spec_fd, spec.encode())
    process = subprocess.Popen([sys.executable, "-I", "-m", launcher.CHILD_MODULE, "inner", str(spec_fd)],
                               pass_fds=(spec_fd, status_w), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    os.close(status_w)
    outcome = watch.watch(process, status_r, job, on_chunk=None, cancelled=lambda: False,
                          deadline=time.monotonic() + 10)  # fmt: skip
    os.close(status_r)
    assert process.returncode == EXIT_REFUSED
    assert outcome.refusal is not None and outcome.refusal.startswith("canary: ")
    assert "network namespace is the launcher's" in outcome.refusal
    assert "PID namespace is the launcher's" in outcome.refusal
    assert not marker.exists()


def test_canary_names_each_missing_wall() -> None:
    facts = canary.NamespaceFacts(net="net:[1]", pid="pid:[2]", interfaces=("lo", "eth0"))
    found = canary.failures(frozenset({Layer.NETWORK_NAMESPACE, Layer.PID_NAMESPACE}), facts,
                            launcher_net="net:[1]", launcher_pid="pid:[2]")  # fmt: skip
    assert found == ["the network namespace is the launcher's", "network interfaces besides loopback: eth0",
                     "the PID namespace is the launcher's"]  # fmt: skip


def test_refusal_is_loud_and_nothing_runs(report: ConfinementReport, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    envelope = sh("true", report, tmp_path / "does-not-exist")
    assert not envelope.ok and envelope.content.startswith("[bastion sandbox] REFUSED")
    assert any(record.levelname == "ERROR" and "did not run" in record.getMessage() for record in caplog.records)


# --- the child contract, the filter, the cap -----------------------------------------------------------


CHILD_SIDE = ("child", "spec", "syscalls", "mounts", "identity", "landlock", "seccomp", "canary", "trials",
              "bwrap", "__init__")  # fmt: skip


def test_the_child_side_imports_only_the_stdlib_and_itself() -> None:
    """It starts on every call: msgspec or bastion.protocol would add tens of milliseconds to each."""
    own = {f"bastion.tools_sandbox.confine.{name}" for name in CHILD_SIDE} | {"bastion.tools_sandbox.confine"}
    for name in CHILD_SIDE:
        tree = ast.parse((ROOT / "tools_sandbox" / "confine" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
                node.body = []
        for node in ast.walk(tree):
            modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                       else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])  # fmt: skip
            for module in modules:
                assert module in own or module.split(".")[0] in sys.stdlib_module_names, f"{name}.py: {module}"
    done = subprocess.run([sys.executable, "-I", "-c", "import sys, bastion.tools_sandbox.confine.child; "
                           "print(sorted(m for m in sys.modules if m.startswith(('msgspec', 'bastion.protocol'))))"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert done.stdout.strip() == "[]"


def test_child_spec_round_trips(report: ConfinementReport, tmp_path: Path) -> None:
    job = ConfinedJob(argv=("/bin/true",), workspace=str(tmp_path), uid=UID)
    spec = launcher.build_spec(job, launcher.active_layers(report), workspace=str(tmp_path),
                               scratch="/tmp/x", status_fd=9)  # fmt: skip
    assert ChildSpec.decode(spec.encode()) == spec


def test_seccomp_program_jumps_stay_inside_it() -> None:
    for arch in seccomp.ARCHES.values():
        prog = seccomp.program(arch)
        assert len(seccomp.encode(prog)) == 8 * len(prog)
        for index, (code, jt, jf, _) in enumerate(prog):
            if code & 0x07 == 0x05:  # BPF_JMP
                assert index + 1 + max(jt, jf) < len(prog)
        assert prog[-1] == (0x06, 0, 0, 0x7FFF0000)
        assert set(seccomp.DENIED) <= set(arch.numbers)


def test_capped_output_renders_small_output_whole() -> None:
    capped = CappedOutput(10)
    capped.feed(b"0123456789")
    assert not capped.truncated and capped.render() == "0123456789"
    capped.feed(b"abc")
    assert capped.truncated and capped.render().startswith("01234\n[bastion: 3 bytes") and capped.render().endswith(
        "89abc")


# --- Python tool entries and the shell tool ------------------------------------------------------------


def test_python_job_runs_the_interpreter_confined_and_returns_its_envelope(mode_report: ConfinementReport,
                                                                           tmp_path: Path) -> None:  # fmt: skip
    job = python_job("bastion.tools_sandbox.confine.child", stdin_bytes=b"", workspace=str(tmp_path), uid=UID)
    assert job.argv == (sys.executable, "-I", "-m", "bastion.tools_sandbox.confine.child")
    assert job.output is OutputMode.ENVELOPE and set(interpreter_paths()) <= set(job.read_only_paths)
    code = ("import sys, msgspec; from bastion.protocol.sandbox_wire import ToolEnvelope; "
            "data = sys.stdin.buffer.read(); "
            "sys.stdout.buffer.write(msgspec.msgpack.encode(ToolEnvelope(ok=True, content=data.decode())))")
    envelope_job = msgspec.structs.replace(job, argv=(sys.executable, "-I", "-c", code), stdin_bytes=b"payload")
    envelope = run_confined(envelope_job, report=mode_report, on_chunk=None, cancelled=lambda: False)
    assert envelope.ok and envelope.content == "payload" and envelope.duration_ms > 0
    broken = msgspec.structs.replace(envelope_job, argv=(sys.executable, "-I", "-c", "raise SystemExit('boom')"))
    failed = run_confined(broken, report=mode_report, on_chunk=None, cancelled=lambda: False)
    assert not failed.ok and "boom" in failed.content and "exit 1" in failed.content


def test_run_shell_streams_and_honours_a_shorter_timeout(report: ConfinementReport, tmp_path: Path) -> None:
    chunks: list[str] = []
    envelope = run_shell(ShellArgs(command="echo hi; sleep 5", timeout_s=0.5), str(tmp_path), LIMITS, report,
                         lambda _, text: chunks.append(text), lambda: False, uid=UID)  # fmt: skip
    assert chunks == ["hi\n"] and envelope.truncated_reason is TruncationReason.TIMEOUT
    done = run_shell(ShellArgs(command="echo ok > f && cat f"), str(tmp_path), LIMITS, report, None,
                     lambda: False, writable=True, uid=UID)  # fmt: skip
    assert done.ok and done.exit_code == 0 and done.content == "ok\n"


def test_launch_overhead_is_modest_and_nothing_leaks(report: ConfinementReport, tmp_path: Path) -> None:
    fds_before = sorted(os.listdir("/proc/self/fd"))
    homes_before = set(Path("/tmp").glob("bastion-home-*"))
    timings = []
    for _ in range(5):
        started = time.monotonic()
        assert sh("true", report, tmp_path).ok
        timings.append((time.monotonic() - started) * 1000)
    median = statistics.median(timings)
    print(f"per-call launch overhead: median {median:.0f} ms over {timings}")
    assert median < 1000
    assert sorted(os.listdir("/proc/self/fd")) == fds_before
    assert set(Path("/tmp").glob("bastion-home-*")) <= homes_before
