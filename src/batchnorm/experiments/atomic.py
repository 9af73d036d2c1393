"""Every file an experiment writes (checkpoint, results, summary, figures) appears whole
or not at all, and never through a link someone planted where it goes: it is written to
a fresh temporary file in the same folder (``tempfile.mkstemp``: a new name, opened with
``O_EXCL``) and moved over the destination name with :func:`os.replace`, which replaces
a link instead of following it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(handle)`` on a new temporary file beside ``path``, then move it to
    ``path``; the temporary file is removed if anything fails."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                             suffix=".tmp")
    try:
        os.fchmod(descriptor, 0o666 & ~_umask())  # what open() would have given
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda handle: handle.write(text.encode()))
