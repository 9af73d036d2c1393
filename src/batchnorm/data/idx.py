"""IDX files (the MNIST / Fashion-MNIST format), gzip-compressed or raw.

Layout: a 4-byte magic ``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` big-endian uint32
sizes, then exactly ``prod(sizes)`` big-endian items. MNIST images have magic 2051
(uint8, 3-d), labels 2049 (uint8, 1-d). Every way a file can be wrong — a damaged gzip
stream, a short or overlong payload, a foreign magic — raises :class:`DataFileError`
naming the file, so a bad download never becomes a silently wrong array.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from batchnorm.errors import FileContentError

__all__ = ["IMAGES_MAGIC", "LABELS_MAGIC", "DataFileError", "read_idx"]

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

# IDX dtype code -> numpy dtype (multi-byte types are big-endian by definition)
_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
           0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_GZIP_MAGIC = b"\x1f\x8b"


class DataFileError(FileContentError):
    """A data file is corrupt, truncated, of the wrong kind or fails its checksum."""


def _describe_magic(magic: int) -> str:
    dtype = _DTYPES.get((magic >> 8) & 0xFF)
    kind = dtype.name if dtype is not None else "unknown dtype"
    return f"{magic} (0x{magic:08x}, {kind}, {magic & 0xFF}-d)"


def _payload(path: Path) -> bytes:
    """The file's bytes, gunzipped when the content (not the suffix) is gzip."""
    data = path.read_bytes()
    if path.suffix == ".gz" and not data.startswith(_GZIP_MAGIC):
        raise DataFileError(path, "not gzip data", f"first bytes {_GZIP_MAGIC.hex()}",
                            data[:2].hex() or "an empty file")
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:  # BadGzipFile is an OSError
        raise DataFileError(path, "corrupt or truncated gzip stream",
                            "a complete gzip stream with a matching CRC", repr(error)) from None


def read_idx(path: str | os.PathLike[str], magic: int | None = None) -> np.ndarray:
    """Parse one IDX file into a native-endian array of the shape its header declares.

    ``magic`` (e.g. :data:`IMAGES_MAGIC`) makes any other magic number an error.
    """
    path = Path(path)
    data = _payload(path)
    if len(data) < 4:
        raise DataFileError(path, "truncated header", "at least 4 bytes", f"{len(data)} bytes")
    found = int.from_bytes(data[:4], "big")
    if data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES or data[3] == 0:
        raise DataFileError(path, "not an IDX file (bad magic number)",
                            "0x0000<dtype code><ndim>", _describe_magic(found))
    if magic is not None and found != magic:
        raise DataFileError(path, "wrong magic number", _describe_magic(magic),
                            _describe_magic(found))
    dtype, ndim = _DTYPES[data[2]], data[3]
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataFileError(path, "truncated header", f"{header_size} bytes for {ndim} sizes",
                            f"{len(data)} bytes")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected_size = math.prod(shape) * dtype.itemsize
    actual_size = len(data) - header_size
    if actual_size != expected_size:
        problem = "truncated data" if actual_size < expected_size else "trailing bytes after data"
        raise DataFileError(path, problem, f"{expected_size} bytes for shape {shape}",
                            f"{actual_size} bytes")
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="))
