"""Reading a GGUF file's metadata in pure Python, without loading the model.

Owns `read_gguf_metadata`: the header, every key/value pair (all GGUF value
types, arrays and strings included) and the tensor directory (names, shapes,
types and offsets), which is what locates the start of the tensor data. It
never reads tensor data: a model's size is the file size minus that offset.

The supervisor uses this to estimate a model's memory before a worker loads
it, so it must not import `llama_cpp` (DESIGN §1). A file that is not a GGUF,
is cut short, or carries impossible lengths or types raises
InvalidModelFileError naming the file and the byte offset, never a struct or
memory error: every length is checked against the bytes the file has left
before anything is allocated for it.

Layout (little-endian), versions 1 to 3:
    magic "GGUF" | version u32 | tensor_count | kv_count      (counts u32 in v1, u64 after)
    kv_count × (key: string, value_type u32, value)
    tensor_count × (name: string, n_dims u32, dims × u64, type u32, offset u64)
    padding to `general.alignment` (default 32), then the tensor data
A string is a length (u32 in v1, u64 after) and UTF-8 bytes; an array is an
element type u32, a count and the elements.
"""

from __future__ import annotations

import enum
import os
import struct
from pathlib import Path
from typing import BinaryIO

import msgspec

from bastion.supervisor.errors import InvalidModelFileError, reading_model_file

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_READ_BLOCK = 1 << 20
# A tensor has at most this many dimensions in ggml (GGML_MAX_DIMS).
_MAX_DIMS = 4

GgufScalar = int | float | bool | str
GgufValue = GgufScalar | list[GgufScalar] | list["GgufValue"]


class GgufType(enum.IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_FIXED: dict[GgufType, struct.Struct] = {
    GgufType.UINT8: struct.Struct("<B"),
    GgufType.INT8: struct.Struct("<b"),
    GgufType.UINT16: struct.Struct("<H"),
    GgufType.INT16: struct.Struct("<h"),
    GgufType.UINT32: struct.Struct("<I"),
    GgufType.INT32: struct.Struct("<i"),
    GgufType.FLOAT32: struct.Struct("<f"),
    GgufType.BOOL: struct.Struct("<?"),
    GgufType.UINT64: struct.Struct("<Q"),
    GgufType.INT64: struct.Struct("<q"),
    GgufType.FLOAT64: struct.Struct("<d"),
}


class GgufTensor(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the tensor data


class GgufMetadata(msgspec.Struct, frozen=True, kw_only=True):
    path: str
    version: int
    file_size: int
    values: dict[str, GgufValue]
    tensors: tuple[GgufTensor, ...]
    # Where the tensor data begins: everything before it is metadata.
    data_offset: int

    @property
    def tensor_data_bytes(self) -> int:
        return self.file_size - self.data_offset

    @property
    def architecture(self) -> str:
        value = self.values.get("general.architecture", "")
        return value if isinstance(value, str) else ""

    def get(self, key: str, default: GgufValue | None = None) -> GgufValue | None:
        return self.values.get(key, default)


def read_gguf_metadata(path: Path) -> GgufMetadata:
    """Everything in `path` but its tensor data; InvalidModelFileError if it is not a sound GGUF."""
    with reading_model_file(path), open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return _Reader(f, path, size).read()


class _Reader:
    """A cursor over the file that reads ahead in blocks and refuses to run past its end."""

    def __init__(self, f: BinaryIO, path: Path, size: int) -> None:
        self._f = f
        self._path = path
        self._size = size
        self._buf = b""
        self._buf_start = 0  # file offset of _buf[0]
        self._pos = 0  # file offset of the next byte to read
        self._version = 0

    def read(self) -> GgufMetadata:
        magic = self._take(4, "the magic")
        if magic != GGUF_MAGIC:
            raise InvalidModelFileError(f"{self._path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        self._version = self._fixed(GgufType.UINT32)
        if self._version not in (1, 2, 3):
            raise InvalidModelFileError(
                f"{self._path}: unsupported GGUF version {self._version} (1 to 3 are known)"
            )
        tensor_count = self._count()
        kv_count = self._count()
        # Each pair takes at least a key length, a type and one byte of value.
        self._check_count(kv_count, 4 + 4 + 1, "key/value pairs")
        values: dict[str, GgufValue] = {}
        for _ in range(kv_count):
            key = self._string()
            values[key] = self._value(self._type())
        self._check_count(tensor_count, 4 + 4 + 8 + 4 + 8, "tensors")
        tensors = tuple(self._tensor() for _ in range(tensor_count))
        alignment = values.get("general.alignment", DEFAULT_ALIGNMENT)
        if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise InvalidModelFileError(
                f"{self._path}: general.alignment {alignment!r} is not a power of two"
            )
        data_offset = -(-self._pos // alignment) * alignment
        if data_offset > self._size:
            raise self._truncated("the tensor data")
        for tensor in tensors:
            if data_offset + tensor.offset > self._size:
                raise InvalidModelFileError(
                    f"{self._path}: tensor {tensor.name!r} starts past the end of the file (truncated?)"
                )
        return GgufMetadata(path=str(self._path), version=self._version, file_size=self._size, values=values,
                            tensors=tensors, data_offset=data_offset)

    # --- values -----------------------------------------------------------

    def _type(self) -> GgufType:
        raw = self._fixed(GgufType.UINT32)
        try:
            return GgufType(raw)
        except ValueError:
            raise InvalidModelFileError(
                f"{self._path}: unknown GGUF value type {raw} at byte {self._pos - 4}"
            ) from None

    def _value(self, kind: GgufType) -> GgufValue:
        if kind is GgufType.STRING:
            return self._string()
        if kind is GgufType.ARRAY:
            return self._array()
        return self._fixed(kind)

    def _array(self) -> list:
        kind = self._type()
        count = self._count()
        if kind in _FIXED:
            layout = _FIXED[kind]
            self._check_count(count, layout.size, "array elements")
            raw = self._take(count * layout.size, "an array")
            return [item[0] for item in layout.iter_unpack(raw)]
        # Strings take at least their length; nested arrays a type and a count.
        self._check_count(count, self._length_size() + (4 if kind is GgufType.ARRAY else 0), "array elements")
        return [self._value(kind) for _ in range(count)]

    def _string(self) -> str:
        length = self._count() if self._version > 1 else self._fixed(GgufType.UINT32)
        self._check_count(length, 1, "string bytes")
        raw = self._take(length, "a string")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            # Vocabularies hold byte tokens that are not valid UTF-8 on their own.
            return raw.decode("utf-8", errors="surrogateescape")

    def _tensor(self) -> GgufTensor:
        name = self._string()
        n_dims = self._fixed(GgufType.UINT32)
        if n_dims > _MAX_DIMS:
            raise InvalidModelFileError(f"{self._path}: tensor {name!r} claims {n_dims} dimensions")
        dim_type = GgufType.UINT64 if self._version > 1 else GgufType.UINT32
        shape = tuple(self._fixed(dim_type) for _ in range(n_dims))
        ggml_type = self._fixed(GgufType.UINT32)
        offset = self._fixed(GgufType.UINT64)
        return GgufTensor(name=name, shape=shape, ggml_type=ggml_type, offset=offset)

    def _count(self) -> int:
        return self._fixed(GgufType.UINT64 if self._version > 1 else GgufType.UINT32)

    def _length_size(self) -> int:
        return 8 if self._version > 1 else 4

    def _fixed(self, kind: GgufType):
        layout = _FIXED[kind]
        return layout.unpack(self._take(layout.size, f"a {kind.name.lower()}"))[0]

    def _check_count(self, count: int, min_item_bytes: int, what: str) -> None:
        """Garbage lengths are caught here, before a list or buffer of that size exists."""
        if count * min_item_bytes > self._size - self._pos:
            raise InvalidModelFileError(
                f"{self._path}: {count} {what} at byte {self._pos} cannot fit in the "
                f"{self._size - self._pos} bytes left (truncated or not a GGUF)"
            )

    # --- bytes ------------------------------------------------------------

    def _take(self, n: int, what: str) -> bytes:
        end = self._pos + n
        if end > self._size:
            raise self._truncated(what)
        buf_end = self._buf_start + len(self._buf)
        if end > buf_end:
            keep = self._buf[self._pos - self._buf_start :]
            more = self._f.read(max(_READ_BLOCK, end - buf_end))
            self._buf = keep + more
            self._buf_start = self._pos
            if end > self._buf_start + len(self._buf):
                raise self._truncated(what)
        start = self._pos - self._buf_start
        self._pos = end
        return self._buf[start : start + n]

    def _truncated(self, what: str) -> InvalidModelFileError:
        return InvalidModelFileError(
            f"{self._path}: the file ends at byte {self._size} in the middle of {what} "
            f"(read up to byte {self._pos}); it is truncated or not a GGUF"
        )
