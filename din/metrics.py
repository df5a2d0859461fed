"""Evaluation metrics of the DIN paper (Zhou et al., KDD 2018, section 6.3) and the official code.

* :func:`auc` -- area under the ROC curve, computed from average ranks (Mann-Whitney U), so tied
  scores count 1/2 and the cost is one sort, ``O(n log n)``.
* :func:`user_weighted_auc` -- the paper's Eq. 10, ``sum_i n_i * AUC_i / sum_i n_i`` over users ``i``,
  with ``n_i`` the number of samples of user ``i``; users whose samples are all of one class have no
  AUC and are skipped.
* :func:`per_user_auc` -- the plain mean of the per-user AUCs (what the official DIN code reports as
  "GAUC": its test set holds one positive and one negative per user, so every user weighs the same).
* :func:`logloss` -- mean binary cross-entropy with probabilities clipped to ``[eps, 1 - eps]``.
* :func:`rela_impr` -- the paper's RelaImpr, ``(AUC - 0.5) / (AUC_base - 0.5) - 1``.

Every function accepts numpy arrays, Python sequences or torch tensors (any device, any dtype) and
returns a Python ``float``. Per-user AUCs are computed for all users at once with one lexicographic
sort: ranks are taken within each user's block of the sorted arrays, so there is no Python loop over
users or samples.
"""
from __future__ import annotations

from typing import Any, Tuple

import numpy as np

__all__ = ["auc", "user_weighted_auc", "per_user_auc", "logloss", "rela_impr"]


# ----------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------


try:  # float dtypes that Tensor.numpy() supports; others are widened to float32 first
    import torch as _torch

    _NUMPY_FLOATS = (_torch.float16, _torch.float32, _torch.float64)
except ImportError:  # pragma: no cover - torch is a dependency, but metrics need not require it
    _NUMPY_FLOATS = ()


def _as_numpy(values: Any, name: str) -> np.ndarray:
    """Return ``values`` as a 1-D numpy array; torch tensors are detached and moved to the CPU."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # torch.Tensor, without importing torch
        values = values.detach().cpu()
        if values.dtype.is_floating_point and values.dtype not in _NUMPY_FLOATS:
            values = values.float()  # bfloat16 has no numpy counterpart
        values = values.numpy()
    array = np.asarray(values)
    if array.ndim == 0:
        raise ValueError(f"{name} must be a 1-D sequence, got a scalar")
    if array.ndim > 1:
        # [N, 1] columns are common (model outputs); anything wider is a caller's mistake.
        if array.ndim == 2 and array.shape[1] == 1:
            array = array[:, 0]
        else:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(array.shape)}")
    return array


def _labels(labels: Any, name: str = "labels") -> np.ndarray:
    """Binary labels as a bool array; accepts bool, integer or float arrays holding only 0 and 1."""
    array = _as_numpy(labels, name)
    if array.dtype == np.bool_:
        return array
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name} must be numeric or boolean, got dtype {array.dtype}")
    positive = array == 1
    if not np.all(positive | (array == 0)):
        raise ValueError(f"{name} must contain only 0 and 1")
    return positive


def _scores(scores: Any, name: str) -> np.ndarray:
    """Scores as a finite float64 array (NaN would make every rank meaningless)."""
    array = _as_numpy(scores, name)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")
    array = array.astype(np.float64, copy=False)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    return array


def _check_lengths(**arrays: np.ndarray) -> int:
    names = list(arrays)
    n = len(arrays[names[0]])
    for other in names[1:]:
        if len(arrays[other]) != n:
            raise ValueError(
                f"{other} has {len(arrays[other])} elements but {names[0]} has {n}; they must match"
            )
    if n == 0:
        raise ValueError(f"{names[0]} is empty")
    return n


# ----------------------------------------------------------------------------------------------
# global AUC
# ----------------------------------------------------------------------------------------------


def _average_ranks(sorted_values: np.ndarray) -> np.ndarray:
    """1-based ranks of an ascending array, ties replaced by the mean rank of their run."""
    n = len(sorted_values)
    # run boundaries: first index of each run of equal values, plus n
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], n]
    run_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    return np.repeat(run_rank, ends - starts)


def auc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels``.

    Equals the probability that a random positive scores higher than a random negative, ties counting
    1/2 (Mann-Whitney U from average ranks). ``O(n log n)``.

    Raises:
        ValueError: if the lengths differ, the inputs are empty, labels are not 0/1, scores are not
            finite, or only one class is present (AUC is undefined then).
    """
    y = _labels(labels)
    s = _scores(scores, "scores")
    _check_lengths(labels=y, scores=s)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("labels contain only one class; AUC is undefined")
    order = np.argsort(s, kind="stable")
    ranks = _average_ranks(s[order])
    rank_sum = ranks[y[order]].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# ----------------------------------------------------------------------------------------------
# per-user AUC
# ----------------------------------------------------------------------------------------------


def _grouped_auc(users: Any, labels: Any, scores: Any) -> Tuple[np.ndarray, np.ndarray]:
    """AUC and sample count of every user that has both classes.

    One lexicographic sort by (user, score) puts each user's samples in a contiguous block in score
    order; average ranks are then taken within each block, and the Mann-Whitney statistic of every
    user follows from per-user sums (``np.bincount``). ``O(n log n)`` in total.

    Returns:
        ``(aucs, counts)``: float64 arrays over the users with both classes, in ascending user order.
    """
    u = _as_numpy(users, "users")
    y = _labels(labels)
    s = _scores(scores, "scores")
    _check_lengths(users=u, labels=y, scores=s)
    # dense group codes 0..G-1 whatever the user ids are (ints, strings, sparse)
    _, group = np.unique(u, return_inverse=True)
    group = group.reshape(-1)
    order = np.lexsort((s, group))  # by group, then score
    g, s_sorted, y_sorted = group[order], s[order], y[order]
    n = len(g)
    # runs of equal (group, score): ties only within a user count as ties
    new_run = np.r_[True, (g[1:] != g[:-1]) | (s_sorted[1:] != s_sorted[:-1])]
    starts = np.flatnonzero(new_run)
    ends = np.r_[starts[1:], n]
    global_rank = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # 1-based, over all samples
    num_groups = int(g[-1]) + 1
    count = np.bincount(g, minlength=num_groups)
    group_offset = np.r_[0, np.cumsum(count)[:-1]]  # samples of earlier users
    rank = global_rank - group_offset[g]  # 1-based rank within the user's block
    n_pos = np.bincount(g, weights=y_sorted, minlength=num_groups)
    n_neg = count - n_pos
    rank_sum = np.bincount(g, weights=np.where(y_sorted, rank, 0.0), minlength=num_groups)
    valid = (n_pos > 0) & (n_neg > 0)
    aucs = (rank_sum[valid] - n_pos[valid] * (n_pos[valid] + 1) / 2.0) / (n_pos[valid] * n_neg[valid])
    return aucs, count[valid].astype(np.float64)


def user_weighted_auc(users: Any, labels: Any, scores: Any) -> float:
    """User-weighted AUC, paper Eq. 10: ``sum_i n_i * AUC_i / sum_i n_i``.

    ``n_i`` is the number of samples (impressions) of user ``i``; users whose samples all share one
    label have no AUC and are left out of both sums.

    Raises:
        ValueError: for mismatched or empty inputs, or when no user has both classes.
    """
    aucs, counts = _grouped_auc(users, labels, scores)
    if len(aucs) == 0:
        raise ValueError("no user has both a positive and a negative sample; user-weighted AUC is undefined")
    return float(np.dot(aucs, counts) / counts.sum())


def per_user_auc(users: Any, labels: Any, scores: Any) -> float:
    """Unweighted mean of the per-user AUCs (the official DIN code's "GAUC").

    Users with a single class are skipped, as in :func:`user_weighted_auc`.

    Raises:
        ValueError: for mismatched or empty inputs, or when no user has both classes.
    """
    aucs, _ = _grouped_auc(users, labels, scores)
    if len(aucs) == 0:
        raise ValueError("no user has both a positive and a negative sample; per-user AUC is undefined")
    return float(aucs.mean())


# ----------------------------------------------------------------------------------------------
# logloss and RelaImpr
# ----------------------------------------------------------------------------------------------


def logloss(labels: Any, probs: Any, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy ``-mean(y log p + (1 - y) log(1 - p))``.

    Probabilities are clipped to ``[eps, 1 - eps]`` so that a confident mistake costs a large but
    finite amount. Labels may be soft (any value in ``[0, 1]``).

    Raises:
        ValueError: for mismatched or empty inputs, labels outside ``[0, 1]``, probabilities outside
            ``[0, 1]`` or not finite, or ``eps`` outside ``(0, 0.5)``.
    """
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must lie in (0, 0.5), got {eps}")
    y = _scores(labels, "labels")
    p = _scores(probs, "probs")
    _check_lengths(labels=y, probs=p)
    if np.any((y < 0) | (y > 1)):
        raise ValueError("labels must lie in [0, 1]")
    if np.any((p < 0) | (p > 1)):
        raise ValueError("probs must lie in [0, 1] (pass probabilities, not logits)")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def rela_impr(auc: float, base_auc: float) -> float:
    """Relative improvement over a base model, paper section 6.3: ``(auc-0.5)/(base_auc-0.5) - 1``.

    Measured against the random guesser's 0.5, so 0.0 means "as good as the base model" and 0.1
    means "10% further from random".

    Raises:
        ValueError: if ``base_auc`` is 0.5 (the ratio is undefined) or either value is not finite.
    """
    auc, base_auc = float(auc), float(base_auc)
    if not (np.isfinite(auc) and np.isfinite(base_auc)):
        raise ValueError(f"auc and base_auc must be finite, got {auc} and {base_auc}")
    if base_auc == 0.5:
        raise ValueError("base_auc is 0.5 (a random guesser); RelaImpr is undefined")
    return (auc - 0.5) / (base_auc - 0.5) - 1.0
