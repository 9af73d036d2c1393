"""IDX files (the MNIST / Fashion-MNIST format), gzip-compressed or raw.

Layout: a 4-byte magic ``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` big-endian uint32
sizes, then exactly ``prod(sizes)`` big-endian items. MNIST images have magic 2051
(uint8, 3-d), labels 2049 (uint8, 1-d). Every way a file can be wrong — a damaged gzip
stream, a short or overlong payload, a foreign magic — raises :class:`DataFileError`
naming the file, so a bad download never becomes a silently wrong array. The payload is
streamed and read only up to the size the header declares, whatever the file's name, so a
small gzip file that expands to gigabytes costs no more than its declared array.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from batchnorm.errors import FileContentError

__all__ = ["IMAGES_MAGIC", "LABELS_MAGIC", "DataFileError", "read_idx"]

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

# IDX dtype code -> numpy dtype (multi-byte types are big-endian by definition)
_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
           0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


class DataFileError(FileContentError):
    """A data file is corrupt, truncated, of the wrong kind or fails its checksum."""


def _describe_magic(magic: int) -> str:
    dtype = _DTYPES.get((magic >> 8) & 0xFF)
    kind = dtype.name if dtype is not None else "unknown dtype"
    return f"{magic} (0x{magic:08x}, {kind}, {magic & 0xFF}-d)"


def _read_at_most(stream: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes, read in chunks so that memory follows what the stream
    holds, not what a header claims."""
    chunks, remaining = [], size
    while remaining > 0:
        chunk = stream.read(min(remaining, _CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_idx(path: str | os.PathLike[str], magic: int | None = None) -> np.ndarray:
    """Parse one IDX file into a native-endian array of the shape its header declares.

    ``magic`` (e.g. :data:`IMAGES_MAGIC`) makes any other magic number an error.
    """
    path = Path(path)
    with open(path, "rb") as raw:
        is_gzip = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        if path.suffix == ".gz" and not is_gzip:
            raise DataFileError(path, "not gzip data", f"first bytes {_GZIP_MAGIC.hex()}",
                                raw.read(2).hex() or "an empty file")
        if not is_gzip:
            return _parse(path, raw, magic)
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                return _parse(path, stream, magic)
        except (OSError, EOFError, zlib.error) as error:  # BadGzipFile is an OSError
            raise DataFileError(path, "corrupt or truncated gzip stream",
                                "a complete gzip stream with a matching CRC",
                                repr(error)) from None


def _parse(path: Path, stream: BinaryIO, magic: int | None) -> np.ndarray:
    """The array in ``stream``, reading only what the header declares plus one byte: a
    small gzip file can expand to gigabytes, so the payload is never read whole."""
    head = _read_at_most(stream, 4)
    if len(head) < 4:
        raise DataFileError(path, "truncated header", "at least 4 bytes", f"{len(head)} bytes")
    found = int.from_bytes(head, "big")
    if head[0] != 0 or head[1] != 0 or head[2] not in _DTYPES or head[3] == 0:
        raise DataFileError(path, "not an IDX file (bad magic number)",
                            "0x0000<dtype code><ndim>", _describe_magic(found))
    if magic is not None and found != magic:
        raise DataFileError(path, "wrong magic number", _describe_magic(magic),
                            _describe_magic(found))
    dtype, ndim = _DTYPES[head[2]], head[3]
    sizes = _read_at_most(stream, 4 * ndim)
    if len(sizes) < 4 * ndim:
        raise DataFileError(path, "truncated header", f"{4 + 4 * ndim} bytes for {ndim} sizes",
                            f"{4 + len(sizes)} bytes")
    shape = tuple(int.from_bytes(sizes[4 * i: 4 * i + 4], "big") for i in range(ndim))
    expected_size = math.prod(shape) * dtype.itemsize
    expected = f"{expected_size} bytes for shape {shape}"
    data = _read_at_most(stream, expected_size)
    if len(data) < expected_size:
        raise DataFileError(path, "truncated data", expected, f"{len(data)} bytes")
    if stream.read(1):
        raise DataFileError(path, "trailing bytes after data", expected,
                            f"more than {expected_size} bytes")
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="))
