"""Builds and loads the C++ CPU kernels (``batchnorm/csrc``) as a PyTorch extension.

The library holds the kernel primitives (``torch.ops.batchnorm_cpu``) and the CPU and
AutogradCPU implementations of the :mod:`batchnorm.ops` operators, which register with the
dispatcher when it loads and from then on take every CPU call of those operators. It is
also a Python module whose functions (:func:`bindings`) call those operators through the
dispatcher without torch.ops' generic argument conversion, for eager calls.

The build runs at first use, once per torch version and CPU capability: its output is
cached under ``$BATCHNORM_CACHE_DIR`` (default ``~/.cache/batchnorm``), so later processes
only load the library. torch's ``cpp_extension.load`` guards the build directory with a
file baton (concurrent processes wait for one build) and rebuilds when the sources or flags
change; a lock does the same for threads of this process. If the build fails (no compiler,
no ninja), :func:`available` is False and one warning says why. :func:`load_cached` loads a
cached build of the current sources without compiling (nor importing the build tools), as
importing :mod:`batchnorm.ops` does.

The kernels use ATen's ``Vectorized``, which picks its implementation from the
``CPU_CAPABILITY_*`` macros: AVX2 (``-mavx2 -mfma -mf16c``) when torch reports AVX2 or
better, ATen's portable fallback otherwise. With torch's OpenMP backend ``-fopenmp`` makes
``at::parallel_for`` run on torch's intra-op threads (the same OpenMP runtime).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import warnings
from importlib import util
from pathlib import Path
from types import ModuleType

import torch

NAMESPACE = "batchnorm_cpu"
SOURCES = ("ops.cpp", "settings.cpp", "output_cache.cpp", "channel_reduce.cpp",
           "channel_map.cpp", "rows.cpp", "group_blocks.cpp", "norm_ops.cpp", "autograd.cpp",
           "python.cpp")
CSRC = Path(__file__).resolve().parent.parent / "csrc"
CACHE_ENV = "BATCHNORM_CACHE_DIR"

_lock = threading.Lock()
_module: ModuleType | None = None  # the loaded library
_failed = False  # its build failed in this process: not tried again
_build_seconds: float | None = None
_composite_operators = False


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


def _source_key() -> str:
    """A digest of what the library is built from: torch, the flags and every source."""
    digest = hashlib.sha256(f"{torch.__version__} {compile_flags()}".encode())
    for path in sorted(CSRC.glob("*.[ch]*")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _stamp() -> Path:
    """Names the library built from the sources of :func:`_source_key`, once it is built."""
    return build_directory() / f"{NAMESPACE}.stamp"


def _build() -> None:
    from torch.utils import cpp_extension

    global _build_seconds
    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    flags = compile_flags()
    key = _source_key()
    start = time.perf_counter()
    module = cpp_extension.load(
        name=NAMESPACE,
        sources=[str(CSRC / name) for name in SOURCES],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [],
        build_directory=str(directory),
        is_python_module=True,
        verbose=False,
    )
    _stamp().write_text(f"{key}\n{Path(module.__file__).name}\n")
    _loaded_now(module, time.perf_counter() - start)


def _import(library: Path) -> ModuleType:
    """The built library as a Python module (loading it registers the operators)."""
    spec = util.spec_from_file_location(NAMESPACE, library)
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _loaded_now(module: ModuleType, seconds: float) -> None:
    global _module, _build_seconds
    _module, _build_seconds = module, seconds
    _apply_composite_setting()


def _apply_composite_setting() -> None:
    if _module is not None:
        torch.ops.batchnorm_cpu.defer_to_composite(_composite_operators)


def load_cached() -> bool:
    """Loads the kernels if the cache holds a build of the current sources (never compiles);
    returns whether they are loaded."""
    if _module is None and not _failed:
        with _lock:
            if _module is None and not _failed:
                try:
                    key, name = _stamp().read_text().split()
                except (OSError, ValueError):
                    return False
                library = build_directory() / name
                if key != _source_key() or not library.is_file():
                    return False
                start = time.perf_counter()
                module = _import(library)
                _loaded_now(module, time.perf_counter() - start)
    return _module is not None


def _summary(error: Exception, limit: int = 300) -> str:
    """The compiler's first error line, or the error's first line: a build log is long."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = next((line for line in lines if "error" in line.lower() and ": " in line),
                 lines[0] if lines else type(error).__name__)
    return first if len(first) <= limit else first[:limit] + "..."


def load() -> None:
    """Builds (at most once) and loads the kernels; raises RuntimeError if that fails."""
    global _failed
    if _module is None and not _failed:
        with _lock:
            if _module is None and not _failed:
                try:
                    _build()
                except Exception as error:  # a missing compiler raises many kinds
                    _failed = True
                    warnings.warn(
                        f"batchnorm: the C++ CPU kernels could not be built in "
                        f"{build_directory()}: {_summary(error)}", RuntimeWarning, stacklevel=3)
                    raise RuntimeError("building the C++ CPU kernels failed") from error
    if _module is None:
        raise RuntimeError("the C++ CPU kernels are unavailable (their build failed earlier)")


def available() -> bool:
    """Whether the C++ kernels are loaded, building them on the first call."""
    try:
        load()
    except RuntimeError:
        return False
    return True


def run_composite_operators(enabled: bool) -> None:
    """While enabled, the compiled CPU operators hand each call to their composite
    implementation (the core in Python over the primitives :func:`batchnorm.kernels.primitives`
    picks), so that a backend forced by :func:`batchnorm.kernels.use_backend` reaches the
    operators too. Applies now if the kernels are loaded, else when they load."""
    global _composite_operators
    _composite_operators = enabled
    _apply_composite_setting()


def bindings() -> ModuleType | None:
    """The library's direct Python entry points of the batchnorm:: operators
    (``csrc/python.cpp``) once it is loaded, else None."""
    return _module


def build_seconds() -> float | None:
    """Seconds the load took in this process (compile on a cold cache, else just load)."""
    return _build_seconds
