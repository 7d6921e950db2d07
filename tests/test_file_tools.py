"""The file tools' behaviour: what each returns, how it fails, and its caps.

Escapes from the workspace are in test_file_tool_escapes.py. Every test here
runs against both resolvers (openat2 and the O_NOFOLLOW walk) where paths are
resolved, because either may be the one in force on a user's machine.
"""

from __future__ import annotations

import os
import stat
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
    ToolLimits,
    TruncationReason,
    WriteFileArgs,
)
from bastion.tools_sandbox import file_tools
from bastion.tools_sandbox.file_tools import FILE_TOOLS, FileToolArgs, FileToolJob, ResolveMode, run_file_tool
from bastion.tools_sandbox.file_tools import glob as glob_tool
from bastion.tools_sandbox.file_tools import grep as grep_tool
from bastion.tools_sandbox.file_tools import list_dir as list_dir_tool
from bastion.tools_sandbox.file_tools.glob_pattern import GlobPattern
from bastion.tools_sandbox.file_tools.openat2 import Openat2
from bastion.tools_sandbox.file_tools.output_cap import HeadTail

RESOLVERS = [ResolveMode.OPENAT2, ResolveMode.WALK]


@pytest.fixture(params=RESOLVERS, ids=lambda mode: mode.value)
def resolve(request: pytest.FixtureRequest) -> ResolveMode:
    return request.param


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    return workspace


def run(ws: Path, arguments: FileToolArgs, resolve: ResolveMode = ResolveMode.AUTO, *, writable: bool = False,
        limits: ToolLimits = ToolLimits()) -> ToolEnvelope:  # fmt: skip
    return run_file_tool(
        FileToolJob(arguments=arguments, workspace=str(ws), limits=limits, writable=writable, resolve=resolve)
    )


def ok(envelope: ToolEnvelope) -> str:
    assert envelope.ok, envelope.content
    return envelope.content


def failed(envelope: ToolEnvelope) -> str:
    assert not envelope.ok, envelope.content
    return envelope.content


# --- the package surface ---------------------------------------------------


def test_public_exports_are_guarded() -> None:
    assert sorted(file_tools.__all__) == [
        "FILE_TOOLS",
        "FileToolArgs",
        "FileToolJob",
        "ResolveMode",
        "run_file_tool",
    ]
    assert FILE_TOOLS == {"read_file", "write_file", "edit_file", "list_dir", "glob", "grep"}


def test_openat2_is_available_on_this_machine(tmp_path: Path) -> None:
    # The escape suite's openat2 half would silently test nothing otherwise.
    binding = Openat2.load()
    assert binding is not None
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        assert binding.works(fd)
    finally:
        os.close(fd)


def test_job_round_trips_through_msgpack() -> None:
    job = FileToolJob(arguments=GrepArgs(pattern="x", glob="*.py"), workspace="/w", writable=True)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(job), type=FileToolJob) == job


def test_every_envelope_carries_its_duration(ws: Path) -> None:
    assert run(ws, ListDirArgs()).duration_ms > 0
    assert run(ws, ReadFileArgs(path="missing")).duration_ms > 0


def test_a_relative_workspace_is_refused(ws: Path) -> None:
    envelope = run_file_tool(FileToolJob(arguments=ListDirArgs(), workspace="ws"))
    assert "absolute" in failed(envelope)


def test_a_missing_workspace_fails_cleanly(tmp_path: Path) -> None:
    assert "workspace cannot be opened" in failed(run(tmp_path / "nope", ListDirArgs()))


# --- read_file ---------------------------------------------------------------


def test_read_file_returns_the_text(ws: Path, resolve: ResolveMode) -> None:
    (ws / "a.txt").write_text("one\ntwo\n")
    assert ok(run(ws, ReadFileArgs(path="a.txt"), resolve)) == "one\ntwo\n"


def test_read_file_takes_an_absolute_path_inside_the_workspace(ws: Path, resolve: ResolveMode) -> None:
    (ws / "d").mkdir()
    (ws / "d" / "a.txt").write_text("inside\n")
    assert ok(run(ws, ReadFileArgs(path=str(ws / "d" / "a.txt")), resolve)) == "inside\n"


def test_read_file_follows_a_symlink_that_stays_inside(ws: Path, resolve: ResolveMode) -> None:
    (ws / "real").mkdir()
    (ws / "real" / "f.txt").write_text("linked\n")
    (ws / "alias").symlink_to("real")
    (ws / "f-link").symlink_to("real/f.txt")
    assert ok(run(ws, ReadFileArgs(path="alias/f.txt"), resolve)) == "linked\n"
    assert ok(run(ws, ReadFileArgs(path="f-link"), resolve)) == "linked\n"


def test_read_file_windows_lines_and_says_how_to_continue(ws: Path, resolve: ResolveMode) -> None:
    (ws / "n.txt").write_text("".join(f"line {i}\n" for i in range(10)))
    content = ok(run(ws, ReadFileArgs(path="n.txt", offset=2, limit=3), resolve))
    assert content.startswith("line 2\nline 3\nline 4\n")
    assert "continue with offset=5" in content
    assert ok(run(ws, ReadFileArgs(path="n.txt", offset=8), resolve)) == "line 8\nline 9\n"


def test_read_file_says_when_the_offset_is_past_the_end(ws: Path) -> None:
    (ws / "n.txt").write_text("a\nb\n")
    assert "past the end: the file has 2 lines" in ok(run(ws, ReadFileArgs(path="n.txt", offset=5)))


def test_read_file_refuses_negative_offsets(ws: Path) -> None:
    (ws / "n.txt").write_text("a\n")
    assert "0 or more" in failed(run(ws, ReadFileArgs(path="n.txt", offset=-1)))


def test_read_file_caps_output_keeping_head_and_tail(ws: Path) -> None:
    (ws / "big.txt").write_text("HEAD\n" + "x" * 50_000 + "\nTAIL\n")
    envelope = run(ws, ReadFileArgs(path="big.txt"), limits=ToolLimits(max_output_bytes=1000))
    assert envelope.ok and envelope.truncated and envelope.truncated_reason is TruncationReason.OUTPUT_CAP
    assert envelope.content.startswith("HEAD\n") and envelope.content.endswith("TAIL\n")
    assert "bytes omitted" in envelope.content
    assert len(envelope.content.encode()) <= 1000


def test_read_file_decodes_small_binary_files_and_says_so(ws: Path) -> None:
    (ws / "b.bin").write_bytes(b"ab\0\xffcd\n")
    content = ok(run(ws, ReadFileArgs(path="b.bin")))
    assert content.startswith("ab\0\ufffdcd\n") and "binary file" in content


def test_read_file_refuses_large_binary_files(ws: Path) -> None:
    (ws / "big.bin").write_bytes(b"\0" * 300_000)
    assert "binary file of 300000 bytes" in failed(run(ws, ReadFileArgs(path="big.bin")))


def test_read_file_says_when_text_is_not_utf8(ws: Path) -> None:
    (ws / "latin.txt").write_bytes("café\n".encode("latin-1"))
    content = ok(run(ws, ReadFileArgs(path="latin.txt")))
    assert content.startswith("caf\ufffd\n") and "not valid UTF-8" in content


@pytest.mark.parametrize(("path", "message"), [("missing.txt", "does not exist"), ("d", "is a directory")])
def test_read_file_errors(ws: Path, resolve: ResolveMode, path: str, message: str) -> None:
    (ws / "d").mkdir()
    assert message in failed(run(ws, ReadFileArgs(path=path), resolve))


def test_read_file_refuses_an_empty_path_and_nul_bytes(ws: Path) -> None:
    assert "empty" in failed(run(ws, ReadFileArgs(path="")))
    assert "NUL" in failed(run(ws, ReadFileArgs(path="a\0b")))


# --- write_file --------------------------------------------------------------


def test_write_file_creates_parents_inside_the_workspace(ws: Path, resolve: ResolveMode) -> None:
    content = ok(run(ws, WriteFileArgs(path="a/b/c.txt", content="hé\n"), resolve, writable=True))
    assert (ws / "a" / "b" / "c.txt").read_text() == "hé\n"
    assert "wrote 4 bytes to 'a/b/c.txt'" in content and "created a/, a/b/" in content


def test_write_file_replaces_content_keeping_the_mode_and_no_temp_files(
    ws: Path, resolve: ResolveMode
) -> None:
    target = ws / "run.sh"
    target.write_text("old")
    target.chmod(0o750)
    ok(run(ws, WriteFileArgs(path="run.sh", content="new"), resolve, writable=True))
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    assert sorted(p.name for p in ws.iterdir()) == ["run.sh"]


def test_write_file_is_refused_when_writes_are_off(ws: Path) -> None:
    message = failed(run(ws, WriteFileArgs(path="x.txt", content="data")))
    assert "write_file is disabled" in message and "--allow-write" in message
    assert not (ws / "x.txt").exists()


def test_write_file_refuses_content_over_the_file_size_limit(ws: Path) -> None:
    envelope = run(ws, WriteFileArgs(path="x.txt", content="x" * 101), writable=True,
                   limits=ToolLimits(file_size_bytes=100))  # fmt: skip
    assert "file size limit" in failed(envelope)
    assert not (ws / "x.txt").exists()


@pytest.mark.parametrize("path", ["d", ".", "d/.."])
def test_write_file_refuses_directories(ws: Path, path: str) -> None:
    (ws / "d").mkdir()
    assert "directory" in failed(run(ws, WriteFileArgs(path=path, content="x"), writable=True))


def test_write_file_refuses_when_a_parent_is_a_file(ws: Path, resolve: ResolveMode) -> None:
    (ws / "f").write_text("x")
    assert "not a directory" in failed(
        run(ws, WriteFileArgs(path="f/g.txt", content="x"), resolve, writable=True)
    )


# --- edit_file ---------------------------------------------------------------


def test_edit_file_replaces_the_one_occurrence(ws: Path, resolve: ResolveMode) -> None:
    (ws / "m.py").write_text("a = 1\nb = 2\n")
    content = ok(run(ws, EditFileArgs(path="m.py", old="b = 2", new="b = 3"), resolve, writable=True))
    assert (ws / "m.py").read_text() == "a = 1\nb = 3\n"
    assert "at line 2" in content


def test_edit_file_fails_clearly_when_old_is_missing(ws: Path) -> None:
    (ws / "m.py").write_text("a = 1\n")
    assert "'old' was not found in 'm.py'" in failed(run(ws, EditFileArgs(path="m.py", old="zzz", new="y"),
                                                         writable=True))  # fmt: skip
    assert (ws / "m.py").read_text() == "a = 1\n"


def test_edit_file_says_how_many_times_an_ambiguous_old_occurs(ws: Path) -> None:
    (ws / "m.py").write_text("x\nx\nx\n")
    message = failed(run(ws, EditFileArgs(path="m.py", old="x", new="y"), writable=True))
    assert "occurs 3 times" in message
    assert (ws / "m.py").read_text() == "x\nx\nx\n"


def test_edit_file_hints_at_crlf_line_endings(ws: Path) -> None:
    (ws / "w.txt").write_bytes(b"one\r\ntwo\r\n")
    assert "CRLF" in failed(run(ws, EditFileArgs(path="w.txt", old="one\ntwo", new="x"), writable=True))


def test_edit_file_is_refused_when_writes_are_off(ws: Path) -> None:
    (ws / "m.py").write_text("a\n")
    assert "edit_file is disabled" in failed(run(ws, EditFileArgs(path="m.py", old="a", new="b")))
    assert (ws / "m.py").read_text() == "a\n"


@pytest.mark.parametrize(
    ("setup", "old", "message"),
    [
        (None, "a", "does not exist"),
        (b"a\n", "", "'old' is empty"),
        (b"a\0b", "a", "binary file"),
        (b"caf\xe9", "caf", "not valid UTF-8"),
    ],
)
def test_edit_file_errors(ws: Path, setup: bytes | None, old: str, message: str) -> None:
    if setup is not None:
        (ws / "f").write_bytes(setup)
    assert message in failed(run(ws, EditFileArgs(path="f", old=old, new="z"), writable=True))


def test_edit_file_can_delete_text(ws: Path) -> None:
    (ws / "f.txt").write_text("keep drop keep")
    ok(run(ws, EditFileArgs(path="f.txt", old=" drop", new=""), writable=True))
    assert (ws / "f.txt").read_text() == "keep keep"


# --- list_dir ----------------------------------------------------------------


def test_list_dir_sorts_and_marks_directories(ws: Path, resolve: ResolveMode) -> None:
    (ws / "b.txt").write_text("")
    (ws / "a").mkdir()
    (ws / ".hidden").write_text("")
    (ws / "a" / "inner.txt").write_text("")
    assert ok(run(ws, ListDirArgs(), resolve)) == ".hidden\na/\nb.txt\n"
    assert ok(run(ws, ListDirArgs(path="a"), resolve)) == "inner.txt\n"


def test_list_dir_shows_links_as_what_they_lead_to_inside(ws: Path, resolve: ResolveMode) -> None:
    (ws / "real").mkdir()
    (ws / "dir-link").symlink_to("real")
    (ws / "file-link").symlink_to("real/missing")
    content = ok(run(ws, ListDirArgs(), resolve))
    assert content.startswith("dir-link/\nfile-link@\nreal/\n")
    assert "leads outside the workspace or nowhere" in content


def test_list_dir_says_a_directory_is_empty(ws: Path) -> None:
    assert "is empty" in ok(run(ws, ListDirArgs()))


def test_list_dir_caps_entries(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(list_dir_tool, "MAX_ENTRIES", 3)
    for i in range(5):
        (ws / f"f{i}").write_text("")
    envelope = run(ws, ListDirArgs())
    assert envelope.truncated and envelope.truncated_reason is TruncationReason.OUTPUT_CAP
    assert envelope.content.startswith("f0\nf1\nf2\n") and "2 more entries" in envelope.content


def test_list_dir_of_a_file_fails(ws: Path, resolve: ResolveMode) -> None:
    (ws / "f").write_text("")
    assert "not a directory" in failed(run(ws, ListDirArgs(path="f"), resolve))


# --- glob --------------------------------------------------------------------


@pytest.fixture
def tree(ws: Path) -> Path:
    for path in [
        "src/app.py",
        "src/lib/util.py",
        "src/lib/data.json",
        "README.md",
        ".git/config",
        "src/.cache/x.py",
    ]:
        (ws / path).parent.mkdir(parents=True, exist_ok=True)
        (ws / path).write_text(f"hello from {path}\n")
    return ws


def test_glob_returns_workspace_relative_paths(tree: Path, resolve: ResolveMode) -> None:
    assert ok(run(tree, GlobArgs(pattern="**/*.py"), resolve)) == "src/app.py\nsrc/lib/util.py\n"
    assert ok(run(tree, GlobArgs(pattern="src/*"), resolve)) == "src/app.py\nsrc/lib/\n"
    assert ok(run(tree, GlobArgs(pattern="*.md"), resolve)) == "README.md\n"


def test_glob_matches_dot_names_only_when_asked(tree: Path) -> None:
    assert ok(run(tree, GlobArgs(pattern=".git/*"))) == ".git/config\n"
    assert ok(run(tree, GlobArgs(pattern="src/.*/*.py"))) == "src/.cache/x.py\n"


def test_glob_takes_an_absolute_pattern_inside_the_workspace(tree: Path) -> None:
    assert ok(run(tree, GlobArgs(pattern=f"{tree}/src/*.py"))) == "src/app.py\n"


def test_glob_says_when_nothing_matches(tree: Path) -> None:
    envelope = run(tree, GlobArgs(pattern="*.rs"))
    assert envelope.ok and "no paths match '*.rs'" in envelope.content


def test_glob_caps_results(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(glob_tool, "MAX_RESULTS", 2)
    envelope = run(tree, GlobArgs(pattern="**"))
    assert envelope.truncated and envelope.truncated_reason is TruncationReason.OUTPUT_CAP
    assert "more matches not shown" in envelope.content


def test_glob_caps_the_walk(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(glob_tool, "MAX_SCANNED", 3)
    envelope = run(tree, GlobArgs(pattern="**/*.json"))
    assert envelope.truncated and "stopped after looking at 3 entries" in envelope.content


# --- grep --------------------------------------------------------------------


def test_grep_reports_relative_path_line_and_text(tree: Path, resolve: ResolveMode) -> None:
    content = ok(run(tree, GrepArgs(pattern=r"from src/l\w+"), resolve))
    assert (
        content
        == "src/lib/data.json:1: hello from src/lib/data.json\nsrc/lib/util.py:1: hello from src/lib/util.py\n"
    )


def test_grep_skips_dot_names_unless_pointed_at_them(tree: Path) -> None:
    assert ".git" not in ok(run(tree, GrepArgs(pattern="hello")))
    assert ok(run(tree, GrepArgs(pattern="hello", path=".git"))) == ".git/config:1: hello from .git/config\n"


def test_grep_filters_by_glob(tree: Path) -> None:
    assert ok(run(tree, GrepArgs(pattern="hello", glob="*.py"))).splitlines() == [
        "src/app.py:1: hello from src/app.py",
        "src/lib/util.py:1: hello from src/lib/util.py",
    ]
    assert (
        ok(run(tree, GrepArgs(pattern="hello", glob="src/*.py"))) == "src/app.py:1: hello from src/app.py\n"
    )


def test_grep_searches_one_file(tree: Path, resolve: ResolveMode) -> None:
    assert ok(run(tree, GrepArgs(pattern="hello", path="src/app.py"), resolve)) == (
        "src/app.py:1: hello from src/app.py\n"
    )


def test_grep_skips_binary_files(tree: Path) -> None:
    (tree / "blob.bin").write_bytes(b"hello\0world")
    content = ok(run(tree, GrepArgs(pattern="hello")))
    assert "blob.bin" not in content.split("[grep")[0] and "skipped 1 binary files" in content


def test_grep_rejects_an_invalid_regex(tree: Path) -> None:
    assert "invalid regular expression" in failed(run(tree, GrepArgs(pattern="(unclosed")))


def test_grep_says_when_nothing_matches(tree: Path) -> None:
    assert "no matches in 4 files searched" in ok(run(tree, GrepArgs(pattern="nothing-like-this")))


def test_grep_caps_matches(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grep_tool, "MAX_MATCHES", 5)
    (ws / "many.txt").write_text("hit\n" * 50)
    envelope = run(ws, GrepArgs(pattern="hit"))
    assert envelope.truncated and envelope.truncated_reason is TruncationReason.OUTPUT_CAP
    assert envelope.content.count("many.txt:") == 5


def test_grep_caps_output_bytes(ws: Path) -> None:
    (ws / "wide.txt").write_text(("hit " + "y" * 200 + "\n") * 100)
    envelope = run(ws, GrepArgs(pattern="hit"), limits=ToolLimits(max_output_bytes=2000))
    assert envelope.truncated and envelope.content.startswith("wide.txt:1: hit ")
    assert "bytes omitted" in envelope.content


def test_grep_cuts_long_lines(ws: Path) -> None:
    (ws / "long.txt").write_text("hit" + "z" * 1000 + "\n")
    line = ok(run(ws, GrepArgs(pattern="hit"))).splitlines()[0]
    assert line.endswith("…") and len(line) < 400


# --- building blocks ---------------------------------------------------------


def test_head_tail_keeps_everything_under_the_cap() -> None:
    out = HeadTail(100)
    for _ in range(9):
        out.write("0123456789")
    assert not out.truncated and out.render() == "0123456789" * 9


def test_head_tail_keeps_both_ends_within_the_cap() -> None:
    out = HeadTail(200)
    out.write("BEGIN")
    for _ in range(1000):
        out.write("é-")
    out.write("END")
    text = out.render()
    assert out.truncated and text.startswith("BEGIN") and text.endswith("END")
    assert len(text.encode()) <= 200


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("**/*.py", "a.py", True), ("**/*.py", "a/b/c.py", True), ("**/*.py", ".venv/x.py", False),
        ("*.py", "a/b.py", False), ("src/**", "src/a/b", True), ("src/**", "src", True),
        ("a/**/b", "a/b", True), ("a/**/b", "a/x/y/b", True), ("?.txt", "ab.txt", False),
        ("[ab].txt", "b.txt", True), (".*", ".env", True), ("*", ".env", False),
    ],
)  # fmt: skip
def test_glob_pattern_matching(pattern: str, path: str, matches: bool) -> None:
    assert GlobPattern(pattern).match(path.split("/")) is matches


def test_glob_pattern_prunes_directories_that_cannot_match() -> None:
    pattern = GlobPattern("src/*.py")
    assert pattern.could_match_below(["src"]) and not pattern.could_match_below(["docs"])
    assert not pattern.could_match_below(["src", "deeper"])
    assert GlobPattern("**/x").could_match_below(["a", "b"])
