"""The audit log against real files: round trips, every kind of tampering found where it happened,
crashes mid-write, a full disk, and what an fsync per record costs."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from bastion.protocol import ErrorCode, HomeLayout
from bastion.protocol.agent_events import ToolDecisionKind
from bastion.protocol.sandbox_wire import ConfinementLevel, ToolEnvelope, TruncationReason
from bastion.supervisor.errors import AuditError, SupervisorError
from bastion.supervisor.trust import audit
from bastion.supervisor.trust.approvals import ApprovalStatus
from bastion.supervisor.trust.audit import (
    GENESIS,
    AuditAnchor,
    AuditedCall,
    AuditKind,
    AuditLog,
    DecisionRecord,
    ExecutionRecord,
    anchor_path,
    content_hash,
    decode,
    encode,
    line_digest,
    quarantine_path,
    seal,
)
from bastion.supervisor.trust.audit_verify import ProblemKind, VerifyReport, verify

SECRET_ARGS = '{"command":"cat ~/.ssh/id_ed25519"}'


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        self.now += 0.5
        return self.now


def call(call_id: str = "c1", arguments: str = SECRET_ARGS) -> AuditedCall:
    return AuditedCall(
        session="main", request_id="r1", call_id=call_id, tool="shell", arguments=arguments,
        policy_hash="p" * 64, sandbox_level=ConfinementLevel.STRONG,
    )  # fmt: skip


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return HomeLayout(tmp_path / "home").audit_log


def write_log(path: Path, records: int = 6) -> list[bytes]:
    """A log of `records` decision records (call ids c1, c2, ...); returns its lines."""
    with AuditLog.open(path, clock=Clock()) as log:
        for i in range(1, records + 1):
            log.append(call(f"c{i}").decided(ToolDecisionKind.ALLOW, "rule 1"))
    return lines(path)


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def rewrite(path: Path, new_lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in new_lines))


def kinds_at(report: VerifyReport) -> list[tuple[ProblemKind, int | None]]:
    return [(problem.kind, problem.line) for problem in report.problems]


def reseal(line: bytes, after: bytes | None, **changes: object) -> bytes:
    """What an attacker who knows the format writes: `line` changed and re-hashed, chained after `after`."""
    record = msgspec.structs.replace(decode(line), **changes)
    previous = AuditAnchor(seq=record.seq - 1, head=GENESIS if after is None else line_digest(after))
    return encode(seal(record, previous, record.time))


# -- the round trip


def test_records_round_trip_and_verify(path: Path) -> None:
    with AuditLog.open(path, clock=Clock()) as log:
        decided = log.append(call().decided(ToolDecisionKind.ASK, "policy.toml:3 ask shell *"))
        approved = log.append(call().approval("1a2b3c4d", ApprovalStatus.APPROVED, ttl_s=3600, uses=2))
        envelope = ToolEnvelope(
            ok=True, content="x" * 10, truncated=True, truncated_reason=TruncationReason.OUTPUT_CAP,
            exit_code=0, duration_ms=12.5,
        )  # fmt: skip
        executed = log.append(call().executed(envelope))
        head = log.head
    assert [r.seq for r in (decided, approved, executed)] == [1, 2, 3]
    assert [r.kind for r in (decided, approved, executed)] == [AuditKind.DECISION, AuditKind.APPROVAL,
                                                                AuditKind.EXECUTION]  # fmt: skip
    assert decided.prev == GENESIS and approved.prev == line_digest(lines(path)[0])
    assert all(r.hash == content_hash(r) for r in (decided, approved, executed))
    assert [decode(line) for line in lines(path)] == [decided, approved, executed]
    assert isinstance(executed, ExecutionRecord)
    assert (executed.output_length, executed.truncated, executed.exit_code) == (10, True, 0)
    assert executed.arguments_length == len(SECRET_ARGS)

    report = verify(path)
    assert report.ok, report.problems
    assert (report.records, report.head, report.notes) == (3, head, ())
    assert head == AuditAnchor(seq=3, head=line_digest(lines(path)[-1]))


def test_lines_are_canonical_and_never_hold_arguments(path: Path) -> None:
    write_log(path, 2)
    text = path.read_bytes()
    assert b"id_ed25519" not in text and b'": ' not in text and b'", "' not in text
    for line in lines(path):
        keys = list(msgspec.json.decode(line))
        assert keys == sorted(keys)


def test_reopening_continues_the_chain(path: Path) -> None:
    first = write_log(path, 3)
    with AuditLog.open(path) as log:
        assert log.head.seq == 3 and log.recovered is None
        record = log.append(call().decided(ToolDecisionKind.DENY, "default"))
    assert record.seq == 4 and record.prev == line_digest(first[-1])
    assert verify(path).ok


def test_the_log_and_anchor_are_private(path: Path) -> None:
    write_log(path, 1)
    assert (path.stat().st_mode & 0o777, anchor_path(path).stat().st_mode & 0o777) == (0o600, 0o600)


def test_a_second_writer_is_refused(path: Path) -> None:
    with AuditLog.open(path), pytest.raises(AuditError, match="held by another process"):
        AuditLog.open(path)


# -- tampering, found where it happened


def test_an_edited_field_is_found_on_its_line(path: Path) -> None:
    original = write_log(path)
    rewrite(
        path, [*original[:2], original[2].replace(b'"decision":"allow"', b'"decision":"deny"'), *original[3:]]
    )
    report = verify(path)
    assert kinds_at(report) == [(ProblemKind.EDITED, 3), (ProblemKind.CHAIN_BROKEN, 4)]
    assert report.problems[0].seq == 3
    assert report.problems[0].describe().startswith("line 3, seq 3: edited:")


def test_an_edit_with_its_hash_recomputed_is_found_by_the_next_line(path: Path) -> None:
    original = write_log(path)
    forged = reseal(original[2], original[1], decision=ToolDecisionKind.DENY)
    rewrite(path, [*original[:2], forged, *original[3:]])
    report = verify(path)
    assert kinds_at(report) == [(ProblemKind.CHAIN_BROKEN, 4)]
    assert "line 3" in report.problems[0].detail


def test_a_reformatted_line_is_not_canonical(path: Path) -> None:
    original = write_log(path)
    rewrite(path, [*original[:2], original[2].replace(b'","', b'", "'), *original[3:]])
    assert kinds_at(verify(path)) == [(ProblemKind.NOT_CANONICAL, 3), (ProblemKind.CHAIN_BROKEN, 4)]


def test_a_dropped_record_is_found_where_it_is_missing(path: Path) -> None:
    original = write_log(path)
    rewrite(path, [*original[:2], *original[3:]])
    report = verify(path)
    assert kinds_at(report) == [(ProblemKind.CHAIN_BROKEN, 3), (ProblemKind.MISSING, 3)]
    assert "seq 3 missing" in report.problems[1].detail


def test_an_inserted_record_is_found(path: Path) -> None:
    original = write_log(path)
    forged = reseal(original[2], original[1], call_id="forged")  # a well-formed seq 3, chained on line 2
    rewrite(path, [*original[:2], forged, *original[2:]])
    report = verify(path)
    assert kinds_at(report) == [(ProblemKind.CHAIN_BROKEN, 4), (ProblemKind.DUPLICATE, 4)]
    assert "also at line 3" in report.problems[1].detail


def test_swapped_records_are_found(path: Path) -> None:
    original = write_log(path)
    rewrite(path, [*original[:2], original[3], original[2], *original[4:]])
    report = verify(path)
    assert kinds_at(report) == [
        (ProblemKind.CHAIN_BROKEN, 3), (ProblemKind.REORDERED, 3), (ProblemKind.CHAIN_BROKEN, 4),
        (ProblemKind.REORDERED, 4), (ProblemKind.CHAIN_BROKEN, 5),
    ]  # fmt: skip
    assert "seq 3 was due here (it is at line 4)" in report.problems[1].detail


def test_records_removed_from_the_front_are_found(path: Path) -> None:
    original = write_log(path)
    rewrite(path, original[1:])
    assert kinds_at(verify(path)) == [(ProblemKind.CHAIN_BROKEN, 1), (ProblemKind.MISSING, 1)]


def test_a_cut_inside_the_last_line_is_found_and_blocks_opening(path: Path) -> None:
    original = write_log(path)
    path.write_bytes(path.read_bytes()[: -len(original[-1]) // 2])
    report = verify(path)
    assert kinds_at(report) == [(ProblemKind.TORN, 6), (ProblemKind.ANCHOR, None)]
    assert "cut from the end" in report.problems[1].detail
    with pytest.raises(AuditError, match="ends at seq 5 but its anchor says seq 6"):
        AuditLog.open(path)


def test_records_cut_from_the_end_are_found_by_the_anchor(path: Path) -> None:
    original = write_log(path)
    rewrite(path, original[:4])
    report = verify(path)
    assert kinds_at(report) == [(ProblemKind.ANCHOR, None)]
    assert "anchor is at seq 6 but the log ends at seq 4" in report.problems[0].detail
    with pytest.raises(AuditError, match="dropped or rewritten"):
        AuditLog.open(path)


def test_a_chain_rewritten_from_the_middle_is_found_only_by_the_anchor(path: Path) -> None:
    original = write_log(path)
    forged = original[:2]
    for line in original[2:]:  # a consistent chain: every hash and prev recomputed
        forged.append(reseal(line, forged[-1], rule="rewritten"))
    rewrite(path, forged)
    report = verify(path)
    assert kinds_at(report) == [(ProblemKind.ANCHOR, 6)]
    assert "rewritten from seq 6 or earlier" in report.problems[0].detail
    with pytest.raises(AuditError):
        AuditLog.open(path)


def test_rewriting_the_anchor_too_is_caught_only_by_a_head_kept_elsewhere(path: Path) -> None:
    original = write_log(path)
    kept = verify(path).head  # e.g. noted by the user or copied off the machine
    forged = original[:2]
    for line in original[2:]:
        forged.append(reseal(line, forged[-1], rule="rewritten"))
    rewrite(path, forged)
    anchor_path(path).write_bytes(msgspec.json.encode(AuditAnchor(seq=6, head=line_digest(forged[-1]))))
    assert verify(path).ok  # the limit of anything stored beside the log
    report = verify(path, expected=kept)
    assert kinds_at(report) == [(ProblemKind.ANCHOR, 6)]
    assert "the expected head" in report.problems[0].detail


def test_a_missing_anchor_is_a_problem_and_blocks_opening(path: Path) -> None:
    write_log(path)
    anchor_path(path).unlink()
    assert kinds_at(verify(path)) == [(ProblemKind.ANCHOR, None)]
    with pytest.raises(AuditError, match="anchor says nothing"):
        AuditLog.open(path)


def test_a_line_that_is_not_a_record_is_malformed(path: Path) -> None:
    original = write_log(path)
    rewrite(path, [*original[:2], b"hello", *original[2:]])
    assert kinds_at(verify(path)) == [
        (ProblemKind.MALFORMED, 3), (ProblemKind.CHAIN_BROKEN, 4)
    ]  # fmt: skip


def test_an_absent_log_verifies_as_empty(path: Path) -> None:
    report = verify(path)
    assert report.ok and report.records == 0 and report.head.seq == 0


# -- crashes


def test_a_torn_write_is_quarantined_at_open_never_chained_over(path: Path) -> None:
    write_log(path, 3)
    torn = b'{"arguments_length":3,"argum'  # a crash mid-append: no newline, anchor not yet moved
    with path.open("ab") as handle:
        handle.write(torn)
    assert kinds_at(verify(path)) == [(ProblemKind.TORN, 4)]

    with AuditLog.open(path) as log:
        assert log.recovered == audit.QuarantinedTail(
            after_seq=3, length=len(torn), quarantine=str(quarantine_path(path))
        )
        assert log.append(call().decided(ToolDecisionKind.DENY, "default")).seq == 4
    assert quarantine_path(path).read_bytes() == torn + b"\n"
    report = verify(path)
    assert report.ok and report.records == 4
    assert "interrupted writes" in report.notes[0]


def test_a_crash_between_record_and_anchor_is_caught_up(path: Path) -> None:
    original = write_log(path, 3)
    behind = AuditAnchor(seq=2, head=line_digest(original[1]))
    anchor_path(path).write_bytes(msgspec.json.encode(behind))
    report = verify(path)
    assert report.ok and "seq 3 is not anchored yet" in report.notes[0]
    with AuditLog.open(path) as log:
        assert log.head.seq == 3
    assert verify(path).notes == ()


def test_records_appended_past_the_anchor_are_found(path: Path) -> None:
    original = write_log(path, 4)
    anchor_path(path).write_bytes(msgspec.json.encode(AuditAnchor(seq=2, head=line_digest(original[1]))))
    report = verify(path)
    assert kinds_at(report) == [(ProblemKind.ANCHOR, None)]
    assert "seqs 3-4 are not anchored" in report.problems[0].detail
    with pytest.raises(AuditError, match="ends at seq 4 but its anchor says seq 2"):
        AuditLog.open(path)


# -- a full disk


def test_a_failed_write_records_nothing_and_says_so(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_log(path, 2)
    before = path.read_bytes()
    real_write = os.write
    calls = []

    def half_then_full(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with AuditLog.open(path) as log:
        monkeypatch.setattr(audit.os, "write", half_then_full)
        with pytest.raises(AuditError, match="nothing was recorded, so the tool call must not run") as failed:
            log.append(call().decided(ToolDecisionKind.ALLOW, "rule 1"))
        monkeypatch.undo()
        assert isinstance(failed.value, SupervisorError) and failed.value.code is ErrorCode.INTERNAL
        assert "No space left on device" in failed.value.message
        assert path.read_bytes() == before and log.head.seq == 2
        assert log.append(call().decided(ToolDecisionKind.ALLOW, "rule 1")).seq == 3  # space came back
    assert verify(path).ok


@pytest.mark.e2e
def test_a_real_file_size_limit_records_nothing_and_leaves_a_valid_log(path: Path) -> None:
    """RLIMIT_FSIZE makes the kernel cut a write short and then refuse, as a full disk does."""
    write_log(path, 2)
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        from pathlib import Path
        from bastion.protocol.agent_events import ToolDecisionKind
        from bastion.supervisor.trust.audit import AuditedCall, AuditError, AuditLog
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        path = Path({str(path)!r})
        limit = path.stat().st_size + 700  # room for about one more record
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        call = AuditedCall(session="s", request_id="r", call_id="c", tool="shell", arguments="{{}}",
                           policy_hash="p", sandbox_level=None)
        with AuditLog.open(path) as log:
            try:
                for _ in range(10):
                    log.append(call.decided(ToolDecisionKind.ALLOW, "rule"))
            except AuditError as exc:
                print(log.head.seq, exc.message)
                sys.exit(0)
        sys.exit("never failed")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seq, message = done.stdout.split(" ", 1)
    assert "nothing was recorded" in message and "File too large" in message
    report = verify(path)
    assert report.ok, report.problems
    assert report.head.seq == int(seq) == report.records


def test_a_closed_log_refuses_to_record(path: Path) -> None:
    log = AuditLog.open(path)
    log.close()
    with pytest.raises(AuditError, match="nothing was recorded: the audit log .* is closed"):
        log.append(call().decided(ToolDecisionKind.ALLOW, "rule 1"))


# -- what durability costs


def mean_append_ms(path: Path, records: int) -> float:
    record = call().decided(ToolDecisionKind.ALLOW, "rule 1")
    with AuditLog.open(path) as log:
        started = time.perf_counter()
        for _ in range(records):
            log.append(record)
        return (time.perf_counter() - started) * 1000 / records


def test_the_cost_of_an_fsync_per_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced = mean_append_ms(tmp_path / "synced.jsonl", 200)
    no_sync: Callable[[int], None] = lambda fd: None  # noqa: E731
    monkeypatch.setattr(audit.os, "fdatasync", no_sync)
    unsynced = mean_append_ms(tmp_path / "unsynced.jsonl", 200)
    print(f"\naudit append: {synced:.3f} ms with fdatasync (log + anchor), {unsynced:.3f} ms without")
    # Generous: a tool call costs a process launch (milliseconds) anyway.
    assert synced < 50
    assert verify(tmp_path / "synced.jsonl").ok


def test_decoding_rejects_an_unknown_kind() -> None:
    with pytest.raises(msgspec.ValidationError):
        decode(b'{"kind":"gossip"}')
    assert DecisionRecord.__struct_config__.tag == AuditKind.DECISION.value
