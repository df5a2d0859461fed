"""Build and load the C++ CPU ops (``csrc/``: the local activation unit, Dice), once per machine, torch version
and source.

The op is compiled with the C++ compiler against the installed torch's headers and libraries (no Python
headers, no ninja: one ``c++`` command) into a cache folder, then loaded with ``torch.ops.load_library``.
``make setup`` builds it (``python -m din_kernels.build``); elsewhere the first CPU call builds it
(10-60 s, said on stderr) and every later process loads the cached file. Where it cannot be built
(no compiler, a torch without the BLAS symbols it calls, a build error), din_kernels warns once and runs
the Python composite path (``attention/composite.py``) instead: same results, slower under load.

Environment:
    DIN_KERNELS_CPU_EXTENSION=0   never build or load it (the Python composite path runs)
    DIN_KERNELS_CACHE=DIR         where the built library lives (default ``~/.cache/din_kernels``)
    CXX                           the compiler (default ``c++``)
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
# one library; csrc/cpu_runtime.h shared
SOURCES = (CSRC / "attention_cpu.cpp", CSRC / "dice_cpu.cpp", CSRC / "embedding_cpu.cpp",
           CSRC / "mlp_cpu.cpp")
LIBRARY_NAME = "din_kernels_cpu"


_threads = 0  # 0: torch's intra-op threads (torch.get_num_threads()) at each call


def set_num_threads(threads: int) -> None:
    """Threads the C++ ops run on, whatever ``torch.set_num_threads`` says for torch's own ops; 0 (the
    default) follows torch. Their blocks are robust on a busy machine where OpenMP regions are not, so a
    training loop may keep torch's ops at 1 thread and give these more (``din train --threads``)."""
    global _threads
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise ValueError(f"threads must be an int >= 0 (0: follow torch.get_num_threads()), got {threads!r}")
    _threads = threads


def get_num_threads() -> int:
    """The C++ ops' threads: the value of ``set_num_threads``, or torch's when that is 0."""
    return _threads or torch.get_num_threads()


def threads() -> int:
    """What the ops are passed: the ``set_num_threads`` value (0: the op asks torch itself)."""
    return _threads


def enabled() -> bool:
    return os.environ.get("DIN_KERNELS_CPU_EXTENSION", "1") != "0"


def cache_dir() -> Path:
    """``$DIN_KERNELS_CACHE``, else ``~/.cache/din_kernels``, else (no writable home) a folder of this user's
    in the temporary directory."""
    if "DIN_KERNELS_CACHE" in os.environ:
        return Path(os.environ["DIN_KERNELS_CACHE"])
    home = Path.home() / ".cache" / "din_kernels"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"din_kernels-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _cpu_flags() -> str:
    """The CPU's feature flags: the library is built with ``-march=native``, so another CPU needs another."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor()


def _command(output: Path) -> list:
    from torch.utils.cpp_extension import include_paths

    torch_lib = Path(torch.__file__).resolve().parent / "lib"
    return [
        _compiler(), "-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-DNDEBUG",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *[f"-I{path}" for path in include_paths()],
        *[str(source) for source in SOURCES], "-o", str(output),
        f"-L{torch_lib}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{torch_lib}", "-Wl,--no-undefined",
    ]


def library_path() -> Path:
    """Where the library for this source, torch, compiler and CPU lives (built or not)."""
    digest = hashlib.sha256()
    sources = [path.read_bytes() for path in sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.h"))]
    for part in (*sources, torch.__version__.encode(), _compiler().encode(), _cpu_flags().encode(),
                 " ".join(_command(Path("out"))).encode()):
        digest.update(part)
    return cache_dir() / f"{LIBRARY_NAME}-{digest.hexdigest()[:16]}.so"


def build(verbose: bool = True) -> Path:
    """Compile the library into the cache unless it is there; returns its path. Raises RuntimeError with the
    compiler's output when the build fails. Concurrent builds are safe: each writes its own temporary file
    and renames it into place."""
    path = library_path()
    if path.exists():
        return path
    if shutil.which(_compiler()) is None:
        raise RuntimeError(f"no C++ compiler {_compiler()!r} on PATH (set CXX)")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp.so", dir=path.parent)
    os.close(handle)
    if verbose:
        print(f"din_kernels: building the C++ CPU op into {path} (once; 10-60 s)", file=sys.stderr)
    start = time.perf_counter()
    try:
        result = subprocess.run(_command(Path(temporary)), capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"building {', '.join(p.name for p in SOURCES)} failed:\n{result.stderr[-4000:]}")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    if verbose:
        print(f"din_kernels: built in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return path


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when ``torch.ops.din_kernels_cpu`` is loaded (building it first if needed); warns once and
    returns False where it cannot be."""
    if not enabled():
        return False
    try:
        torch.ops.load_library(str(build()))
        torch.ops.din_kernels_cpu.attention_fwd  # noqa: B018 (resolves the op: fails if the library lacks it)
    except Exception as error:  # no compiler, a failed build, a library that does not load: fall back
        warnings.warn(f"din_kernels: the C++ CPU op is unavailable, the Python composite path runs instead "
                      f"({str(error).splitlines()[0]})", RuntimeWarning, stacklevel=2)
        return False
    return True


def ops():
    """``torch.ops.din_kernels_cpu``, loaded (built first if needed); a RuntimeError where it cannot be."""
    if not available():
        raise RuntimeError("the C++ CPU ops are not available (see the warning above, or "
                           "DIN_KERNELS_CPU_EXTENSION)")
    return torch.ops.din_kernels_cpu


def main() -> int:
    """``python -m din_kernels.build``: build (or find) the library and load it; 0 even where it cannot be
    built (the package runs without it), with the reason on stderr."""
    if not enabled():
        print("din_kernels: DIN_KERNELS_CPU_EXTENSION=0, nothing to build")
        return 0
    try:
        path = build()
        torch.ops.load_library(str(path))
    except Exception as error:
        print(f"din_kernels: could not build the C++ CPU op, the Python composite path will run: {error}",
              file=sys.stderr)
        return 0  # the package works without it; `make setup` must not fail on a machine without a compiler
    print(f"din_kernels: C++ CPU op ready at {path}")
    return 0

