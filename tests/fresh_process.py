"""Test helper: a function of a test file called in a new interpreter, for settings the
library reads once per process (its environment variables)."""

from __future__ import annotations

import os
import subprocess
import sys


def call_in_new_process(test_file: str, call: str, **env: str) -> subprocess.CompletedProcess:
    """Runs ``call``, Python source in which ``test`` holds the globals of ``test_file``, in a
    new interpreter whose environment is this one's with ``env`` added (and these helpers on
    its path, for the test file's imports)."""
    helpers = os.path.dirname(os.path.abspath(__file__))
    code = (f"import runpy, sys; sys.path.insert(0, {helpers!r}); "
            f"test = runpy.run_path({test_file!r}); {call}")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
