"""A fast reader for a GGUF file's metadata (key/values and tensor shapes), for the model registry
and ``/api/show``.

``gguf.GGUFReader`` builds numpy views of every array element, which takes tens of seconds for a
262k-token vocabulary on a busy machine; this reads the header with ``struct`` over an mmap and
skips arrays unless asked for them. Format: github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["GGUFHeader", "read_header"]

_MAGIC = b"GGUF"
# value type → struct format (scalars)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q"}
_SCALARS |= {11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """Not a GGUF file, or one whose header is cut short."""


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Elements per tensor, in file order.
    tensor_elements: list[int] = field(default_factory=list)

    @property
    def parameter_count(self) -> int:
        return sum(self.tensor_elements)


class _Cursor:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

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

    def skip_string(self) -> None:
        n = self.unpack("<Q")  # read first: it moves pos
        self.pos += n

    def value(self, vtype: int, keep_arrays: bool) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.unpack("<I")
            count = self.unpack("<Q")
            if keep_arrays:
                return [self.value(etype, keep_arrays) for _ in range(count)]
            if etype in _SCALARS:
                self.pos += struct.calcsize(_SCALARS[etype]) * count
            elif etype == _STRING:
                for _ in range(count):
                    self.skip_string()
            else:
                for _ in range(count):
                    self.value(etype, keep_arrays=False)
            return []
        raise GGUFFormatError(f"unknown GGUF value type {vtype}")


def read_header(path: str | Path, *, arrays: bool = False) -> GGUFHeader:
    """The metadata of a GGUF file; arrays are read only with `arrays` (else given as [])."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != _MAGIC:
            raise GGUFFormatError(f"{path} is not a GGUF file")
        cur = _Cursor(buf)
        cur.pos = 4
        version = cur.unpack("<I")
        count_fmt = "<I" if version == 1 else "<Q"
        n_tensors = cur.unpack(count_fmt)
        n_kv = cur.unpack(count_fmt)
        header = GGUFHeader(version=version)
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.unpack("<I")
            header.metadata[key] = cur.value(vtype, arrays)
        for _ in range(n_tensors):
            cur.skip_string()
            n_dims = cur.unpack("<I")
            elements = 1
            for _ in range(n_dims):
                elements *= cur.unpack("<Q")
            cur.pos += 4 + 8  # ggml type, data offset
            header.tensor_elements.append(elements)
        return header
