"""The escape suite for the process layers: each attack runs through the real
launcher (both the bubblewrap path and the path used where bwrap is missing)
and its side effect is checked from outside the sandbox.

Path escapes through the file tools live in the file tools' own suite.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import psutil
import pytest

from bastion.protocol.sandbox_wire import ConfinementReport, ToolEnvelope, ToolLimits, TruncationReason
from bastion.tools_sandbox.confine import ConfinedJob, probe, run_confined
from bastion.tools_sandbox.confine.probing import level_of

pytestmark = pytest.mark.e2e

UID = 61600  # this file's own sandbox uid
LIMITS = ToolLimits(timeout_s=8.0, max_output_bytes=16 * 1024, cpu_seconds=8, memory_bytes=256 << 20,
                    file_size_bytes=1 << 20, processes=32)  # fmt: skip
PYTHON = "/usr/bin/python3"  # the system interpreter: what a model's shell command would use


@pytest.fixture(scope="module")
def strong() -> ConfinementReport:
    return probe(uid=UID)


@pytest.fixture(params=["bubblewrap", "direct"])
def report(request: pytest.FixtureRequest, strong: ConfinementReport) -> ConfinementReport:
    if request.param == "bubblewrap":
        return strong
    layers = [msgspec.structs.replace(s, active=False) if s.name == "bubblewrap" else s for s in strong.layers]
    return ConfinementReport(level=level_of(layers), layers=layers)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    return ws


def sandbox_processes() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["uids", "status"]):
        try:
            if process.info["uids"].real == UID and process.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.Error, AttributeError):
            continue
    return found


@pytest.fixture(autouse=True)
def nothing_survives() -> Iterator[None]:
    yield
    assert sandbox_processes() == [], "a sandboxed process outlived its call"


def run(argv: tuple[str, ...], report: ConfinementReport, workspace: Path, *, limits: ToolLimits = LIMITS,
        writable: bool = True) -> ToolEnvelope:  # fmt: skip
    job = ConfinedJob(argv=argv, workspace=str(workspace), limits=limits, uid=UID, writable=writable)
    return run_confined(job, report=report, on_chunk=None, cancelled=lambda: False)


def sh(command: str, report: ConfinementReport, workspace: Path, **kwargs: object) -> ToolEnvelope:
    return run(("/bin/sh", "-c", command), report, workspace, **kwargs)


def py(code: str, report: ConfinementReport, workspace: Path, **kwargs: object) -> ToolEnvelope:
    return run((PYTHON, "-c", code), report, workspace, **kwargs)


# --- network ---------------------------------------------------------------------------------------------


def test_tcp_to_a_listening_host_port_fails(report: ConfinementReport, workspace: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        envelope = py(f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2); print('CONNECTED')",
                      report, workspace)  # fmt: skip
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()
    assert not envelope.ok and "CONNECTED" not in envelope.content
    assert "Address family not supported" in envelope.content or "Operation not permitted" in envelope.content


def test_udp_to_a_host_port_arrives_nowhere(report: ConfinementReport, workspace: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        port = receiver.getsockname()[1]
        envelope = py(f"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                      f"s.sendto(b'leak', ('127.0.0.1', {port}))", report, workspace)  # fmt: skip
        receiver.settimeout(0.3)
        with pytest.raises(TimeoutError):
            receiver.recvfrom(16)
    assert not envelope.ok


def test_dns_lookup_fails(report: ConfinementReport, workspace: Path) -> None:
    envelope = py("import socket; print(socket.getaddrinfo('pypi.org', 443))", report, workspace)
    assert not envelope.ok and "gaierror" in envelope.content


def test_raw_netlink_and_ipv6_sockets_are_refused(report: ConfinementReport, workspace: Path) -> None:
    code = ("import socket\n"
            "for family, kind in [(socket.AF_INET6, socket.SOCK_STREAM), (socket.AF_NETLINK, socket.SOCK_RAW),\n"
            "                     (socket.AF_PACKET, socket.SOCK_RAW), (socket.AF_INET, socket.SOCK_RAW)]:\n"
            "    try:\n        socket.socket(family, kind); print('opened', family)\n"
            "    except OSError as e:\n        print('refused', e.errno)\n"
            "socket.socket(socket.AF_UNIX); print('unix ok')")  # fmt: skip
    envelope = py(code, report, workspace)
    assert envelope.content.split("\n")[:4] == ["refused 97"] * 4 and "unix ok" in envelope.content


def test_only_loopback_exists_and_it_is_down(report: ConfinementReport, workspace: Path) -> None:
    envelope = py("import socket; print(socket.if_nameindex())", report, workspace)
    # if_nameindex needs a netlink socket, which the filter refuses: no way to even enumerate
    assert "opened" not in envelope.content and not envelope.ok


# --- resources -------------------------------------------------------------------------------------------


def test_fork_bomb_is_contained(report: ConfinementReport, workspace: Path) -> None:
    started = time.monotonic()
    limits = msgspec.structs.replace(LIMITS, timeout_s=2.0, processes=24)
    envelope = sh("b() { b | b & }; b; sleep 5", report, workspace, limits=limits)
    assert time.monotonic() - started < 8.0
    assert envelope.truncated_reason is TruncationReason.TIMEOUT
    assert psutil.cpu_count() and psutil.Process().is_running()


def test_memory_hog_fails(report: ConfinementReport, workspace: Path) -> None:
    envelope = py("b = bytearray(1 << 30); print('got it')", report, workspace)
    assert not envelope.ok and "MemoryError" in envelope.content and "got it" not in envelope.content


def test_disk_fill_is_stopped_by_the_file_size_limit(report: ConfinementReport, workspace: Path) -> None:
    envelope = sh("head -c 50000000 /dev/zero > big; echo survived", report, workspace)
    assert (workspace / "big").stat().st_size <= LIMITS.file_size_bytes
    # the writer dies of SIGXFSZ; the shell reports it and goes on
    assert "File size limit exceeded\nsurvived\n" == envelope.content


def test_huge_output_is_capped(report: ConfinementReport, workspace: Path) -> None:
    started = time.monotonic()
    envelope = sh("head -c 30000000 /dev/zero | tr '\\0' x; echo; echo THE-END", report, workspace)
    assert time.monotonic() - started < 8.0
    assert envelope.truncated_reason is TruncationReason.OUTPUT_CAP
    assert len(envelope.content.encode()) < LIMITS.max_output_bytes + 200
    assert envelope.content.startswith("xxxx") and envelope.content.endswith("THE-END\n")


def test_busy_loop_is_killed_by_the_cpu_limit(report: ConfinementReport, workspace: Path) -> None:
    started = time.monotonic()
    limits = msgspec.structs.replace(LIMITS, cpu_seconds=1, timeout_s=8.0)
    envelope = sh("while :; do :; done", report, workspace, limits=limits)
    assert time.monotonic() - started < 6.0
    assert envelope.exit_code == 128 + signal.SIGXCPU and "SIGXCPU" in envelope.content


def test_busy_loop_is_killed_by_the_wall_clock(report: ConfinementReport, workspace: Path) -> None:
    started = time.monotonic()
    limits = msgspec.structs.replace(LIMITS, cpu_seconds=60, timeout_s=1.0)
    envelope = sh("while :; do :; done", report, workspace, limits=limits)
    assert time.monotonic() - started < 4.0 and envelope.truncated_reason is TruncationReason.TIMEOUT


def test_setsid_grandchild_does_not_outlive_the_call(report: ConfinementReport, workspace: Path) -> None:
    # Durations no other process on the machine is likely to sleep for: the check looks at all of them.
    envelope = sh("setsid sleep 3917 & (setsid sh -c 'trap \"\" HUP TERM; sleep 3919' &) ; echo bye",
                  report, workspace)  # fmt: skip
    assert envelope.ok and envelope.content == "bye\n"
    assert sandbox_processes() == []
    assert not [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] in (["sleep", "3917"],
                                                                                      ["sleep", "3919"])]  # fmt: skip


# --- the supervisor and the host --------------------------------------------------------------------------


@pytest.fixture
def victim() -> Iterator[subprocess.Popen[bytes]]:
    """A root process standing in for the supervisor (signalling pytest itself would end the run)."""
    process = subprocess.Popen(["sleep", "30"])
    yield process
    process.kill()
    process.wait()


def test_signalling_the_supervisor_fails(report: ConfinementReport, workspace: Path,
                                         victim: subprocess.Popen[bytes]) -> None:  # fmt: skip
    envelope = sh(f"kill -TERM {victim.pid}; kill -KILL {victim.pid}; kill -USR1 {os.getpid()}; echo tried",
                  report, workspace)  # fmt: skip
    assert "tried" in envelope.content
    time.sleep(0.1)
    assert victim.poll() is None


def test_ptracing_the_supervisor_fails(report: ConfinementReport, workspace: Path,
                                       victim: subprocess.Popen[bytes]) -> None:  # fmt: skip
    code = ("import ctypes, os; libc = ctypes.CDLL(None, use_errno=True)\n"
            f"for pid in ({victim.pid}, {os.getpid()}, 1):\n"
            "    print(libc.ptrace(16, pid, 0, 0), ctypes.get_errno())")  # PTRACE_ATTACH
    envelope = py(code, report, workspace)
    assert envelope.content.split("\n")[:3] == ["-1 1"] * 3  # EPERM from the filter
    tracer = [line for line in Path(f"/proc/{victim.pid}/status").read_text().splitlines()
              if line.startswith("TracerPid")]  # fmt: skip
    assert tracer == ["TracerPid:\t0"]


def test_supervisor_environ_is_unreadable(report: ConfinementReport, workspace: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("BASTION_SECRET_TEST", "1")
    envelope = sh(f"cat /proc/{os.getpid()}/environ; cat /proc/1/environ; tr '\\0' ' ' < /proc/self/environ",
                  report, workspace)  # fmt: skip
    assert "BASTION_SECRET_TEST" not in envelope.content and not envelope.ok


@pytest.fixture
def home_secret() -> Iterator[Path]:
    secret = Path("/root/.bastion-test-secret")
    secret.write_text("TOPSECRET-HOME\n")
    yield secret
    secret.unlink()


def test_secret_in_the_real_home_is_unreadable(report: ConfinementReport, workspace: Path,
                                               home_secret: Path) -> None:  # fmt: skip
    envelope = sh(f"cat {home_secret}; cat ~root/.bastion-test-secret; ls -a /root; "
                  "cat /proc/self/root/root/.bastion-test-secret; cat /proc/1/root/root/.bastion-test-secret",
                  report, workspace)  # fmt: skip
    assert "TOPSECRET" not in envelope.content and not envelope.ok
    assert home_secret.read_text() == "TOPSECRET-HOME\n"


def test_proc_self_root_does_not_reach_the_host(report: ConfinementReport, workspace: Path,
                                                tmp_path: Path) -> None:  # fmt: skip
    outside = tmp_path / "outside.txt"
    outside.write_text("HOST-ONLY\n")
    envelope = sh(f"cat /proc/self/root{outside}; ls /proc/self/root/; cat /proc/self/cwd/../outside.txt; "
                  f"echo pwned > /proc/self/root{tmp_path}/planted", report, workspace)  # fmt: skip
    assert "HOST-ONLY" not in envelope.content
    assert not (tmp_path / "planted").exists()


def test_writes_outside_the_workspace_fail(report: ConfinementReport, workspace: Path, tmp_path: Path) -> None:
    evil = tmp_path / "ws-evil"
    evil.mkdir()
    evil.chmod(0o777)
    envelope = sh(f"echo x > {evil}/planted; echo x > ../planted; echo x > /tmp/bastion-escape-{UID}; "
                  "echo x > /etc/planted; mkdir /usr/planted", report, workspace)  # fmt: skip
    assert not envelope.ok
    for path in (evil / "planted", tmp_path / "planted", Path(f"/tmp/bastion-escape-{UID}"),
                 Path("/etc/planted"), Path("/usr/planted")):  # fmt: skip
        assert not path.exists(), path


def test_inherited_fds_are_closed(report: ConfinementReport, workspace: Path, tmp_path: Path) -> None:
    secret = tmp_path / "inherited.txt"
    secret.write_text("INHERITED-SECRET\n")
    read_fd = os.open(secret, os.O_RDONLY)  # no O_CLOEXEC
    write_fd = os.open(tmp_path / "target.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    os.set_inheritable(read_fd, True)
    os.set_inheritable(write_fd, True)
    code = ("import os\n"
            f"for fd, act in (({read_fd}, lambda: os.read({read_fd}, 100)), ({write_fd}, lambda: os.write({write_fd}, b'pwned'))):\n"
            "    try:\n        print(fd, act())\n"
            "    except OSError as e:\n        print(fd, e.strerror)\n")  # fmt: skip
    try:
        envelope = py(code, report, workspace)
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert "INHERITED-SECRET" not in envelope.content
    assert envelope.content == f"{read_fd} Bad file descriptor\n{write_fd} Bad file descriptor\n"
    assert (tmp_path / "target.txt").read_text() == ""


# --- privileges ----------------------------------------------------------------------------------------


def test_user_namespaces_do_not_regain_root(report: ConfinementReport, workspace: Path) -> None:
    envelope = sh("unshare -U -r id -u; unshare -Ur sh -c 'echo inside-uid=$(id -u)'; "
                  "unshare -m true && echo mount-ns-made; id -u", report, workspace)  # fmt: skip
    assert "inside-uid=0" not in envelope.content and "mount-ns-made" not in envelope.content
    assert envelope.content.strip().splitlines()[-1] == str(UID)


def test_setuid_binaries_do_not_regain_root(report: ConfinementReport, workspace: Path) -> None:
    # A setuid-root copy of `id` planted in the workspace, plus the real setuid binaries of the system.
    planted = workspace / "id-suid"
    planted.write_bytes(Path("/usr/bin/id").read_bytes())
    os.chown(planted, 0, 0)
    planted.chmod(0o4755)
    envelope = sh("./id-suid -u; su -c 'id -u' root </dev/null; newgrp root </dev/null; "
                  "mount -t tmpfs none /tmp; umount /usr; echo end", report, workspace)  # fmt: skip
    lines = envelope.content.splitlines()
    assert lines[0] == str(UID) and "end" in lines
    assert "0" not in lines
    assert sh("id -u; id -G", report, workspace).content.split() == [str(UID), str(UID)]


def test_no_setuid_file_can_be_left_in_the_workspace(report: ConfinementReport, workspace: Path) -> None:
    """The workspace is written as its owner (root): a setuid bit would make a root setuid binary on disk."""
    code = ("import os, shutil\n"
            "shutil.copy('/usr/bin/id', 'a'); shutil.copy('/usr/bin/id', 'b')\n"
            "attempts = [lambda: os.chmod('a', 0o4755), lambda: os.chmod('b', 0o2755),\n"
            "            lambda: os.open('c', os.O_CREAT | os.O_WRONLY, 0o4755),\n"
            "            lambda: os.mknod('d', 0o104755), lambda: os.chmod('a', 0o755)]\n"
            "for attempt in attempts:\n"
            "    try:\n        attempt(); print('done')\n"
            "    except OSError as e:\n        print(e.strerror)\n")  # fmt: skip
    envelope = py(code, report, workspace)
    assert envelope.content.splitlines() == ["Operation not permitted"] * 4 + ["done"]
    sh("chmod u+s a; chmod g+s b; install -m 4755 /usr/bin/id e", report, workspace)
    for path in workspace.iterdir():
        assert not path.stat().st_mode & 0o6000, path
    assert (workspace / "a").stat().st_uid == 0  # it really is written as root on disk


def test_no_capabilities_and_no_new_privs(report: ConfinementReport, workspace: Path) -> None:
    envelope = sh("grep -E 'NoNewPrivs|Cap(Inh|Prm|Eff|Bnd|Amb)|Seccomp:' /proc/self/status; "
                  "echo $?", report, workspace)  # fmt: skip
    # Landlock hides /proc itself; ask the kernel from inside instead.
    code = ("import ctypes; libc = ctypes.CDLL(None)\n"
            "print(libc.prctl(39, 0, 0, 0, 0), libc.prctl(21, 0, 0, 0, 0), "
            "[c for c in range(41) if libc.prctl(23, c, 0, 0, 0) == 1])")  # GET_NO_NEW_PRIVS, GET_SECCOMP, CAPBSET_READ
    inside = py(code, report, workspace)
    assert inside.content.strip() == "1 2 []", inside.content
    assert envelope.content.strip().endswith("2")  # grep could not read /proc/self/status


# --- defence in depth --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["bubblewrap", "direct"])
def test_namespaces_and_uid_hold_without_landlock_and_seccomp(path: str, strong: ConfinementReport,
                                                              workspace: Path, home_secret: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Each wall must not depend on the others: switch off the two filters and attack again."""
    monkeypatch.setenv("BASTION_SECRET_TEST", "1")
    off = {"landlock", "seccomp"} | ({"bubblewrap"} if path == "direct" else set())
    layers = [msgspec.structs.replace(s, active=False) if s.name in off else s for s in strong.layers]
    weakened = ConfinementReport(level=level_of(layers), layers=layers)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        envelope = sh(f"cat {home_secret}; cat /proc/{os.getpid()}/environ; kill -0 {os.getpid()} && echo SEEN; "
                      f"{PYTHON} -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 1)\" "
                      "&& echo CONNECTED; unshare -Ur id -u; echo pwned > /etc/planted; id -u",
                      weakened, workspace, writable=False)  # fmt: skip
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()
    for leak in ("TOPSECRET", "BASTION_SECRET_TEST", "SEEN", "CONNECTED"):
        assert leak not in envelope.content
    assert envelope.content.strip().splitlines()[-1] == str(UID) and not Path("/etc/planted").exists()
    refused = sh("true", weakened, workspace, writable=True)
    assert "REFUSED" in refused.content and "needs the seccomp layer" in refused.content
