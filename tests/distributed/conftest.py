"""Puts this folder on sys.path: the spawned processes of a distributed test import their
worker functions (``workers``) and the process harness (``harness``) by module name,
which pytest's importlib mode does not provide for test modules."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
