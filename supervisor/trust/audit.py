"""The audit log: an append-only, hash-chained record of every tool gate
decision, execution and approval (`audit_verify.verify` checks it).

Owns the log file (`HomeLayout.audit_log`, JSON lines), its anchor beside it
(`<log>.anchor`) and the quarantine for torn writes (`<log>.torn`). It decides
nothing and runs nothing: the gate decides, the sandbox runs, this writes down.
Arguments and outputs are never stored, only their sha256 and length.

The contract: no execution without its audit record. `append` returns once the
record is on disk (fdatasync); when it raises `AuditError`, nothing was recorded
and the caller must not run the tool (the call fails instead).

Format: one record per line, its canonical encoding (keys sorted, no whitespace).
`kind` (decision | execution | approval) is the tag; `seq` counts from 1 without
gaps; `prev` is the sha256 of the previous line's bytes (newline excluded), or
GENESIS for seq 1; `hash` is the sha256 of the record's canonical encoding
without `hash`. See `AuditRecord` and its subclasses for the fields.

The anchor holds the chain head (last seq and the sha256 of its line), written
after each record. The chain alone shows any edit, drop, insertion or move
inside the log, but not records cut from its end, nor a log rewritten from
some record on with the hashes recomputed; the anchor shows those, as long as
whoever rewrote the log did not rewrite the anchor too. Both sit in the
bastion home, so they stop a sandboxed tool (which cannot reach the home),
accidents and careless edits, not someone with the user's rights: against
that, keep a copy of a verified head elsewhere and pass it as `expected`.

One writer, the supervisor: `AuditLog.open` takes an exclusive flock. A crash
mid-append leaves a line without its newline; the next open moves it to the
quarantine and reports it in `recovered` rather than chain over it (its call
never ran: `append` had not returned).
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict, TypeVar, cast

import msgspec

from bastion.protocol.agent_events import ToolDecisionKind
from bastion.protocol.sandbox_wire import ConfinementLevel, ToolEnvelope, TruncationReason
from bastion.supervisor.errors import AuditError
from bastion.supervisor.trust.approvals import ApprovalStatus

GENESIS = "0" * 64
_ANCHOR_SIZE = 128  # fixed, so an update is one small in-place write
_ENCODER = msgspec.json.Encoder(order="sorted")


class AuditKind(enum.Enum):
    DECISION = "decision"
    EXECUTION = "execution"
    APPROVAL = "approval"


class AuditRecord(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """Fields of every record. `append` sets seq, time, prev and hash; leave them at their defaults."""

    session: str
    request_id: str
    call_id: str
    tool: str
    arguments_sha256: str  # of the canonical arguments JSON, UTF-8
    arguments_length: int  # bytes
    policy_hash: str
    sandbox_level: ConfinementLevel | None  # in force when the record was made; None: no sandbox yet
    seq: int = 0
    time: float = 0.0
    prev: str = ""
    hash: str = ""

    @property
    def kind(self) -> AuditKind:
        return AuditKind(self.__struct_config__.tag)


class DecisionRecord(AuditRecord, frozen=True, tag="decision"):
    decision: ToolDecisionKind
    rule: str  # where the decision came from: a policy rule, a default, a grant


class ExecutionRecord(AuditRecord, frozen=True, tag="execution"):
    ok: bool
    exit_code: int | None  # the shell's
    duration_ms: float
    output_sha256: str  # of the content the model was shown, UTF-8
    output_length: int
    truncated: bool
    truncated_reason: TruncationReason | None = None


class ApprovalRecord(AuditRecord, frozen=True, tag="approval"):
    approval_id: str
    status: ApprovalStatus  # approved, denied or expired
    ttl_s: float | None = None  # the grant's terms, when approved
    uses: int | None = None


AnyRecord = DecisionRecord | ExecutionRecord | ApprovalRecord
R = TypeVar("R", DecisionRecord, ExecutionRecord, ApprovalRecord)
_DECODER = msgspec.json.Decoder(AnyRecord)


class _CommonFields(TypedDict):
    """The AuditRecord fields that AuditedCall fills in."""

    session: str
    request_id: str
    call_id: str
    tool: str
    arguments_sha256: str
    arguments_length: int
    policy_hash: str
    sandbox_level: ConfinementLevel | None


class AuditedCall(msgspec.Struct, frozen=True, kw_only=True):
    """What every record says about a call; builds the records. `arguments` is hashed, never kept."""

    session: str
    request_id: str
    call_id: str
    tool: str
    arguments: str  # canonical JSON
    policy_hash: str
    sandbox_level: ConfinementLevel | None

    def decided(self, decision: ToolDecisionKind, rule: str) -> DecisionRecord:
        return DecisionRecord(decision=decision, rule=rule, **self._common())

    def executed(self, envelope: ToolEnvelope) -> ExecutionRecord:
        output = envelope.content.encode()
        return ExecutionRecord(
            ok=envelope.ok, exit_code=envelope.exit_code, duration_ms=envelope.duration_ms,
            output_sha256=hashlib.sha256(output).hexdigest(), output_length=len(output),
            truncated=envelope.truncated, truncated_reason=envelope.truncated_reason, **self._common(),
        )  # fmt: skip

    def approval(
        self, approval_id: str, status: ApprovalStatus, *, ttl_s: float | None = None, uses: int | None = None
    ) -> ApprovalRecord:
        return ApprovalRecord(
            approval_id=approval_id, status=status, ttl_s=ttl_s, uses=uses, **self._common()
        )

    def _common(self) -> _CommonFields:
        arguments = self.arguments.encode()
        return _CommonFields(
            session=self.session, request_id=self.request_id, call_id=self.call_id, tool=self.tool,
            arguments_sha256=hashlib.sha256(arguments).hexdigest(), arguments_length=len(arguments),
            policy_hash=self.policy_hash, sandbox_level=self.sandbox_level,
        )  # fmt: skip


class AuditAnchor(msgspec.Struct, frozen=True, kw_only=True):
    """A chain head: a record's seq and the sha256 of its line (the next record's `prev`)."""

    seq: int
    head: str


EMPTY = AuditAnchor(seq=0, head=GENESIS)


class QuarantinedTail(msgspec.Struct, frozen=True, kw_only=True):
    """An incomplete last line found at open, moved out of the log."""

    after_seq: int  # the last complete record before it
    length: int  # bytes moved
    quarantine: str


def anchor_path(log: Path) -> Path:
    return log.with_name(log.name + ".anchor")


def quarantine_path(log: Path) -> Path:
    return log.with_name(log.name + ".torn")


def seal(record: R, anchor: AuditAnchor, now: float) -> R:
    """`record` as the record after `anchor`: numbered, timed, chained and hashed."""
    unsealed = msgspec.structs.replace(record, seq=anchor.seq + 1, time=now, prev=anchor.head, hash="")
    # Through JSON and back, so it is what its line decodes to (an int given for a float field is not).
    unsealed = cast(R, _DECODER.decode(_ENCODER.encode(unsealed)))
    return msgspec.structs.replace(unsealed, hash=content_hash(unsealed))


def content_hash(record: AuditRecord) -> str:
    content = msgspec.to_builtins(record)
    del content["hash"]
    return hashlib.sha256(_ENCODER.encode(content)).hexdigest()


def encode(record: AuditRecord) -> bytes:
    """The record's line, without its newline."""
    return _ENCODER.encode(record)


def decode(line: bytes) -> AnyRecord:
    return _DECODER.decode(line)


def line_digest(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


class AuditLog:
    """The open log, appended to by its only writer. Use from one thread."""

    def __init__(
        self, path: Path, fd: int, anchor_fd: int, head: AuditAnchor, clock: Callable[[], float]
    ) -> None:
        self.path = path
        self._fd = fd
        self._anchor_fd = anchor_fd
        self._head = head
        self._size = os.fstat(fd).st_size
        self._clock = clock
        self._broken = ""  # why appends are refused after a write that could not be undone
        self.recovered: QuarantinedTail | None = None

    @classmethod
    def open(cls, path: Path, *, clock: Callable[[], float] = time.time) -> AuditLog:
        """Open (creating it, private) the log at `path`, after checking its tail against the anchor.

        Raises AuditError when another process holds the log, or when the log
        does not end where its anchor says (records dropped or rewritten): run
        `verify`, and move both files aside to start a new log.
        """
        fds: list[int] = []
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fds.append(os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600))
            fcntl.flock(fds[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
            fds.append(os.open(anchor_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            _sync_dir(path.parent)
            moved = _quarantine_torn_tail(fds[0], path)
            head = _check_head(fds[0], fds[1], path)
            log = cls(path, fds[0], fds[1], head, clock)
        except BlockingIOError as exc:
            _close(fds)
            raise AuditError(
                f"the audit log {path} is held by another process (a second supervisor?)"
            ) from exc
        except OSError as exc:
            _close(fds)
            raise AuditError(f"cannot open the audit log {path}: {exc.strerror or exc}") from exc
        except BaseException:
            _close(fds)
            raise
        if moved:
            log.recovered = QuarantinedTail(
                after_seq=head.seq, length=moved, quarantine=str(quarantine_path(path))
            )
        return log

    @property
    def head(self) -> AuditAnchor:
        return self._head

    def append(self, record: R) -> R:
        """Seal `record` after the head and write it durably; return it as written.

        Raises AuditError when it could not be written (disk full, I/O error,
        closed log): then nothing was recorded, and the tool must not run.
        """
        if self._fd < 0 or self._broken:
            raise AuditError(
                f"nothing was recorded: the audit log {self.path} is "
                + (self._broken or "closed")
                + "; the tool call must not run"
            )
        sealed = seal(record, self._head, self._clock())
        line = encode(sealed)
        head = AuditAnchor(seq=sealed.seq, head=line_digest(line))
        try:
            _write_all(self._fd, line + b"\n")
            _datasync(self._fd)
            # After the record: a crash between the two leaves the anchor one
            # behind, which open() accepts and catches up.
            _write_anchor(self._anchor_fd, head)
        except OSError as exc:
            self._undo(exc)
            raise AuditError(
                f"cannot write to the audit log {self.path}: {exc.strerror or exc}; nothing was recorded, so"
                " the tool call must not run" + (f" (and {self._broken})" if self._broken else "")
            ) from exc
        self._head = head
        self._size += len(line) + 1
        return sealed

    def close(self) -> None:
        _close([self._fd, self._anchor_fd])
        self._fd = self._anchor_fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _undo(self, exc: OSError) -> None:
        """Cut a partly written record off again, so a failed append leaves no trace."""
        try:
            os.ftruncate(self._fd, self._size)
            _datasync(self._fd)
            _write_anchor(self._anchor_fd, self._head)
        except OSError as undo_exc:
            self._broken = (
                f"unusable until reopened: a failed write ({exc.strerror}) could not be undone"
                f" ({undo_exc.strerror})"
            )


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _datasync(fd: int) -> None:
    # fdatasync also flushes the new size, which is all an append changes besides data.
    getattr(os, "fdatasync", os.fsync)(fd)


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _close(fds: list[int]) -> None:
    for fd in fds:
        if fd >= 0:
            os.close(fd)


def _write_anchor(fd: int, anchor: AuditAnchor) -> None:
    text = _encode_anchor(anchor)
    if os.pwrite(fd, text, 0) != len(text):
        raise OSError(0, "short write to the anchor")
    _datasync(fd)


def _encode_anchor(anchor: AuditAnchor) -> bytes:
    return msgspec.json.encode(anchor).ljust(_ANCHOR_SIZE - 1) + b"\n"


def read_anchor(path: Path) -> AuditAnchor | None:
    """The anchor beside the log at `path`; None if there is none yet. Raises msgspec/OS errors."""
    try:
        text = anchor_path(path).read_bytes()
    except FileNotFoundError:
        return None
    return msgspec.json.decode(text, type=AuditAnchor) if text.strip() else None


def _last_lines(fd: int, size: int, count: int) -> list[bytes]:
    """The last `count` (or fewer) lines of a file that ends with a newline, oldest first."""
    window = 8192
    while True:
        start = max(0, size - window)
        lines = os.pread(fd, size - start, start).split(b"\n")[:-1]
        # Past the file's start, the window's first line may be a fragment.
        if start == 0 or len(lines) > count:
            return lines[-count:]
        window *= 4


def _quarantine_torn_tail(fd: int, path: Path) -> int:
    """Move bytes after the last newline to the quarantine file; return how many."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return 0
    window = 4096
    while True:
        start = max(0, size - window)
        cut = os.pread(fd, size - start, start).rfind(b"\n")
        if cut >= 0 or start == 0:
            keep = start + cut + 1  # 0 when the file has no newline at all
            break
        window *= 4
    torn = os.pread(fd, size - keep, keep)
    quarantine = os.open(quarantine_path(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        _write_all(quarantine, torn + b"\n")
        os.fsync(quarantine)
    finally:
        os.close(quarantine)
    os.ftruncate(fd, keep)
    os.fsync(fd)
    return len(torn)


def _check_head(fd: int, anchor_fd: int, path: Path) -> AuditAnchor:
    """The log's head, once it agrees with the anchor (which may be one record behind)."""
    heads = [EMPTY]
    for line in _last_lines(fd, os.fstat(fd).st_size, 2):
        try:
            heads.append(AuditAnchor(seq=decode(line).seq, head=line_digest(line)))
        except msgspec.DecodeError as exc:
            raise AuditError(
                f"the audit log {path} ends in an unreadable record ({exc}): run `bastion audit verify`"
            ) from exc
    head = heads[-1]
    text = os.pread(anchor_fd, _ANCHOR_SIZE, 0)
    try:
        anchor = msgspec.json.decode(text, type=AuditAnchor) if text.strip() else None
    except msgspec.DecodeError as exc:
        raise AuditError(
            f"the audit log's anchor {anchor_path(path)} is unreadable ({exc}): run `bastion audit verify`"
        ) from exc
    if anchor is None and head == EMPTY:
        anchor = EMPTY  # a new log
    if anchor not in heads[-2:]:
        raise AuditError(
            f"the audit log {path} ends at seq {head.seq} but its anchor says "
            + ("nothing" if anchor is None else f"seq {anchor.seq}")
            + ": records were dropped or rewritten. Run `bastion audit verify`; to start a new log, move "
            f"{path.name} and {anchor_path(path).name} aside"
        )
    if anchor != head:
        _write_anchor(anchor_fd, head)
    return head
