"""The precision contract, in one place: fp64 inputs are computed in fp64 everywhere; every other floating
dtype (fp32, and the 16-bit ones, whose sums would lose too much) accumulates in fp32. One exception, on
CUDA only: Triton passes Python float arguments (MBA's ``lam``, ``lr``, ``eps``) to its kernels as fp32, so
an fp64 table's MBA step there sees those three rounded to fp32; its sums and arithmetic stay fp64."""
import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64, else fp32: the dtype of sums, statistics and optimizer arithmetic for ``dtype`` data."""
    return torch.float64 if dtype == torch.float64 else torch.float32
