"""Errors in what the caller gave: a file, a model spec, a dataset.

The ``batchnorm`` command reports these (and :class:`OSError`) as one ``error:`` line
with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os

__all__ = ["FileContentError", "InputError"]


class InputError(Exception):
    """What the caller gave or asked for cannot be used as it is."""


class FileContentError(InputError, ValueError):
    """A file holds the wrong thing: corrupt, truncated, of the wrong kind or type. The
    message names the file, the problem, what was expected and what was found."""

    def __init__(self, path: str | os.PathLike[str], problem: str, expected: object,
                 actual: object, hint: str = "") -> None:
        self.path, self.problem, self.expected, self.actual = path, problem, expected, actual
        super().__init__(f"{path}: {problem}: expected {expected}, got {actual}"
                         + (f"; {hint}" if hint else ""))
