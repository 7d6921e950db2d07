"""Checking the audit log: `verify` reads `HomeLayout.audit_log` and reports
every record that was edited, dropped, inserted, moved, torn or not written
canonically, with its line and seq, and checks the chain's head against the
anchor (and against a head kept elsewhere, if given). It only reads.
"""

from __future__ import annotations

import enum
import io
from pathlib import Path
from typing import BinaryIO

import msgspec

from bastion.supervisor.errors import AuditError
from bastion.supervisor.trust.audit import (
    EMPTY,
    GENESIS,
    AnyRecord,
    AuditAnchor,
    anchor_path,
    content_hash,
    decode,
    encode,
    line_digest,
    quarantine_path,
    read_anchor,
)


class ProblemKind(enum.Enum):
    MALFORMED = "malformed"  # a line that is not a record at all
    NOT_CANONICAL = "not_canonical"  # a record's bytes are not its canonical encoding
    EDITED = "edited"  # a record's content does not match its hash
    CHAIN_BROKEN = "chain_broken"  # `prev` is not the digest of the line before
    MISSING = "missing"  # seqs absent: records dropped
    REORDERED = "reordered"  # a seq out of place: records moved
    DUPLICATE = "duplicate"  # a seq seen before: a record inserted or copied
    TORN = "torn"  # the last line has no newline: an interrupted write or a cut
    ANCHOR = "anchor"  # the log's end disagrees with its anchor or the expected head


class AuditProblem(msgspec.Struct, frozen=True, kw_only=True):
    kind: ProblemKind
    line: int | None  # 1-based; None when the problem is the log as a whole
    seq: int | None
    detail: str

    def describe(self) -> str:
        where = ", ".join(
            part
            for part in (self.line and f"line {self.line}", self.seq is not None and f"seq {self.seq}")
            if part
        )
        return f"{where or 'log'}: {self.kind.value}: {self.detail}"


class VerifyReport(msgspec.Struct, frozen=True, kw_only=True):
    path: str
    records: int  # lines that decoded as records
    head: AuditAnchor  # the last record's seq and line digest (to keep elsewhere as `expected`)
    problems: tuple[AuditProblem, ...]
    notes: tuple[str, ...] = ()  # worth knowing, not a sign of tampering

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: Path, *, expected: AuditAnchor | None = None) -> VerifyReport:
    """Check every line of the log at `path`, its chain, its seqs and its anchor; say where each problem is.

    `expected` is a head kept elsewhere (e.g. a past report's `head`): the log
    must still contain that record, unchanged. Run it where no append is under
    way (in the supervisor, on the thread that appends, or with no supervisor):
    a record half written meanwhile would show as torn or unanchored.
    """
    problems: list[AuditProblem] = []
    seq_lines: dict[int, list[int]] = {}
    digests: dict[int, str] = {}
    steps: list[tuple[int, int, int]] = []  # (line, seq, previous seq) where the count did not go on by one
    prev, previous, highest, head = GENESIS, 0, 0, EMPTY
    try:
        handle: BinaryIO = path.open("rb")
    except FileNotFoundError:
        handle = io.BytesIO()
    except OSError as exc:
        raise AuditError(f"cannot read the audit log {path}: {exc.strerror}") from exc
    with handle:
        for number, raw in enumerate(handle, 1):
            if not raw.endswith(b"\n"):
                problems.append(AuditProblem(
                    kind=ProblemKind.TORN, line=number, seq=None,
                    detail=f"the last line is incomplete ({len(raw)} bytes, no newline): a write was interrupted"
                    " or the file was cut",
                ))  # fmt: skip
                break
            line = raw[:-1]
            record = _check_line(number, line, prev, problems)
            prev = line_digest(line)
            if record is None:
                continue
            head = AuditAnchor(seq=record.seq, head=prev)
            seq_lines.setdefault(record.seq, []).append(number)
            digests.setdefault(record.seq, prev)
            if record.seq not in (previous + 1, highest + 1):
                steps.append((number, record.seq, previous))
            previous, highest = record.seq, max(highest, record.seq)
    problems += [_seq_problem(*step, seq_lines) for step in steps]
    problems.sort(key=lambda problem: problem.line or 0)
    notes: list[str] = []
    problems += _anchor_problems(path, digests, seq_lines, highest, expected, notes)
    quarantined = quarantine_path(path)
    if quarantined.exists() and quarantined.stat().st_size:
        notes.append(
            f"{quarantined} holds {quarantined.stat().st_size} bytes of interrupted writes, moved out of the log"
            " when it was reopened (their calls never ran)"
        )
    records = sum(len(found) for found in seq_lines.values())
    return VerifyReport(
        path=str(path), records=records, head=head, problems=tuple(problems), notes=tuple(notes)
    )


def _check_line(number: int, line: bytes, prev: str, problems: list[AuditProblem]) -> AnyRecord | None:
    try:
        record = decode(line)
    except msgspec.DecodeError as exc:
        problems.append(
            AuditProblem(kind=ProblemKind.MALFORMED, line=number, seq=None, detail=f"not a record: {exc}")
        )
        return None

    def problem(kind: ProblemKind, detail: str) -> None:
        problems.append(AuditProblem(kind=kind, line=number, seq=record.seq, detail=detail))

    if encode(record) != line:
        problem(ProblemKind.NOT_CANONICAL, "its bytes are not its canonical encoding: the line was edited")
    if content_hash(record) != record.hash:
        problem(ProblemKind.EDITED, "its content does not match its hash: a field was edited")
    if record.prev != prev and number == 1:
        problem(ProblemKind.CHAIN_BROKEN, "the first record's prev is not the genesis value: records before it"
                " were removed")  # fmt: skip
    elif record.prev != prev:
        problem(
            ProblemKind.CHAIN_BROKEN,
            f"its prev is not the sha256 of line {number - 1}: that line was edited or replaced, or records"
            " were dropped, inserted or moved here",
        )
    return record


def _seq_problem(number: int, seq: int, previous: int, seq_lines: dict[int, list[int]]) -> AuditProblem:
    due = previous + 1
    if seq_lines[seq][0] != number:
        kind, detail = ProblemKind.DUPLICATE, f"seq {seq} is also at line {seq_lines[seq][0]}: a record was"
        detail += " inserted or copied"
    elif seq > due and due not in seq_lines:
        missing = f"seq {due}" if seq == due + 1 else f"seqs {due}-{seq - 1}"
        kind, detail = ProblemKind.MISSING, f"{missing} missing before this line: records were dropped"
    elif seq > due:
        kind, detail = ProblemKind.REORDERED, f"seq {due} was due here (it is at line {seq_lines[due][0]}):"
        detail += " records were moved"
    else:
        kind, detail = ProblemKind.REORDERED, f"seq {seq} comes after seq {previous}: records were moved"
    return AuditProblem(kind=kind, line=number, seq=seq, detail=detail)


def _anchor_problems(
    path: Path, digests: dict[int, str], seq_lines: dict[int, list[int]], highest: int,
    expected: AuditAnchor | None, notes: list[str],
) -> list[AuditProblem]:  # fmt: skip
    def problem(detail: str, seq: int | None = None) -> AuditProblem:
        line = seq_lines[seq][0] if seq in seq_lines else None
        return AuditProblem(kind=ProblemKind.ANCHOR, line=line, seq=seq, detail=detail)

    try:
        anchor = read_anchor(path)
    except (OSError, msgspec.DecodeError) as exc:
        return [problem(f"the anchor {anchor_path(path)} is unreadable ({exc})")]
    found: list[AuditProblem] = []
    if anchor is None and highest:
        found.append(problem(f"there is no anchor {anchor_path(path)}: records cut from the end or a rewritten"
                             " log would go unnoticed"))  # fmt: skip
    # The anchor may trail by one record (a crash between the two writes); a head kept elsewhere, by any.
    checks: list[tuple[str, AuditAnchor, int | None]]
    checks = [("the anchor", anchor, 1)] if anchor is not None else []
    checks += [("the expected head", expected, None)] if expected is not None else []
    for name, head, lag in checks:
        if head.seq > highest:
            found.append(problem(f"{name} is at seq {head.seq} but the log ends at seq {highest}: records were"
                                 " cut from the end", head.seq))  # fmt: skip
        elif digests.get(head.seq, GENESIS) != head.head:
            found.append(problem(f"seq {head.seq} is not the record {name} names: the log was rewritten from"
                                 f" seq {head.seq} or earlier", head.seq))  # fmt: skip
        elif lag is not None and highest - head.seq > lag:
            found.append(problem(f"seqs {head.seq + 1}-{highest} are not anchored: they were appended by"
                                 " something else than bastion, or the anchor was rolled back"))  # fmt: skip
        elif lag is not None and highest > head.seq:
            notes.append(f"seq {highest} is not anchored yet (the writer stopped between writing it and its"
                         " anchor); the next open anchors it")  # fmt: skip
    return found

