"""Fixtures for the data tests: IDX files written from the format spec and a local HTTP
server."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import socket
import threading
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from batchnorm.data import datasets, download

# IDX dtype code for each numpy dtype, written independently of the package's table
IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
             np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array``: magic, big-endian sizes, big-endian items."""
    dtype = array.dtype.newbyteorder(">")
    header = bytes([0, 0, IDX_CODES[dtype], array.ndim])
    header += b"".join(size.to_bytes(4, "big") for size in array.shape)
    return header + array.astype(dtype).tobytes()


@pytest.fixture
def write_idx() -> Callable[..., Path]:
    """``write_idx(path, array)``: gzip when the name ends in .gz, raw otherwise."""

    def write(path: Path, array: np.ndarray) -> Path:
        data = idx_bytes(array)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
        return path

    return write


class Route:
    """What the test server answers for one path; ``hits`` counts the requests."""

    def __init__(self, body: bytes = b"", status: int = 200, length: int | None = None):
        self.body, self.status, self.length, self.hits = body, status, length, 0


class LocalServer:
    """An HTTP server on 127.0.0.1 (ephemeral port) serving ``routes`` set by the test."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        routes = self.routes

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path, Route(status=404))
                route.hits += 1
                self.send_response(route.status)
                length = len(route.body) if route.length is None else route.length
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(route.body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.01}, daemon=True)

    def serve(self, path: str, body: bytes = b"", status: int = 200,
              length: int | None = None) -> Route:
        self.routes[path] = Route(body, status, length)
        return self.routes[path]


@pytest.fixture
def server() -> Iterator[LocalServer]:
    local = LocalServer()
    local.thread.start()
    yield local
    local.server.shutdown()
    local.server.server_close()


@pytest.fixture
def serve_mnist(server, monkeypatch, write_idx, tmp_path) -> Callable[..., dict[str, str]]:
    """``serve_mnist({"train": (images, labels), "test": ...})`` serves the parts as gz
    files under ``/mnist/``, makes their MD5s the published ones, and returns them."""

    def serve(parts: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, str]:
        md5 = {}
        for part, arrays in parts.items():
            prefix = "t10k" if part == "test" else "train"
            for kind, array in zip(("images-idx3", "labels-idx1"), arrays, strict=True):
                name = f"{prefix}-{kind}-ubyte.gz"
                body = write_idx(tmp_path / "served" / name, array).read_bytes()
                md5[name] = hashlib.md5(body).hexdigest()
                server.serve(f"/mnist/{name}", body)
        monkeypatch.setitem(datasets.DATASETS, "mnist",
                            datasets.IdxDataset("mnist", md5, (f"{server.url}/mnist/",)))
        return md5

    return serve


@pytest.fixture
def no_network(monkeypatch) -> list[str]:
    """Every URL opened fails as without network (the host name does not resolve); the
    list records the URLs tried. Backoff sleeps are skipped."""
    tried: list[str] = []

    def urlopen(url: str, timeout: float) -> None:
        tried.append(url)
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(download.urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(download.time, "sleep", lambda seconds: None)
    return tried
