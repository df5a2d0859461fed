"""Which path runs: the Triton kernels, the C++ CPU op, or the torch composite path.

``auto`` (the default) runs Triton for CUDA tensors, and for CPU tensors only when ``TRITON_INTERPRET=1``
is set (that is how CI, which has no GPU, runs the kernels themselves); CPU tensors otherwise take the C++
op where it is built (``cpu_extension``; the local activation unit only), else the torch composite path,
which uses the same algebra in Python. ``set_backend("triton")`` forces the kernels (an error where Triton
cannot run), ``set_backend("cpp")`` the C++ op on CPU (an error where it is not built; Dice and MBA, which
have no C++ op, run their torch path), ``set_backend("torch")`` the composite path. The environment
variable ``DIN_KERNELS_BACKEND`` sets the starting value.
"""
from __future__ import annotations

import functools
import os

import torch

from . import cpu_extension

BACKENDS = ("auto", "triton", "cpp", "torch")
_backend = os.environ.get("DIN_KERNELS_BACKEND", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"DIN_KERNELS_BACKEND must be one of {BACKENDS}, got {_backend!r}")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # an ImportError, or a broken install: either way no kernels
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


DEFAULT_SM_COUNT = 132  # an H100 / H200, where the device cannot be asked (the interpreter)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (grid sizes follow it), ``DEFAULT_SM_COUNT`` elsewhere."""
    if device.type != "cuda":
        return DEFAULT_SM_COUNT
    return torch.cuda.get_device_properties(device.index if device.index is not None
                                            else torch.cuda.current_device()).multi_processor_count


def set_backend(name: str) -> None:
    """Choose the path for every op: ``"auto"``, ``"triton"``, ``"cpp"`` or ``"torch"``."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "triton" and not triton_available():
        raise RuntimeError("backend 'triton' requested but triton cannot be imported")
    if name == "cpp" and not cpu_extension.available():
        raise RuntimeError("backend 'cpp' requested but the C++ CPU op could not be built or loaded "
                           "(see the warning; `python -m din_kernels.cpu_extension` retries the build)")
    _backend = name


def get_backend() -> str:
    return _backend


def use_triton(tensor: torch.Tensor) -> bool:
    """True when the op on ``tensor`` should run the Triton kernels."""
    if _backend in ("torch", "cpp") or not triton_available():
        if _backend == "triton":
            raise RuntimeError("backend 'triton' requested but triton cannot be imported")
        return False
    runnable = tensor.is_cuda or (tensor.device.type == "cpu" and interpreter_enabled())
    if _backend == "triton" and not runnable:
        raise RuntimeError(
            f"backend 'triton' cannot run on a {tensor.device.type} tensor: use CUDA, or set "
            "TRITON_INTERPRET=1 before importing din_kernels to run the kernels under the interpreter"
        )
    return runnable


def select_path(tensor: torch.Tensor, *, cpp: bool) -> str:
    """The one selection rule of every op: "triton", "cpp" or "torch" for an op on ``tensor``, where ``cpp``
    says whether the op has a C++ path that takes this problem (dtype, shapes). Raises where the backend
    set asks for a path that cannot run (``use_triton``, ``set_backend``)."""
    if use_triton(tensor):
        return "triton"
    if cpp and use_cpu_extension(tensor):
        return "cpp"
    return "torch"


def use_cpu_extension(tensor: torch.Tensor) -> bool:
    """True when an op with a C++ CPU path (the local activation unit) should run it on ``tensor``: a CPU
    tensor, the backend "cpp", or "auto" where Triton does not run, and the op built."""
    if tensor.device.type != "cpu" or _backend == "torch":
        return False
    if _backend == "cpp":
        return True
    return cpu_extension.available()
