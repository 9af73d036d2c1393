"""Builds and loads the C++ CPU kernels (``batchnorm/csrc``) as a PyTorch extension.

The build runs at first use, once per torch version and CPU capability: its output is
cached under ``$BATCHNORM_CACHE_DIR`` (default ``~/.cache/batchnorm``), so later processes
only load the library. torch's ``cpp_extension.load`` guards the build directory with a
file baton (concurrent processes wait for one build) and rebuilds when the sources or flags
change; a lock does the same for threads of this process. If the build fails (no compiler,
no ninja), :func:`available` is False and one warning says why.

The kernels use ATen's ``Vectorized``, which picks its implementation from the
``CPU_CAPABILITY_*`` macros: AVX2 (``-mavx2 -mfma -mf16c``) when torch reports AVX2 or
better, ATen's portable fallback otherwise. With torch's OpenMP backend ``-fopenmp`` makes
``at::parallel_for`` run on torch's intra-op threads (the same OpenMP runtime).
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from pathlib import Path

import torch

NAMESPACE = "batchnorm_cpu"
SOURCES = ("ops.cpp", "channel_reduce.cpp", "channel_map.cpp", "rows.cpp")
CSRC = Path(__file__).resolve().parent.parent / "csrc"
CACHE_ENV = "BATCHNORM_CACHE_DIR"

_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet
_build_seconds: float | None = None


def _avx2() -> bool:
    capability = torch.backends.cpu.get_cpu_capability()
    return capability.startswith(("AVX2", "AVX512"))


def compile_flags() -> list[str]:
    """The C++ flags of this machine's build (see the module docstring)."""
    flags = ["-O3", "-fvisibility=hidden"]
    if _avx2():
        flags += ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    else:
        flags += ["-DCPU_CAPABILITY=DEFAULT"]
    if torch.backends.openmp.is_available():
        flags += ["-fopenmp"]
    return flags


def build_directory() -> Path:
    """Where the extension is built and cached: one directory per torch version and CPU
    capability, under ``$BATCHNORM_CACHE_DIR`` or ``~/.cache/batchnorm``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "batchnorm"
    key = f"cpu-torch{torch.__version__}-{'avx2' if _avx2() else 'default'}"
    return Path(root) / key.replace("+", "_")


def _build() -> None:
    from torch.utils import cpp_extension

    global _build_seconds
    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    flags = compile_flags()
    start = time.perf_counter()
    cpp_extension.load(
        name=NAMESPACE,
        sources=[str(CSRC / name) for name in SOURCES],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [],
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )
    _build_seconds = time.perf_counter() - start


def _summary(error: Exception, limit: int = 300) -> str:
    """The compiler's first error line, or the error's first line: a build log is long."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = next((line for line in lines if "error" in line.lower() and ": " in line),
                 lines[0] if lines else type(error).__name__)
    return first if len(first) <= limit else first[:limit] + "..."


def load() -> None:
    """Builds (at most once) and loads the kernels; raises RuntimeError if that fails."""
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                try:
                    _build()
                except Exception as error:  # a missing compiler raises many kinds
                    _loaded = False
                    warnings.warn(
                        f"batchnorm: the C++ CPU kernels could not be built in "
                        f"{build_directory()}: {_summary(error)}", RuntimeWarning, stacklevel=3)
                    raise RuntimeError("building the C++ CPU kernels failed") from error
                _loaded = True
    if not _loaded:
        raise RuntimeError("the C++ CPU kernels are unavailable (their build failed earlier)")


def available() -> bool:
    """Whether the C++ kernels are loaded, building them on the first call."""
    try:
        load()
    except RuntimeError:
        return False
    return True


def build_seconds() -> float | None:
    """Seconds the load took in this process (compile on a cold cache, else just load)."""
    return _build_seconds
