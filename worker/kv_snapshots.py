"""Per-session KV snapshots: in RAM under a byte cap, spilled to disk.

`SnapshotStore` keeps, for each session a worker has served, the KV state it
held at the session's last turn boundary: the engine's serialised sequence
and the tokens it covers. RAM holds the most recently used ones up to
`ram_bytes` (least recently used leave first); every snapshot is also written
to `disk_dir` by a background thread, so that a restarted worker, or one
that went idle and was unloaded, can restore a session instead of reading it
again from the top. Disk is capped too (`disk_bytes`, oldest files go).

A snapshot on disk is one file: a fixed prefix (magic, header length), a
msgpack header (model fingerprint, state layout, tokens, payload length and
CRC-32), then the payload. One that was made for another model file or under
another layout (context size, cache types, llama.cpp version), or that fails
its checks, is deleted and reported as a note; it is never restored.

Thread use: the engine thread calls everything except the writer's loop;
counters are plain ints the IO thread may read for heartbeats.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

from bastion.worker.engine import common_prefix_length

log = logging.getLogger(__name__)

_MAGIC = b"BASTIONKV1\n"
_PREFIX = struct.Struct("<I")  # header length
_MAX_HEADER = 4 * 1024 * 1024
_SUFFIX = ".kv"
_FINGERPRINT_SPAN = 1024 * 1024
_STALE_TEMPORARY_S = 600.0


class SnapshotHeader(msgspec.Struct, frozen=True, kw_only=True):
    model: str  # fingerprint of the model file
    layout: str  # the engine's state layout
    session: str
    tokens: list[int]
    payload_bytes: int
    crc32: int  # of the tokens and the payload (_checksum)
    saved_at: float


@dataclass(frozen=True)
class Snapshot:
    session: str
    tokens: tuple[int, ...]
    data: bytes


@dataclass(frozen=True)
class Lookup:
    """What `SnapshotStore.tokens_of` found: the tokens a snapshot covers and
    where it lives, or a note saying why an unusable one was discarded."""

    tokens: tuple[int, ...] | None
    on_disk_only: bool = False
    note: str = ""


def model_fingerprint(path: str) -> str:
    """Identifies a model file's content cheaply: its size and hashes of its
    first and last MiB (a GGUF's header and tensor layout live at the start,
    so a different model or quantisation differs there)."""
    size = os.path.getsize(path)
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        digest.update(f.read(_FINGERPRINT_SPAN))
        if size > 2 * _FINGERPRINT_SPAN:
            f.seek(size - _FINGERPRINT_SPAN)
            digest.update(f.read(_FINGERPRINT_SPAN))
    return digest.hexdigest()


class SnapshotStore:
    def __init__(
        self,
        *,
        model: str,
        layout: str,
        ram_bytes: int,
        disk_dir: Path | None = None,
        disk_bytes: int = 0,
    ) -> None:
        self._model = model
        self._layout = layout
        self._ram_cap = ram_bytes
        self._ram: OrderedDict[str, Snapshot] = OrderedDict()
        self.ram_bytes = 0
        self._disk_cap = disk_bytes
        self._dir = disk_dir / model[:16] if disk_dir is not None and disk_bytes > 0 else None
        self._disk_sizes: dict[str, int] = {}  # file name -> bytes
        # file name -> (session, tokens) of the usable snapshots on disk, for prefix lookups
        self._disk_tokens: dict[str, tuple[str, tuple[int, ...]]] = {}
        self.disk_bytes = 0
        self._disk_lock = threading.Lock()  # the writer and the engine thread both account
        self._pending: dict[str, Snapshot] = {}
        self._cond = threading.Condition()
        self._closing = False
        self._writer: threading.Thread | None = None
        if self._dir is not None:
            try:
                self._dir.mkdir(parents=True, exist_ok=True)
                self._scan_disk()
            except OSError as exc:
                log.warning("KV snapshots stay in RAM: cannot use %s (%s)", self._dir, exc.strerror or exc)
                self._dir = None
        if self._dir is not None:
            self._writer = threading.Thread(target=self._write_loop, name="kv-snapshot-writer", daemon=True)
            self._writer.start()

    # --- counters -----------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self._ram_cap > 0 or self._dir is not None

    @property
    def ram_count(self) -> int:
        return len(self._ram)

    @property
    def disk_count(self) -> int:
        return len(self._disk_sizes)

    # --- the engine thread's calls -----------------------------------------

    def put(self, session: str, tokens: Sequence[int], data: bytes, *, durable: bool = False) -> None:
        """Keep `data` as `session`'s latest snapshot: in RAM, and on disk —
        written behind by the writer thread, or before returning when
        `durable` (a turn's end: a worker killed right after it must still
        find that turn on disk; the page cache outlives the process)."""
        snapshot = Snapshot(session=session, tokens=tuple(tokens), data=data)
        self._drop_ram(session)
        if 0 < len(data) <= self._ram_cap:
            self._ram[session] = snapshot
            self.ram_bytes += len(data)
            self._evict_ram()
        if self._dir is None:
            return
        with self._cond:
            if not durable:
                self._pending[session] = snapshot
                self._cond.notify()
                return
            # An older write of this session must not land after this one.
            self._pending.pop(session, None)
            while self._writing(session):
                self._cond.wait()
        try:
            self._write(snapshot)
        except Exception:  # a failed write must never fail the turn
            log.exception("writing the KV snapshot of %r failed", session)

    def tokens_of(self, session: str) -> Lookup:
        """The tokens `session`'s snapshot covers, without reading its payload."""
        held = self._ram.get(session)
        if held is not None:
            return Lookup(tokens=held.tokens)
        pending = self._pending_for(session)
        if pending is not None:
            return Lookup(tokens=pending.tokens)
        path = self._path(session)
        if path is None or not path.exists():
            return Lookup(tokens=None)
        try:
            header, _offset = self._read_header(path)
        except _Unusable as exc:
            return Lookup(tokens=None, note=self._discard(path, str(exc)))
        except OSError as exc:
            return Lookup(tokens=None, note=f"KV snapshot unreadable ({exc.strerror or exc}); prefilled instead")
        problem = self._mismatch(header, session)
        if problem:
            return Lookup(tokens=None, note=self._discard(path, problem))
        return Lookup(tokens=tuple(header.tokens), on_disk_only=True)

    def longest_prefix(self, tokens: Sequence[int], at_least: int = 1) -> tuple[str, tuple[int, ...], int] | None:
        """Of every snapshot held (RAM, waiting to be written, on disk), the one whose tokens share
        the longest exact prefix with `tokens`, whatever its session: (session, its tokens, shared
        length); None when none shares `at_least` tokens. It runs before most prefills, so the
        snapshots that cannot reach `at_least` are ruled out by one slice comparison each."""
        wanted = tuple(tokens)
        floor = max(at_least, 1)
        with self._cond:
            held = [(s.session, s.tokens) for s in (*self._ram.values(), *self._pending.values())]
            if self._in_flight is not None:
                held.append((self._in_flight.session, self._in_flight.tokens))
        with self._disk_lock:
            held += self._disk_tokens.values()
        best: tuple[str, tuple[int, ...], int] | None = None
        for session, held_tokens in held:
            if held_tokens[:floor] != wanted[:floor] or len(held_tokens) < floor:
                continue
            shared = floor + common_prefix_length(held_tokens[floor:], wanted[floor:])
            if best is None or shared > best[2]:
                best = (session, held_tokens, shared)
        return best

    def load(self, session: str) -> tuple[Snapshot | None, bool, str]:
        """(snapshot, came from disk, note). RAM first; a disk snapshot is
        checked whole before it is returned and is then kept in RAM too."""
        held = self._ram.get(session)
        if held is not None:
            self._ram.move_to_end(session)
            return held, False, ""
        pending = self._pending_for(session)
        if pending is not None:
            return pending, False, ""
        path = self._path(session)
        if path is None or not path.exists():
            return None, False, ""
        try:
            snapshot = self._read(path, session)
        except _Unusable as exc:
            return None, True, self._discard(path, str(exc))
        except OSError as exc:
            return None, True, f"KV snapshot unreadable ({exc.strerror or exc}); prefilled instead"
        if 0 < len(snapshot.data) <= self._ram_cap:
            self._ram[session] = snapshot
            self.ram_bytes += len(snapshot.data)
            self._evict_ram()
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: the last to go when the disk cap bites
        return snapshot, True, ""

    def discard(self, session: str, reason: str) -> str:
        """Forget `session`'s snapshot everywhere (the engine refused it)."""
        self._drop_ram(session)
        with self._cond:
            self._pending.pop(session, None)
            while self._writing(session):  # else its rename would bring the file back
                self._cond.wait()
        path = self._path(session)
        return self._discard(path, reason) if path is not None else f"KV snapshot discarded: {reason}"

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every snapshot put so far is on disk; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._in_flight is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Finish pending writes (a clean exit keeps every turn), then stop the writer."""
        if self._writer is None:
            return
        self.flush(timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._writer.join(timeout)

    # --- RAM ------------------------------------------------------------------

    def _drop_ram(self, session: str) -> None:
        old = self._ram.pop(session, None)
        if old is not None:
            self.ram_bytes -= len(old.data)

    def _evict_ram(self) -> None:
        while self.ram_bytes > self._ram_cap and self._ram:
            session, old = self._ram.popitem(last=False)
            self.ram_bytes -= len(old.data)
            log.info("KV snapshot of %r left RAM (%d bytes)%s", session, len(old.data),
                     "; it stays on disk" if self._dir is not None else "")

    def _pending_for(self, session: str) -> Snapshot | None:
        """A snapshot not yet on disk: queued, or being written right now
        (so a lookup never falls back to an older file in between)."""
        with self._cond:
            pending = self._pending.get(session)
            return self._in_flight if pending is None and self._writing(session) else pending

    def _writing(self, session: str) -> bool:
        """Whether the writer thread is writing `session` now (hold `_cond`)."""
        return self._in_flight is not None and self._in_flight.session == session

    # --- disk -----------------------------------------------------------------

    _in_flight: Snapshot | None = None  # what the writer thread is writing now

    def _path(self, session: str) -> Path | None:
        if self._dir is None:
            return None
        name = hashlib.blake2b(session.encode(), digest_size=16).hexdigest()
        return self._dir / f"{name}{_SUFFIX}"

    def _scan_disk(self) -> None:
        assert self._dir is not None
        for entry in self._dir.iterdir():
            if entry.suffix == _SUFFIX and entry.is_file():
                self._disk_sizes[entry.name] = entry.stat().st_size
                self._index_tokens(entry)
            elif entry.name.endswith(".tmp") and time.time() - _mtime(entry) > _STALE_TEMPORARY_S:
                # A write cut short by a crash; a recent one may be another
                # worker's (two models on one file) still writing.
                entry.unlink(missing_ok=True)
        self.disk_bytes = sum(self._disk_sizes.values())

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                session = next(iter(self._pending))
                snapshot = self._pending.pop(session)
                self._in_flight = snapshot
            try:
                self._write(snapshot)
            except Exception:  # a failed write must never stop the worker
                log.exception("writing the KV snapshot of %r failed", session)
            finally:
                with self._cond:
                    self._in_flight = None
                    self._cond.notify_all()

    def _write(self, snapshot: Snapshot) -> None:
        path = self._path(snapshot.session)
        assert path is not None
        if len(snapshot.data) + 65536 > self._disk_cap:
            return
        header = msgspec.msgpack.encode(
            SnapshotHeader(
                model=self._model,
                layout=self._layout,
                session=snapshot.session,
                tokens=list(snapshot.tokens),
                payload_bytes=len(snapshot.data),
                crc32=_checksum(snapshot.tokens, snapshot.data),
                saved_at=time.time(),
            )
        )
        # Named per thread: the writer and a durable put may write at once.
        temporary = path.with_name(f"{path.name}.{threading.get_ident()}.tmp")
        try:
            with open(temporary, "wb") as f:
                f.write(_MAGIC)
                f.write(_PREFIX.pack(len(header)))
                f.write(header)
                f.write(snapshot.data)
            # Renamed and counted in one step, so the other thread's cap
            # enforcement never deletes a file it has not seen counted.
            with self._disk_lock:
                os.replace(temporary, path)
                size = path.stat().st_size
                self.disk_bytes += size - self._disk_sizes.get(path.name, 0)
                self._disk_sizes[path.name] = size
                self._disk_tokens[path.name] = (snapshot.session, snapshot.tokens)
                self._enforce_disk_cap(keep=path.name)
        except OSError as exc:
            # A full or failing disk costs the spill, never the session or the worker.
            temporary.unlink(missing_ok=True)
            log.warning("KV snapshot of %r not written to %s: %s", snapshot.session, path.parent,
                        exc.strerror or exc)

    def _enforce_disk_cap(self, keep: str) -> None:
        if self.disk_bytes <= self._disk_cap:
            return
        assert self._dir is not None
        by_age = sorted(
            (name for name in self._disk_sizes if name != keep),
            key=lambda name: _mtime(self._dir / name),  # type: ignore[operator]
        )
        for name in by_age:
            if self.disk_bytes <= self._disk_cap:
                return
            (self._dir / name).unlink(missing_ok=True)
            self.disk_bytes -= self._disk_sizes.pop(name)
            self._disk_tokens.pop(name, None)

    def _index_tokens(self, path: Path) -> None:
        """Remember which tokens a snapshot file covers (its header only), if this store could
        restore it; a file that is not, or is for another model or layout, is left for the
        session-name lookup to judge and discard."""
        try:
            header, _offset = self._read_header(path)
        except (_Unusable, OSError):
            return
        if header.model == self._model and header.layout == self._layout:
            self._disk_tokens[path.name] = (header.session, tuple(header.tokens))

    def _read_header(self, path: Path) -> tuple[SnapshotHeader, int]:
        with open(path, "rb") as f:
            start = f.read(len(_MAGIC) + _PREFIX.size)
            if len(start) < len(_MAGIC) + _PREFIX.size or not start.startswith(_MAGIC):
                raise _Unusable("not a bastion KV snapshot")
            (length,) = _PREFIX.unpack(start[len(_MAGIC) :])
            if length > _MAX_HEADER:
                raise _Unusable("its header is corrupt")
            raw = f.read(length)
        try:
            header = msgspec.msgpack.decode(raw, type=SnapshotHeader)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise _Unusable("its header is corrupt") from None
        return header, len(start) + length

    def _mismatch(self, header: SnapshotHeader, session: str) -> str:
        if header.model != self._model:
            return "it was made with another model file"
        if header.layout != self._layout:
            return f"it was made with other context settings ({header.layout}; now {self._layout})"
        if header.session != session:
            return "it belongs to another session"
        return ""

    def _read(self, path: Path, session: str) -> Snapshot:
        header, offset = self._read_header(path)
        problem = self._mismatch(header, session)
        if problem:
            raise _Unusable(problem)
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(header.payload_bytes + 1)
        if len(data) != header.payload_bytes:
            raise _Unusable("it is truncated")
        if _checksum(header.tokens, data) != header.crc32:
            raise _Unusable("its checksum does not match (corrupt)")
        return Snapshot(session=session, tokens=tuple(header.tokens), data=data)

    def _discard(self, path: Path, reason: str) -> str:
        note = f"KV snapshot discarded: {reason}; prefilled instead"
        log.warning("%s (%s)", note, path)
        with contextlib.suppress(OSError):
            path.unlink()
        with self._disk_lock:
            self.disk_bytes -= self._disk_sizes.pop(path.name, 0)
            self._disk_tokens.pop(path.name, None)
        return note


class _Unusable(Exception):
    pass


def _checksum(tokens: Sequence[int], data: bytes) -> int:
    """CRC-32 of the tokens and the payload: a token id damaged in the header
    would label the state with the wrong text as surely as damaged KV bytes."""
    return zlib.crc32(data, zlib.crc32(struct.pack(f"<{len(tokens)}i", *tokens)))


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
