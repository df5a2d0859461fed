"""Mini-batch aware (MBA) regularisation: sparse row-wise updates whose cost follows the batch, not the table.

For each row j that occurs in the batch, ``w_j <- w_j - lr * (g_j + lam * w_j / n_j)`` with ``n_j`` the
row's frequency in the training set: the gradient of ``lam / 2 * sum_{j in batch} ||w_j||^2 / n_j``.
"""
from __future__ import annotations

import torch

from . import reference
from ._checks import check_ids, check_inv_freq, check_mba_step_args, check_nonnegative_finite, check_table

Tensor = torch.Tensor


def mba_embedding(ids: Tensor, weight: Tensor, inv_freq: Tensor, lam: float) -> Tensor:
    """``weight[ids]`` whose weight gradient is sparse (unique rows) and carries the MBA term once per row."""
    check_table(weight)
    check_ids(ids, weight.shape[0])
    check_inv_freq(inv_freq, weight, ids)
    lam = check_nonnegative_finite("lam", lam)
    return reference.mba_embedding(ids, weight, inv_freq, lam)


def mba_sgd_(weight: Tensor, ids: Tensor, grad_rows: Tensor, inv_freq: Tensor, lr: float, lam: float) -> Tensor:
    """In place: ``w_j -= lr * (g_j + lam * inv_freq[j] * w_j)`` for the unique ids j; other rows untouched."""
    lr, lam = check_mba_step_args(weight, ids, grad_rows, inv_freq, lr, lam)
    return reference.mba_sgd_(weight, ids.reshape(-1), grad_rows, inv_freq, lr, lam)


def mba_adagrad_(weight: Tensor, state: Tensor, ids: Tensor, grad_rows: Tensor, inv_freq: Tensor,
                 lr: float, lam: float, eps: float = 1e-10) -> Tensor:
    """In place row-wise Adagrad with the MBA term (see ``reference.mba_adagrad_``)."""
    lr, lam = check_mba_step_args(weight, ids, grad_rows, inv_freq, lr, lam, state=state)
    eps = check_nonnegative_finite("eps", eps)
    return reference.mba_adagrad_(weight, state, ids.reshape(-1), grad_rows, inv_freq, lr, lam, eps)


def row_frequencies(ids: Tensor, num_rows: int) -> Tensor:
    """``n_j`` counts over a training set's ids (any shape).  -> [num_rows] int64"""
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows <= 0:
        raise ValueError(f"num_rows must be a positive int, got {num_rows!r}")
    check_ids(ids, num_rows)
    return reference.row_frequencies(ids, num_rows)
