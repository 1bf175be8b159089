"""residency's one GGUF reader: a file's metadata and tensor table, for the registry (names,
details, capabilities), ``/api/show`` (through the registry) and the estimator (tensor types and
sizes).

It walks the header with ``struct`` over an mmap, and reads an array's elements only when they are
few (per-layer values, patterns) or asked for: a 262k-token vocabulary is skipped by its string
lengths, its count kept. ``gguf.GGUFReader`` builds numpy views of every element instead (seconds
for Gemma 3's vocabulary). Each file version (path, size, mtime) is parsed once per process and
shared by every reader of it. Type sizes come from the ``gguf`` package's public constants.
Format: github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

__all__ = ["GGUFFormatError", "GGUFHeader", "GGUFTensor", "read_header"]

_MAGIC = b"GGUF"
# value type → struct format (scalars)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q"}
_SCALARS |= {11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
#: Arrays with at most this many elements are always read (per-layer values, SWA patterns).
SMALL_ARRAY = 4096
_DEFAULT_ALIGNMENT = 32


class GGUFFormatError(ValueError):
    """Not a GGUF file, or one whose header is cut short or malformed."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    #: ggml type id (gguf.GGMLQuantizationType).
    type_id: int
    #: Dimensions in ggml order (ne[0] is the row length).
    shape: tuple[int, ...]
    #: Absolute offset of its data in the file.
    offset: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self.type_id).name

    @property
    def n_bytes(self) -> int:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(self.type_id)]
        return self.n_elements * type_size // block


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF file's header. Shared between readers: never mutate it (copy the metadata)."""

    version: int
    #: Key/values. Arrays longer than SMALL_ARRAY are [] unless read with ``arrays=True``.
    metadata: Mapping[str, Any]
    #: Every array's element count (the vocabulary size without reading the vocabulary).
    array_lengths: Mapping[str, int]
    tensors: tuple[GGUFTensor, ...]

    @property
    def tensor_elements(self) -> list[int]:
        """Elements per tensor, in file order."""
        return [t.n_elements for t in self.tensors]

    @property
    def parameter_count(self) -> int:
        return sum(self.tensor_elements)


def read_header(path: str | os.PathLike[str], *, arrays: bool = False) -> GGUFHeader:
    """The header of a GGUF file, parsed once per file version; every array in full only with
    `arrays`. Raises OSError when it cannot be read, GGUFFormatError when it is not GGUF."""
    p = Path(path).resolve()
    st = p.stat()
    return _read(p, st.st_size, st.st_mtime_ns, arrays)


@lru_cache(maxsize=32)
def _read(path: Path, size: int, mtime_ns: int, arrays: bool) -> GGUFHeader:
    del size, mtime_ns  # the cache key: a changed file is read again
    with open(path, "rb") as f:
        if f.read(4) != _MAGIC:
            raise GGUFFormatError(f"{path} is not a GGUF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _Parser(buf, arrays).header()


class _Parser:
    __slots__ = ("arrays", "buf", "lengths", "pos")

    def __init__(self, buf: mmap.mmap, arrays: bool) -> None:
        self.buf = buf
        self.pos = 4
        self.arrays = arrays
        self.lengths: dict[str, int] = {}

    def header(self) -> GGUFHeader:
        version = self.unpack("<I")
        if version > 0xFFFF:
            raise GGUFFormatError("big-endian GGUF files are not supported")
        count_fmt = "<I" if version == 1 else "<Q"
        n_tensors = self.unpack(count_fmt)
        n_kv = self.unpack(count_fmt)
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self.string()
            vtype = self.unpack("<I")
            metadata[key] = self.value(vtype, key)
        table = []
        for _ in range(n_tensors):
            name = self.string()
            n_dims = self.unpack("<I")
            shape = tuple(self.unpack("<Q") for _ in range(n_dims))
            type_id = self.unpack("<I")
            offset = self.unpack("<Q")
            table.append((name, type_id, shape, offset))
        alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise GGUFFormatError(f"general.alignment is {alignment!r}")
        data_start = -(-self.pos // alignment) * alignment
        tensors = tuple(GGUFTensor(n, t, s, data_start + o) for n, t, s, o in table)
        return GGUFHeader(
            version, MappingProxyType(metadata), MappingProxyType(self.lengths), tensors
        )

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GGUFFormatError("the GGUF header is truncated")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        end = self.pos + n
        if end > len(self.buf):
            raise GGUFFormatError("the GGUF header is truncated")
        text = bytes(self.buf[self.pos : end]).decode("utf-8", errors="replace")
        self.pos = end
        return text

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise GGUFFormatError(f"{key}: unknown GGUF value type {vtype}")
        etype = self.unpack("<I")
        count = self.unpack("<Q")
        self.lengths[key] = count
        if self.arrays or count <= SMALL_ARRAY:
            return [self.value(etype, key) for _ in range(count)]
        if etype in _SCALARS:
            self.pos += struct.calcsize(_SCALARS[etype]) * count
        elif etype == _STRING:
            self.pos = _skip_strings(self.buf, self.pos, count)
        else:
            for _ in range(count):
                self.value(etype, key)
        if self.pos > len(self.buf):
            raise GGUFFormatError("the GGUF header is truncated")
        return []


def _skip_strings(buf: mmap.mmap, pos: int, count: int) -> int:
    """The position after `count` strings: a tight loop (a vocabulary has 262k of them)."""
    unpack = _U64.unpack_from
    end = len(buf) - 8
    for _ in range(count):
        if pos > end:
            raise GGUFFormatError("the GGUF header is truncated")
        pos += 8 + unpack(buf, pos)[0]
    return pos
