"""Downloads against a local HTTP server: checksum, failover, retries, atomic writes."""

from __future__ import annotations

import gzip
import hashlib
import socket
import sys
import time

import pytest

from batchnorm.data import download as download_module
from batchnorm.data.download import DownloadError, download_file, verify_md5
from batchnorm.data.idx import DataFileError

NAME = "train-images-idx3-ubyte.gz"
BODY = gzip.compress(bytes(range(256)) * 40)
BODY_MD5 = hashlib.md5(BODY).hexdigest()


@pytest.fixture
def no_sleep(monkeypatch):
    """Record backoff sleeps instead of sleeping."""
    sleeps = []
    monkeypatch.setattr(download_module.time, "sleep", sleeps.append)
    return sleeps


def leftovers(folder):
    return sorted(path.name for path in folder.iterdir())


def test_download_writes_the_verified_file(tmp_path, server):
    route = server.serve(f"/mnist/{NAME}", BODY)
    path = download_file(tmp_path / "cache" / NAME, [f"{server.url}/mnist/"], BODY_MD5)
    assert path.read_bytes() == BODY and route.hits == 1
    assert leftovers(path.parent) == [NAME]


def test_server_errors_are_retried_with_exponential_backoff(tmp_path, server, no_sleep):
    failing = server.serve(f"/a/{NAME}", status=503)
    server.serve(f"/b/{NAME}", BODY)
    download_file(tmp_path / NAME, [f"{server.url}/a", f"{server.url}/b"], BODY_MD5,
                  retries=3, backoff=0.5)
    assert failing.hits == 3
    assert no_sleep == [0.5, 1.0]
    assert (tmp_path / NAME).read_bytes() == BODY


def test_not_found_moves_to_the_next_mirror_without_retrying(tmp_path, server, no_sleep):
    missing = server.serve(f"/a/{NAME}", status=404)
    server.serve(f"/b/{NAME}", BODY)
    download_file(tmp_path / NAME, [f"{server.url}/a", f"{server.url}/b"], BODY_MD5, retries=3)
    assert missing.hits == 1 and no_sleep == []


def test_unreachable_mirror_fails_over_to_the_next(tmp_path, server, no_sleep):
    with socket.socket() as probe:  # a port nobody listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    good = server.serve(f"/b/{NAME}", BODY)
    download_file(tmp_path / NAME, [dead, f"{server.url}/b"], BODY_MD5, retries=2, timeout=5)
    assert good.hits == 1 and len(no_sleep) == 1


def test_truncated_download_is_a_clear_error_and_leaves_no_file(tmp_path, server, no_sleep):
    server.serve(f"/m/{NAME}", BODY[:100], length=len(BODY))  # connection closes early
    with pytest.raises(DownloadError) as caught:
        download_file(tmp_path / NAME, [f"{server.url}/m"], BODY_MD5, retries=2)
    message = str(caught.value)
    assert "attempt 2" in message
    assert f"{NAME}: truncated download: expected {len(BODY)} bytes, got 100 bytes" in message
    assert leftovers(tmp_path) == []


def test_corrupted_download_fails_its_checksum_and_leaves_no_file(tmp_path, server, no_sleep):
    corrupted = bytearray(BODY)
    corrupted[len(corrupted) // 2] ^= 0xFF
    server.serve(f"/m/{NAME}", bytes(corrupted))
    with pytest.raises(DownloadError, match="MD5 checksum mismatch") as caught:
        download_file(tmp_path / NAME, [f"{server.url}/m"], BODY_MD5, retries=1)
    message = str(caught.value)
    assert BODY_MD5 in message and hashlib.md5(corrupted).hexdigest() in message
    assert leftovers(tmp_path) == []


def test_failed_download_keeps_the_previous_file_intact(tmp_path, server, no_sleep):
    previous = tmp_path / NAME
    previous.write_bytes(b"previous content")
    server.serve(f"/m/{NAME}", BODY[:-1])
    with pytest.raises(DownloadError):
        download_file(previous, [f"{server.url}/m"], BODY_MD5, retries=1)
    assert previous.read_bytes() == b"previous content"
    assert leftovers(tmp_path) == [NAME]


@pytest.mark.parametrize(("kwargs", "argument"), [
    ({"mirrors": []}, "mirrors"),
    ({"retries": 0}, "retries"),
    ({"backoff": -1.0}, "backoff"),
])
def test_bad_arguments_name_the_argument(tmp_path, kwargs, argument):
    arguments = {"mirrors": ["http://127.0.0.1:9/"], "retries": 1, "backoff": 0.0, **kwargs}
    mirrors = arguments.pop("mirrors")
    with pytest.raises(ValueError, match=argument):
        download_file(tmp_path / NAME, mirrors, BODY_MD5, **arguments)


def test_verify_md5_names_the_file_expected_and_actual(tmp_path):
    path = tmp_path / NAME
    path.write_bytes(BODY + b"x")
    verify_md5(tmp_path / NAME, hashlib.md5(BODY + b"x").hexdigest())
    with pytest.raises(DataFileError) as caught:
        verify_md5(path, BODY_MD5)
    assert caught.value.path == path and caught.value.expected == BODY_MD5
    assert caught.value.actual == hashlib.md5(BODY + b"x").hexdigest()


class RecordingBar:
    def __init__(self, total, name):
        self.total, self.name, self.progress, self.closed = total, name, 0, False

    def update(self, count):
        self.progress += count

    def close(self):
        self.closed = True


def test_progress_bar_counts_every_byte_against_the_content_length(tmp_path, server,
                                                                    monkeypatch):
    bars = []
    monkeypatch.setattr(download_module, "_progress",
                        lambda total, name: bars.append(RecordingBar(total, name)) or bars[-1])
    server.serve(f"/m/{NAME}", BODY)
    download_file(tmp_path / NAME, [f"{server.url}/m"], BODY_MD5)
    [bar] = bars
    assert (bar.total, bar.name, bar.progress, bar.closed) == (len(BODY), NAME, len(BODY), True)


def test_download_works_quietly_without_tqdm(tmp_path, server, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm` raise ImportError
    assert download_module._progress(10, NAME) is None
    server.serve(f"/m/{NAME}", BODY)
    assert download_file(tmp_path / NAME, [f"{server.url}/m"], BODY_MD5).read_bytes() == BODY


def test_a_host_name_that_does_not_resolve_is_not_retried(tmp_path, no_network):
    with pytest.raises(DownloadError) as caught:
        download_file(tmp_path / NAME, ["https://a.example/", "https://b.example/"], BODY_MD5,
                      retries=3)
    assert no_network == [f"https://a.example/{NAME}", f"https://b.example/{NAME}"]
    assert caught.value.offline and len(caught.value.causes) == 2


def test_the_deadline_bounds_a_host_that_never_answers(tmp_path):
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        start = time.monotonic()
        with pytest.raises(DownloadError, match="deadline passed") as caught:
            download_file(tmp_path / NAME, [url, url], BODY_MD5, retries=3, timeout=60,
                          deadline=start + 1.0)
        elapsed = time.monotonic() - start
    assert elapsed < 10, elapsed  # without the deadline: 3 attempts x 60 s per mirror
    assert not caught.value.offline
    assert leftovers(tmp_path) == []
