"""IDX parsing: exact round trips for every dtype, and a clear error for every bad file."""

from __future__ import annotations

import gzip
import tracemalloc
import zlib

import numpy as np
import pytest

from batchnorm.data.idx import IMAGES_MAGIC, LABELS_MAGIC, DataFileError, read_idx

DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]
MNIST_TEST_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # published


@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize("dtype", DTYPES)
def test_read_idx_round_trips_every_dtype_gzip_or_raw(tmp_path, write_idx, dtype, suffix):
    rng = np.random.default_rng(0)
    array = rng.uniform(-100, 100, (3, 4, 5)).astype(dtype)
    path = write_idx(tmp_path / f"array-idx3{suffix}", array)
    parsed = read_idx(path)
    assert parsed.dtype == np.dtype(dtype) and parsed.dtype.isnative
    np.testing.assert_array_equal(parsed, array)


def test_read_idx_returns_a_writable_array(tmp_path, write_idx):
    parsed = read_idx(write_idx(tmp_path / "labels.gz", np.arange(5, dtype=np.uint8)))
    parsed[0] = 9
    assert parsed[0] == 9


def test_matching_magic_is_accepted(tmp_path, write_idx):
    images = write_idx(tmp_path / "images", np.zeros((2, 3, 3), np.uint8))
    labels = write_idx(tmp_path / "labels", np.zeros(2, np.uint8))
    assert read_idx(images, magic=IMAGES_MAGIC).shape == (2, 3, 3)
    assert read_idx(labels, magic=LABELS_MAGIC).shape == (2,)


def test_wrong_magic_names_file_expected_and_found(tmp_path, write_idx):
    labels = write_idx(tmp_path / "labels.gz", np.zeros(4, np.uint8))
    with pytest.raises(DataFileError, match="wrong magic") as caught:
        read_idx(labels, magic=IMAGES_MAGIC)
    message = str(caught.value)
    assert str(labels) in message and "2051" in message and "2049" in message
    assert caught.value.expected.startswith("2051") and caught.value.actual.startswith("2049")


def test_non_idx_content_is_a_bad_magic_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"hello, not an IDX file")
    with pytest.raises(DataFileError, match="bad magic number") as caught:
        read_idx(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_truncated_payload_names_expected_and_actual_sizes(tmp_path, write_idx, suffix):
    full = tmp_path / "full"
    write_idx(full, np.ones((4, 2, 2), np.uint8))
    path = tmp_path / f"short{suffix}"
    data = full.read_bytes()[:-3]
    path.write_bytes(gzip.compress(data) if suffix else data)
    with pytest.raises(DataFileError, match="truncated data") as caught:
        read_idx(path)
    assert str(path) in str(caught.value)
    assert (caught.value.expected, caught.value.actual) == (
        "16 bytes for shape (4, 2, 2)", "13 bytes")


def test_trailing_bytes_are_an_error(tmp_path, write_idx):
    path = write_idx(tmp_path / "long", np.ones(3, np.uint8))
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(DataFileError, match="trailing bytes"):
        read_idx(path)


@pytest.mark.parametrize("keep", [0, 3, 9])
def test_truncated_header_is_an_error(tmp_path, write_idx, keep):
    path = write_idx(tmp_path / "images", np.ones((2, 2, 2), np.uint8))
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(DataFileError, match="truncated header"):
        read_idx(path)


def test_corrupted_gzip_stream_is_an_error(tmp_path, write_idx):
    rng = np.random.default_rng(1)
    path = write_idx(tmp_path / "images.gz", rng.integers(0, 256, (8, 16, 16), dtype=np.uint8))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataFileError, match="corrupt or truncated gzip") as caught:
        read_idx(path)
    assert str(path) in str(caught.value)


def test_truncated_gzip_stream_is_an_error(tmp_path, write_idx):
    path = write_idx(tmp_path / "images.gz", np.arange(512, dtype=np.int32))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataFileError, match="corrupt or truncated gzip"):
        read_idx(path)


def test_gz_name_without_gzip_content_is_an_error(tmp_path, write_idx):
    path = tmp_path / "labels.gz"
    write_idx(tmp_path / "labels", np.zeros(3, np.uint8)).rename(path)
    with pytest.raises(DataFileError, match="not gzip data"):
        read_idx(path)


def gzip_of_zeros(prefix: bytes, zeros: int) -> bytes:
    """A gzip stream of ``prefix`` then ``zeros`` zero bytes, compressed chunk by chunk so
    that the test itself never holds the expanded data."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip container
    parts = [compressor.compress(prefix)]
    chunk = bytes(1 << 20)
    parts += [compressor.compress(chunk) for _ in range(zeros // len(chunk))]
    return b"".join([*parts, compressor.flush()])


@pytest.mark.parametrize("name", ["labels-idx1-ubyte.gz", "labels-idx1-ubyte"])
def test_gzip_bomb_after_a_small_header_is_rejected_reading_only_the_declared_bytes(
        tmp_path, name):
    # the header declares 16 bytes; 64 MiB of zeros follow inside a 64 KiB gzip stream
    header = bytes([0, 0, 0x08, 1]) + (16).to_bytes(4, "big")
    path = tmp_path / name
    path.write_bytes(gzip_of_zeros(header + bytes(16), 64 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(DataFileError, match="trailing bytes after data") as caught:
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert caught.value.expected == "16 bytes for shape (16,)"
    assert peak < 4 << 20, f"peak allocation {peak} bytes: the payload was decompressed whole"


def test_header_declaring_more_than_the_file_holds_allocates_only_what_is_there(tmp_path):
    # 4 GiB declared, 1 KiB present
    path = tmp_path / "images-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, 3]) + b"".join(
        size.to_bytes(4, "big") for size in (1 << 16, 256, 256)) + bytes(1024))
    tracemalloc.start()
    try:
        with pytest.raises(DataFileError, match="truncated data") as caught:
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert caught.value.actual == "1024 bytes"
    assert peak < 4 << 20, f"peak allocation {peak} bytes for a 1 KiB payload"


def test_data_file_error_is_a_value_error():
    assert issubclass(DataFileError, ValueError)


@pytest.mark.mnist
def test_real_mnist_test_files_match_an_independent_parse(mnist_data_dir):
    folder = mnist_data_dir / "mnist"
    images = read_idx(folder / "t10k-images-idx3-ubyte.gz", magic=IMAGES_MAGIC)
    labels = read_idx(folder / "t10k-labels-idx1-ubyte.gz", magic=LABELS_MAGIC)
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz") as handle:
        reference = np.frombuffer(handle.read(), np.uint8, offset=16).reshape(10_000, 28, 28)
    np.testing.assert_array_equal(images, reference)
    assert np.bincount(labels, minlength=10).tolist() == MNIST_TEST_CLASS_COUNTS
