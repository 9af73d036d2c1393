"""Puts this folder on sys.path: processes spawned by a test import their worker
functions (``recalibrate_workers``) by module name, which pytest's importlib mode does not
provide for test modules."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
