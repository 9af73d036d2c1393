"""Checksummed downloads from a list of mirrors (urllib only).

Each mirror is tried in order, each up to ``retries`` times with exponential backoff;
a 4xx answer or a host name that does not resolve (no network, no DNS) moves straight on
to the next mirror, and an optional ``deadline`` bounds the whole download, waits
included, so a host that never answers cannot hold it for minutes. The body streams
into a temporary file next to the destination, with a tqdm progress bar when tqdm is
installed and stderr is a terminal, and is moved into place with :func:`os.replace` only
after its MD5 matches, so the destination is either absent or complete and verified.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from batchnorm.data.idx import DataFileError

__all__ = ["DownloadError", "download_file", "file_md5", "verify_md5"]

logger = logging.getLogger(__name__)
_CHUNK = 1 << 16


class DownloadError(OSError):
    """No mirror delivered a file that passed its checksum; ``causes`` holds each failed
    attempt's exception, in order."""

    def __init__(self, message: str, causes: Sequence[BaseException] = ()) -> None:
        super().__init__(message)
        self.causes = list(causes)

    @property
    def offline(self) -> bool:
        """Every attempt failed because no host name resolved: no network (or no DNS)."""
        return bool(self.causes) and all(_unresolvable(cause) for cause in self.causes)


def file_md5(path: str | os.PathLike[str]) -> str:
    """Hex MD5 of a file (the published checksums of the official .gz files are MD5)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: str | os.PathLike[str], expected: str, source: str | None = None) -> None:
    """Raise :class:`DataFileError` naming ``source`` (default: the path) unless MD5 matches."""
    actual = file_md5(path)
    if actual != expected.lower():
        raise DataFileError(source or path, "MD5 checksum mismatch (corrupt or truncated file)",
                            expected.lower(), actual)


def _progress(total: int | None, name: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc=name, leave=False, disable=None)


def _fetch(url: str, destination: Path, md5: str, timeout: float, deadline: float) -> None:
    """One attempt: stream ``url`` to a temporary file, check it, then move it into place;
    ``timeout`` bounds each socket operation, ``deadline`` (a ``time.monotonic()``
    instant) the whole transfer."""
    descriptor, name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.",
                                        suffix=".part")
    temporary = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as handle, \
                urllib.request.urlopen(url, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
            bar = _progress(total, destination.name)
            received = 0
            try:
                while chunk := response.read(_CHUNK):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"deadline passed after {received} bytes")
                    handle.write(chunk)
                    received += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
        if total is not None and received != total:
            raise DataFileError(destination.name, "truncated download", f"{total} bytes",
                                f"{received} bytes")
        verify_md5(temporary, md5, source=destination.name)
        os.replace(temporary, destination)
    finally:
        temporary.unlink(missing_ok=True)


def _unresolvable(error: BaseException) -> bool:
    """The host name did not resolve: retrying will not help."""
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    return isinstance(reason, socket.gaierror)


def download_file(destination: str | os.PathLike[str], mirrors: Sequence[str], md5: str, *,
                  retries: int = 3, backoff: float = 1.0, timeout: float = 30.0,
                  deadline: float | None = None) -> Path:
    """Download ``destination.name`` from the first mirror that serves it with MD5 ``md5``.

    A mirror is a base URL; the file's URL is ``mirror.rstrip('/') + '/' + name``.
    Attempt ``k`` (from 0) on a mirror is preceded by a ``backoff * 2**(k-1)`` s sleep.
    ``timeout`` bounds each socket operation; ``deadline``, a ``time.monotonic()``
    instant, the whole call: no attempt starts or continues past it.
    """
    destination = Path(destination)
    if not mirrors:
        raise ValueError("mirrors must name at least one base URL, got an empty list")
    if retries < 1:
        raise ValueError(f"retries must be >= 1, got {retries}")
    if backoff < 0:
        raise ValueError(f"backoff must be >= 0 seconds, got {backoff}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    deadline = float("inf") if deadline is None else deadline
    failures, causes = [], []
    for mirror in mirrors:
        url = f"{mirror.rstrip('/')}/{destination.name}"
        for attempt in range(retries):
            pause = backoff * 2 ** (attempt - 1) if attempt else 0.0
            if time.monotonic() + pause >= deadline:
                failures.append(f"{url}: deadline passed before attempt {attempt + 1}")
                break
            if pause:
                time.sleep(pause)
            try:
                _fetch(url, destination, md5, min(timeout, deadline - time.monotonic()),
                       deadline)
                return destination
            except (OSError, http.client.HTTPException, DataFileError) as error:
                failures.append(f"{url} (attempt {attempt + 1}): {error}")
                causes.append(error)
                logger.warning("download failed: %s: %s", url, error)
                if ((isinstance(error, urllib.error.HTTPError) and 400 <= error.code < 500)
                        or _unresolvable(error)):
                    break
    raise DownloadError(f"could not download {destination.name} to {destination.parent} "
                        f"from {len(mirrors)} mirror(s):\n  " + "\n  ".join(failures),
                        causes)
