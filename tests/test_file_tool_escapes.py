"""Escapes from the workspace, tried against the file tools alone, without the
confinement launcher's walls (a policy mistake must still be contained).

Each attack is checked from outside: the secret never shows up in any result,
and files outside the workspace are never created or changed. Every attack runs
against both resolvers: openat2 and the forced O_NOFOLLOW walk.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from bastion.protocol.sandbox_wire import (
    EditFileArgs,
    GlobArgs,
    GrepArgs,
    ListDirArgs,
    ReadFileArgs,
    ToolEnvelope,
    WriteFileArgs,
)
from bastion.tools_sandbox.file_tools import FileToolArgs, FileToolJob, ResolveMode, run_file_tool
from bastion.tools_sandbox.file_tools.jail import Jail
from bastion.tools_sandbox.file_tools.openat2 import Openat2

SECRET = "TOP-SECRET-7f3a9c"
RESOLVERS = [ResolveMode.OPENAT2, ResolveMode.WALK]


class Layout:
    """tmp/ws (the workspace), tmp/ws-evil and tmp/outside, each holding a secret."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ws = root / "ws"
        self.evil = root / "ws-evil"
        self.outside = root / "outside"
        for directory in (self.ws, self.evil, self.outside):
            directory.mkdir()
        for directory in (self.evil, self.outside):
            (directory / "secret.txt").write_text(f"{SECRET}\n")

    def snapshot(self) -> dict[str, bytes]:
        """Every file outside the workspace, to prove nothing there changed."""
        return {
            str(path): path.read_bytes()
            for top in (self.evil, self.outside)
            for path in sorted(top.rglob("*"))
            if path.is_file() and not path.is_symlink()
        }


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[Layout]:
    layout = Layout(tmp_path)
    before = layout.snapshot()
    yield layout
    assert layout.snapshot() == before, "a file outside the workspace was created or changed"


@pytest.fixture(params=RESOLVERS, ids=lambda mode: mode.value)
def resolve(request: pytest.FixtureRequest) -> ResolveMode:
    return request.param


def run(ws: Path, arguments: FileToolArgs, resolve: ResolveMode, *, writable: bool = True) -> ToolEnvelope:
    envelope = run_file_tool(FileToolJob(arguments=arguments, workspace=str(ws), writable=writable,
                                         resolve=resolve))  # fmt: skip
    assert SECRET not in envelope.content
    return envelope


def refused(envelope: ToolEnvelope, *words: str) -> str:
    assert not envelope.ok, envelope.content
    for word in words:
        assert word in envelope.content
    return envelope.content


def every_tool(path: str) -> list[FileToolArgs]:
    return [
        ReadFileArgs(path=path),
        WriteFileArgs(path=path, content="pwned"),
        EditFileArgs(path=path, old=SECRET, new="pwned"),
        ListDirArgs(path=path),
        GrepArgs(pattern="SECRET", path=path),
    ]


def finishes_within(seconds: float, call: Callable[[], ToolEnvelope]) -> ToolEnvelope:
    """Run `call` on a daemon thread so a hang fails the test instead of the run."""
    result: list[ToolEnvelope] = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the call did not finish within {seconds}s"
    return result[0]


# --- paths that name the outside ---------------------------------------------


def test_absolute_paths_outside_the_workspace_are_refused(layout: Layout, resolve: ResolveMode) -> None:
    for path in (str(layout.outside / "secret.txt"), str(layout.outside), "/etc/passwd", "/"):
        for arguments in every_tool(path):
            refused(run(layout.ws, arguments, resolve), "outside the workspace")
    assert not (layout.outside / "new.txt").exists()
    refused(run(layout.ws, WriteFileArgs(path=str(layout.outside / "new.txt"), content="x"), resolve))


@pytest.mark.parametrize(
    "path", ["../outside/secret.txt", "a/../../outside/secret.txt", "..", "./../outside"]
)
def test_dot_dot_escapes_are_refused(layout: Layout, resolve: ResolveMode, path: str) -> None:
    for arguments in every_tool(path):
        refused(run(layout.ws, arguments, resolve), "climbs out of the workspace")
    refused(run(layout.ws, WriteFileArgs(path="../outside/new.txt", content="x"), resolve))
    assert not (layout.outside / "new.txt").exists()


def test_a_sibling_with_the_workspace_as_prefix_is_outside(layout: Layout, resolve: ResolveMode) -> None:
    # /ws-evil starts with the string /ws but is not beneath it.
    for path in (
        str(layout.evil / "secret.txt"),
        f"{layout.ws}/../ws-evil/secret.txt",
        "../ws-evil/secret.txt",
    ):
        for arguments in every_tool(path):
            refused(run(layout.ws, arguments, resolve))
    refused(run(layout.ws, WriteFileArgs(path=str(layout.evil / "planted.txt"), content="x"), resolve))
    assert not (layout.evil / "planted.txt").exists()


def test_glob_patterns_cannot_name_the_outside(layout: Layout, resolve: ResolveMode) -> None:
    refused(run(layout.ws, GlobArgs(pattern="../*"), resolve), "'..'")
    refused(run(layout.ws, GlobArgs(pattern="**/../../outside/*"), resolve), "'..'")
    refused(run(layout.ws, GlobArgs(pattern=f"{layout.outside}/*"), resolve), "outside the workspace")
    refused(run(layout.ws, GlobArgs(pattern=f"{layout.evil}/*"), resolve), "outside the workspace")
    refused(run(layout.ws, GrepArgs(pattern="x", glob="../*"), resolve), "'..'")


# --- symlinks ----------------------------------------------------------------


@pytest.fixture(params=["absolute", "relative"])
def links(request: pytest.FixtureRequest, layout: Layout) -> Layout:
    """ws/link -> the outside secret, ws/dirlink -> the outside directory."""
    if request.param == "absolute":
        (layout.ws / "link").symlink_to(layout.outside / "secret.txt")
        (layout.ws / "dirlink").symlink_to(layout.outside)
    else:
        (layout.ws / "link").symlink_to("../outside/secret.txt")
        (layout.ws / "dirlink").symlink_to("../outside")
    (layout.ws / "chain").symlink_to("link")  # a link to a link that leaves
    return layout


def test_symlinks_to_the_outside_are_not_followed(links: Layout, resolve: ResolveMode) -> None:
    for path in ("link", "chain", "dirlink", "dirlink/secret.txt", "dirlink/new.txt"):
        for arguments in every_tool(path):
            message = refused(run(links.ws, arguments, resolve))
            assert str(links.outside) not in message, "the refusal leaks the link's host target"
    assert not (links.outside / "new.txt").exists()
    assert (links.ws / "link").is_symlink(), "the link itself was replaced"


def test_walking_tools_do_not_cross_links_to_the_outside(links: Layout, resolve: ResolveMode) -> None:
    listing = run(links.ws, ListDirArgs(), resolve)
    assert listing.ok and "link@\n" in listing.content and "dirlink@\n" in listing.content
    assert run(links.ws, GlobArgs(pattern="**"), resolve).content.startswith("[glob: no paths match")
    assert run(links.ws, GlobArgs(pattern="dirlink/*"), resolve).content.startswith("[glob: no paths match")
    grep = run(links.ws, GrepArgs(pattern="SECRET"), resolve)
    assert grep.ok and grep.content.startswith("[grep: no matches")


def test_glob_lists_links_that_stay_inside_and_skips_those_that_leave(
    layout: Layout, resolve: ResolveMode
) -> None:
    (layout.ws / "real.txt").write_text("x")
    (layout.ws / "inside-link").symlink_to("real.txt")
    (layout.ws / "outside-link").symlink_to(layout.outside / "secret.txt")
    assert run(layout.ws, GlobArgs(pattern="*"), resolve).content == "inside-link\nreal.txt\n"


def test_a_link_planted_between_two_calls_is_not_followed(layout: Layout, resolve: ResolveMode) -> None:
    assert run(layout.ws, WriteFileArgs(path="d/a.txt", content="first"), resolve).ok
    # Between the calls something (a shell tool, another process) swaps d for a link out.
    (layout.ws / "d" / "a.txt").unlink()
    (layout.ws / "d").rmdir()
    (layout.ws / "d").symlink_to(layout.outside)
    refused(run(layout.ws, WriteFileArgs(path="d/a.txt", content="second"), resolve))
    refused(run(layout.ws, WriteFileArgs(path="d/secret.txt", content="second"), resolve))
    refused(run(layout.ws, ReadFileArgs(path="d/secret.txt"), resolve))
    refused(run(layout.ws, EditFileArgs(path="d/secret.txt", old=SECRET, new="x"), resolve))
    assert not (layout.outside / "a.txt").exists()


def test_a_file_swapped_for_a_link_between_two_calls_is_not_written_through(layout: Layout,
                                                                            resolve: ResolveMode) -> None:  # fmt: skip
    assert run(layout.ws, WriteFileArgs(path="notes.txt", content="first"), resolve).ok
    (layout.ws / "notes.txt").unlink()
    (layout.ws / "notes.txt").symlink_to(layout.outside / "secret.txt")
    refused(run(layout.ws, WriteFileArgs(path="notes.txt", content="second"), resolve), "symbolic link")
    refused(run(layout.ws, EditFileArgs(path="notes.txt", old=SECRET, new="x"), resolve), "symbolic link")


# --- hard links --------------------------------------------------------------


def test_writes_never_modify_a_hard_linked_outside_file(layout: Layout, resolve: ResolveMode) -> None:
    outside = layout.root / "outside-hardlinked.txt"
    outside.write_text("original\n")
    os.link(outside, layout.ws / "hl.txt")
    written = run(layout.ws, WriteFileArgs(path="hl.txt", content="new\n"), resolve)
    assert written.ok and "2 hard links" in written.content
    assert outside.read_text() == "original\n"
    assert (layout.ws / "hl.txt").read_text() == "new\n"
    assert (layout.ws / "hl.txt").stat().st_nlink == 1

    os.unlink(layout.ws / "hl.txt")
    os.link(outside, layout.ws / "hl.txt")
    edited = run(layout.ws, EditFileArgs(path="hl.txt", old="original", new="edited"), resolve)
    assert edited.ok and "hard links" in edited.content
    assert outside.read_text() == "original\n"
    assert (layout.ws / "hl.txt").read_text() == "edited\n"


# --- special files -----------------------------------------------------------


def test_a_fifo_never_blocks_a_tool(layout: Layout, resolve: ResolveMode) -> None:
    os.mkfifo(layout.ws / "fifo")
    for arguments in every_tool("fifo"):
        envelope = finishes_within(5, lambda a=arguments: run(layout.ws, a, resolve))
        assert not envelope.ok and ("FIFO" in envelope.content or "not a directory" in envelope.content)
    grep = finishes_within(5, lambda: run(layout.ws, GrepArgs(pattern="x"), resolve))
    assert grep.ok
    assert (layout.ws / "fifo").is_fifo()


def test_sockets_and_devices_are_refused(layout: Layout, resolve: ResolveMode) -> None:
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(layout.ws / "sock"))
        refused(run(layout.ws, ReadFileArgs(path="sock"), resolve), "socket")
        refused(run(layout.ws, WriteFileArgs(path="sock", content="x"), resolve), "socket")
    if os.geteuid() == 0:  # mknod needs root
        os.mknod(layout.ws / "null", 0o600 | 0o020000, os.makedev(1, 3))
        refused(run(layout.ws, ReadFileArgs(path="null"), resolve), "character device")


# --- /proc -------------------------------------------------------------------


def test_proc_paths_are_refused(layout: Layout, resolve: ResolveMode) -> None:
    for path in ("/proc/self/root/etc/passwd", f"/proc/{os.getpid()}/environ", f"/proc/{os.getppid()}/environ",
                 "/proc/self/cwd", "/proc/self/fd/0"):  # fmt: skip
        for arguments in every_tool(path):
            refused(run(layout.ws, arguments, resolve), "outside the workspace")
    (layout.ws / "root").symlink_to("/proc/self/root")
    (layout.ws / "env").symlink_to(f"/proc/{os.getpid()}/environ")
    refused(run(layout.ws, ReadFileArgs(path="root/etc/passwd"), resolve))
    refused(run(layout.ws, ReadFileArgs(path="env"), resolve))


def test_magic_links_are_refused_even_beneath_the_workspace(resolve: ResolveMode) -> None:
    # With /proc/self as the workspace, its magic links lie beneath it: only
    # RESOLVE_NO_MAGICLINKS (or the walk's never-follow rule) stops them.
    with open(__file__) as held:  # an fd whose magic link points at a real file
        for path in ("root/etc/hostname", "cwd", f"fd/{held.fileno()}", "exe"):
            envelope = run_file_tool(FileToolJob(arguments=ReadFileArgs(path=path), workspace="/proc/self",
                                                 resolve=resolve))  # fmt: skip
            refused(envelope)


# --- races -------------------------------------------------------------------


class Flipper:
    """Flips `path` between a real file (or directory) and a symlink to the
    outside, as fast as it can, until stopped."""

    def __init__(self, path: Path, target: Path, *, directory: bool = False) -> None:
        self.path, self.target, self.directory = path, target, directory
        self.stop = threading.Event()
        self.flips = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _flip_file(self) -> None:
        # rename(2) swaps the name atomically: the path always exists, as one or the other.
        staged = self.path.with_name(".staged")
        staged.write_text("public\n")
        os.replace(staged, self.path)
        staged.symlink_to(self.target)
        os.replace(staged, self.path)

    def _flip_dir(self) -> None:
        # A link cannot be renamed over a directory, so the path is briefly missing.
        parked = self.path.with_name(".parked")
        os.rename(self.path, parked)
        self.path.symlink_to(self.target)
        self.path.unlink()
        os.rename(parked, self.path)

    def _run(self) -> None:
        flip = self._flip_dir if self.directory else self._flip_file
        while not self.stop.is_set():
            flip()
            self.flips += 1

    def __enter__(self) -> Flipper:
        if self.directory:
            self.path.mkdir()
            (self.path / "secret.txt").write_text("public\n")
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


RACE_SECONDS = 1.5


@pytest.mark.parametrize("target_kind", ["absolute", "relative"])
def test_a_file_flipped_to_a_link_during_reads_never_leaks(layout: Layout, resolve: ResolveMode,
                                                           target_kind: str) -> None:  # fmt: skip
    target = layout.outside / "secret.txt" if target_kind == "absolute" else Path("../outside/secret.txt")
    contents: set[str] = set()
    reads = 0
    with Flipper(layout.ws / "race.txt", target) as flipper:
        deadline = time.monotonic() + RACE_SECONDS
        while time.monotonic() < deadline or flipper.flips < 1000:
            envelope = run(layout.ws, ReadFileArgs(path="race.txt"), resolve)  # asserts no SECRET
            contents.add(envelope.content if envelope.ok else "refused")
            reads += 1
    assert reads > 1000 and flipper.flips >= 1000
    assert "public\n" in contents and "refused" in contents, "the race never hit both states"


def test_a_directory_flipped_to_a_link_during_reads_never_leaks(layout: Layout, resolve: ResolveMode) -> None:
    contents: set[str] = set()
    with Flipper(layout.ws / "racedir", layout.outside, directory=True) as flipper:
        deadline = time.monotonic() + RACE_SECONDS
        while time.monotonic() < deadline or flipper.flips < 500:
            for arguments in (ReadFileArgs(path="racedir/secret.txt"), GrepArgs(pattern="SECRET|public")):
                envelope = run(layout.ws, arguments, resolve)
                contents.add("ok" if envelope.ok else "refused")
    assert {"ok", "refused"} <= contents


def test_a_file_flipped_to_a_link_during_writes_never_writes_outside(layout: Layout,
                                                                     resolve: ResolveMode) -> None:  # fmt: skip
    # The layout fixture asserts the outside secret is unchanged at the end.
    with Flipper(layout.ws / "race.txt", layout.outside / "secret.txt") as flipper:
        deadline = time.monotonic() + RACE_SECONDS
        while time.monotonic() < deadline or flipper.flips < 500:
            run(layout.ws, WriteFileArgs(path="race.txt", content="written\n"), resolve)
            run(layout.ws, EditFileArgs(path="race.txt", old="public", new="edited"), resolve)


# --- the openat2 fallback ----------------------------------------------------


def test_auto_falls_back_to_the_walk_when_openat2_is_missing(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Openat2, "load", classmethod(lambda cls: None))
    with Jail.at(str(layout.ws), ResolveMode.AUTO, writable=False) as jail:
        assert jail.resolver is ResolveMode.WALK
    (layout.ws / "link").symlink_to(layout.outside / "secret.txt")
    refused(run(layout.ws, ReadFileArgs(path="link"), ResolveMode.AUTO))
    refused(run(layout.ws, ReadFileArgs(path="x"), ResolveMode.OPENAT2), "openat2 is not available")


def test_auto_falls_back_when_a_filter_blocks_openat2(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a seccomp filter answering ENOSYS/EPERM looks like to the probe.
    monkeypatch.setattr(Openat2, "works", lambda self, dir_fd: False)
    with Jail.at(str(layout.ws), ResolveMode.AUTO, writable=False) as jail:
        assert jail.resolver is ResolveMode.WALK
    (layout.ws / "dirlink").symlink_to("../outside")
    refused(run(layout.ws, ReadFileArgs(path="dirlink/secret.txt"), ResolveMode.AUTO))


def test_auto_uses_openat2_where_it_works(layout: Layout) -> None:
    with Jail.at(str(layout.ws), ResolveMode.AUTO, writable=False) as jail:
        assert jail.resolver is ResolveMode.OPENAT2


def test_the_walk_keeps_too_many_links_from_looping(layout: Layout) -> None:
    (layout.ws / "a").symlink_to("b")
    (layout.ws / "b").symlink_to("a")
    refused(run(layout.ws, ReadFileArgs(path="a"), ResolveMode.WALK), "too many symbolic links")
    refused(run(layout.ws, ReadFileArgs(path="a"), ResolveMode.OPENAT2), "too many symbolic links")


# --- the real child process --------------------------------------------------


def run_child(job: FileToolJob | bytes) -> tuple[int, ToolEnvelope]:
    stdin = job if isinstance(job, bytes) else msgspec.msgpack.encode(job)
    done = subprocess.run([sys.executable, "-m", "bastion.tools_sandbox.file_tools"], input=stdin,
                          capture_output=True, timeout=60, env={"PATH": os.environ.get("PATH", "")})  # fmt: skip
    assert done.stderr == b"", done.stderr.decode()
    return done.returncode, msgspec.msgpack.decode(done.stdout, type=ToolEnvelope)


@pytest.mark.e2e
def test_the_child_process_runs_a_job_from_stdin(layout: Layout) -> None:
    (layout.ws / "hello.txt").write_text("hi\n")
    code, envelope = run_child(
        FileToolJob(arguments=ReadFileArgs(path="hello.txt"), workspace=str(layout.ws))
    )
    assert code == 0 and envelope.ok and envelope.content == "hi\n"


@pytest.mark.e2e
def test_the_child_process_refuses_an_escape_with_an_envelope(layout: Layout) -> None:
    (layout.ws / "link").symlink_to(layout.outside / "secret.txt")
    for path in ("link", "../outside/secret.txt", str(layout.evil / "secret.txt")):
        code, envelope = run_child(FileToolJob(arguments=ReadFileArgs(path=path), workspace=str(layout.ws)))
        assert code == 0 and not envelope.ok and SECRET not in envelope.content
    code, envelope = run_child(FileToolJob(arguments=WriteFileArgs(path="../outside/x", content="x"),
                                           workspace=str(layout.ws), writable=True))  # fmt: skip
    assert code == 0 and not envelope.ok and not (layout.outside / "x").exists()


@pytest.mark.e2e
def test_the_child_process_answers_a_malformed_job_with_exit_2(layout: Layout) -> None:
    code, envelope = run_child(b"\x93not a job")
    assert code == 2 and not envelope.ok and "malformed file-tool job" in envelope.content
    shell_job = msgspec.msgpack.encode({"arguments": {"tool": "shell", "command": "id"}, "workspace": "/"})
    code, envelope = run_child(shell_job)
    assert code == 2 and not envelope.ok
