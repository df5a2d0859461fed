"""Which path runs: the Triton kernels or the torch composite path.

``auto`` (the default) runs Triton for CUDA tensors, and for CPU tensors only when ``TRITON_INTERPRET=1``
is set (that is how CI, which has no GPU, runs the kernels themselves); everything else takes the torch
composite path, which uses the same algebra so that CPU users are fast too. ``set_backend("triton")``
forces the kernels (an error where Triton cannot run), ``set_backend("torch")`` forces the composite
path. The environment variable ``DIN_KERNELS_BACKEND`` sets the starting value.
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")
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


def set_backend(name: str) -> None:
    """Choose the path for every op: ``"auto"``, ``"triton"`` or ``"torch"``."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "triton" and not triton_available():
        raise RuntimeError("backend 'triton' requested but triton cannot be imported")
    _backend = name


def get_backend() -> str:
    return _backend


def use_triton(tensor: torch.Tensor) -> bool:
    """True when the op on ``tensor`` should run the Triton kernels."""
    if _backend == "torch" or not triton_available():
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
