"""Dice activation (paper Eq. 7): Triton kernels, torch composite path, functional op and module.

For x [N, C] (or [B, T, C] with a mask [B, T], True = valid, seen as N = B*T rows) and each channel:

    mean = sum_{r valid} x_r / n,   var = sum_{r valid} (x_r - mean)^2 / n       (biased, valid rows only)
    rstd = 1 / sqrt(var + eps),     xhat = (x - mean) * rstd                       (every row)
    p = sigmoid(w * xhat + b)       (w = 1, b = 0 without the affine map)
    y = p * x + (1 - p) * alpha * x = x * (alpha + (1 - alpha) * p)

Training uses the batch statistics and updates ``running_mean``/``running_var`` as ``nn.BatchNorm1d`` does
(unbiased variance, ``momentum``; nothing when no row is valid); eval uses the running statistics.
Padded rows get an output computed with the statistics, but never enter them.

Backward, with ``dz = dy * x * (1 - alpha) * p * (1 - p)`` (the gradient of w * xhat + b), ``dxhat = w * dz``
and sums over every row (padding too: its outputs depend on the statistics):

    dalpha = sum dy * x * (1 - p),   dbias = sum dz,   dweight = sum dz * xhat
    dx = dy * (alpha + (1 - alpha) * p) + rstd * (dxhat - [valid] * (sum dxhat + xhat * sum dxhat * xhat) / n)

(eval: no term through the statistics). The batch-norm term reaches the valid rows only.

Triton forward: ``_dice_stats_kernel`` reduces each chunk of rows to (count, mean, M2) per channel of x
shifted by one valid row, tile by tile with Chan's merge (tile mean first, then the centred sum of squares:
offsets of 1e4 do not cancel, constant channels come out exact); ``_dice_merge_kernel`` merges the chunks
in a fixed order (deterministic, no atomics), writes mean/var and updates the running statistics;
``_dice_fwd_kernel`` is the fused elementwise pass. Eval is the elementwise pass alone. Triton backward:
``_dice_bwd_kernel`` reduces the three per-channel sums in per-chunk partials (eval: also writes dx), a
fixed-order sum merges them, ``_dice_bwd_dx_kernel`` is the elementwise dx pass. Statistics and
accumulation are fp32 for fp16/bf16/fp32 inputs (fp64 for fp64). Memory: nothing [N, C] is saved but x.

On CPU (without the interpreter) the C++ op ``csrc/dice_cpu.cpp`` runs the same algebra, one pass a
loop over a chunk of rows, for fp32/fp64 (``_dice_cpp_takes``); the torch composite path (the same algebra
chunk by chunk with torch ops and a hand-written backward) is the fallback: other dtypes, no C++ op built,
or ``set_backend("torch")``.

Under ``torch.compile`` / ``torch.export``, eval-mode calls go through the custom op
``torch.ops.din_kernels.dice_eval`` (a fake kernel for tracing; its implementation runs the same launchers,
so compiled and exported programs give the eager results; gradients by a torch-op formula). Training-mode
calls are not covered (the statistics' valid-row count is read on the host).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import cpu_extension
from ._backend import select_path
from ._checks import check_dice_args, check_momentum_eps
from ._dtypes import accumulation_dtype

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (macOS, Windows): the torch path runs, the kernels are never launched
    triton = tl = None

Tensor = torch.Tensor


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


# ----------------------------------------------------------------------------------------------------
# Triton kernels. Every kernel walks a chunk of `rows_per_prog` rows (a multiple of BLOCK_N) in tiles of
# [BLOCK_N, BLOCK_C]; grid = (row chunks, channel blocks). x is [N, C] contiguous.
# ----------------------------------------------------------------------------------------------------


@_jit
def _dice_stats_kernel(
    X,  # [N, C]
    MASK,  # [N] uint8, 1 = valid (read only with HAS_MASK)
    PIVOT,  # [C] one valid row of x, in the accumulation dtype
    COUNT_P,  # [P] int32: valid rows of each chunk
    MEAN_P,  # [P, C] chunk means of x - pivot (fp32, fp64 for fp64 x)
    M2_P,  # [P, C] chunk sums of squared deviations from the chunk mean
    N, C, rows_per_prog,
    HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Per chunk of rows and channel, over the valid rows of ``s = x - pivot``: ``n = #valid``,
    ``mean = sum s / n``, ``M2 = sum (s - mean)^2``. Each tile gives (n_t, mean_t, M2_t) by two passes over
    registers; Chan's rule merges: ``d = mean_t - mean``, ``mean += d * n_t / (n + n_t)``,
    ``M2 += M2_t + d^2 * n * n_t / (n + n_t)``. The shift by a data row keeps the sums small whatever the
    offset, and makes a constant channel exact: s = 0, mean = pivot, var = 0."""
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    acc_ty = MEAN_P.dtype.element_ty
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    row_start = pid_n * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, N)
    pivot = tl.load(PIVOT + cols, mask=col_ok, other=0.0)
    count = tl.full([], 0, tl.int32)  # valid rows so far (exact, unlike a float count)
    mean = tl.zeros([BLOCK_C], dtype=acc_ty)
    m2 = tl.zeros([BLOCK_C], dtype=acc_ty)
    for start in range(row_start, row_end, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        valid = rows < row_end
        if HAS_MASK:
            valid = valid & (tl.load(MASK + rows, mask=valid, other=0) != 0)
        offs = rows[:, None].to(tl.int64) * C + cols[None, :]
        ok = valid[:, None] & col_ok[None, :]
        x = tl.load(X + offs, mask=ok, other=0.0).to(acc_ty)  # [BLOCK_N, BLOCK_C]
        x = tl.where(ok, x - pivot[None, :], 0.0)
        n_t = tl.sum(valid.to(tl.int32), axis=0)
        n_t_f = n_t.to(acc_ty)
        mean_t = tl.sum(x, axis=0) / tl.maximum(n_t_f, 1.0)
        dev = tl.where(valid[:, None], x - mean_t[None, :], 0.0)
        m2_t = tl.sum(dev * dev, axis=0)
        total = count + n_t
        frac = n_t_f / tl.maximum(total.to(acc_ty), 1.0)  # 0 for an all-padding tile: nothing changes
        delta = mean_t - mean
        mean += delta * frac
        m2 += m2_t + delta * delta * count.to(acc_ty) * frac
        count = total
    part = pid_n.to(tl.int64) * C + cols
    tl.store(MEAN_P + part, mean, mask=col_ok)
    tl.store(M2_P + part, m2, mask=col_ok)
    tl.store(COUNT_P + pid_n, count, mask=pid_c == 0)


@_jit
def _dice_merge_kernel(
    COUNT_P, MEAN_P, M2_P,  # [P], [P, C], [P, C] from _dice_stats_kernel
    PIVOT,  # [C] the shift of _dice_stats_kernel
    MEAN, VAR,  # [C] out: batch mean and biased variance
    COUNT,  # [1] int32 out: valid rows
    RUNNING_MEAN, RUNNING_VAR,  # [C], updated in place with HAS_RUNNING
    P, C, momentum,
    HAS_RUNNING: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Merge the chunk statistics in chunk order (Chan's rule on [BLOCK_P] groups), then
    ``var = M2 / n``; with running statistics and n > 0 (nn.BatchNorm1d's update, unbiased variance):
    ``running_mean = (1 - m) * running_mean + m * mean``,
    ``running_var = (1 - m) * running_var + m * var * n / max(n - 1, 1)``."""
    pid_c = tl.program_id(0)
    acc_ty = MEAN.dtype.element_ty
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    count = tl.full([], 0, tl.int32)  # valid rows so far (exact, unlike a float count)
    mean = tl.zeros([BLOCK_C], dtype=acc_ty)
    m2 = tl.zeros([BLOCK_C], dtype=acc_ty)
    for start in range(0, P, BLOCK_P):
        parts = start + tl.arange(0, BLOCK_P)
        part_ok = parts < P
        n_p = tl.load(COUNT_P + parts, mask=part_ok, other=0)  # [BLOCK_P] int32
        n_p_f = n_p.to(acc_ty)
        offs = parts[:, None].to(tl.int64) * C + cols[None, :]
        both = part_ok[:, None] & col_ok[None, :]
        mean_p = tl.load(MEAN_P + offs, mask=both, other=0.0)  # [BLOCK_P, BLOCK_C]
        m2_p = tl.load(M2_P + offs, mask=both, other=0.0)
        n_t = tl.sum(n_p, axis=0)
        n_t_f = n_t.to(acc_ty)
        mean_t = tl.sum(n_p_f[:, None] * mean_p, axis=0) / tl.maximum(n_t_f, 1.0)
        dev = mean_p - mean_t[None, :]
        m2_t = tl.sum(m2_p + n_p_f[:, None] * dev * dev, axis=0)
        total = count + n_t
        frac = n_t_f / tl.maximum(total.to(acc_ty), 1.0)
        delta = mean_t - mean
        mean += delta * frac
        m2 += m2_t + delta * delta * count.to(acc_ty) * frac
        count = total
    count_f = count.to(acc_ty)
    var = m2 / tl.maximum(count_f, 1.0)
    mean = tl.where(count > 0, mean + tl.load(PIVOT + cols, mask=col_ok, other=0.0), 0.0)
    tl.store(MEAN + cols, mean, mask=col_ok)
    tl.store(VAR + cols, var, mask=col_ok)
    tl.store(COUNT + pid_c * 0, count, mask=pid_c == 0)
    if HAS_RUNNING:
        # A batch with no valid row leaves the running statistics alone ([BLOCK_C] mask: a scalar one
        # trips the interpreter).
        update = col_ok & ((cols * 0 + count) > 0)
        unbiased = var * (count_f / tl.maximum(count_f - 1.0, 1.0))
        r_mean = tl.load(RUNNING_MEAN + cols, mask=col_ok, other=0.0)
        r_var = tl.load(RUNNING_VAR + cols, mask=col_ok, other=1.0)
        new_mean = r_mean.to(acc_ty) * (1.0 - momentum) + momentum * mean
        new_var = r_var.to(acc_ty) * (1.0 - momentum) + momentum * unbiased
        tl.store(RUNNING_MEAN + cols, new_mean.to(RUNNING_MEAN.dtype.element_ty), mask=update)
        tl.store(RUNNING_VAR + cols, new_var.to(RUNNING_VAR.dtype.element_ty), mask=update)


@_jit
def _load_channel_params(MEAN, VAR, ALPHA, W, B, cols, col_ok, eps, acc_ty: tl.constexpr,
                         ALPHA_PER_CHANNEL: tl.constexpr, AFFINE: tl.constexpr):
    """Per-channel vectors [BLOCK_C]: mean, rstd = 1 / sqrt(var + eps), alpha, w, b (w = 1, b = 0 without affine)."""
    mean = tl.load(MEAN + cols, mask=col_ok, other=0.0).to(acc_ty)
    var = tl.load(VAR + cols, mask=col_ok, other=1.0).to(acc_ty)
    rstd = 1.0 / tl.sqrt(var + eps)
    if ALPHA_PER_CHANNEL:
        alpha = tl.load(ALPHA + cols, mask=col_ok, other=0.0).to(acc_ty)
    else:
        alpha = tl.zeros_like(mean) + tl.load(ALPHA).to(acc_ty)
    if AFFINE:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(acc_ty)
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(acc_ty)
    else:
        w = tl.zeros_like(mean) + 1.0
        b = tl.zeros_like(mean)
    return mean, rstd, alpha, w, b


@_jit
def _dice_fwd_kernel(
    X,  # [N, C]
    Y,  # [N, C], the output dtype
    MEAN, VAR,  # [C]: batch statistics (training) or the running ones (eval)
    ALPHA,  # [C] or [1]
    W, B,  # [C] each, read only with AFFINE
    N, C, rows_per_prog, eps,
    ALPHA_PER_CHANNEL: tl.constexpr,
    AFFINE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``y = x * (alpha + (1 - alpha) * p)``, ``p = sigmoid(w * (x - mean) * rstd + b)``, every row."""
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    acc_ty: tl.constexpr = MEAN.dtype.element_ty  # the launcher hands fp32 statistics (fp64 for fp64 x)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mean, rstd, alpha, w, b = _load_channel_params(MEAN, VAR, ALPHA, W, B, cols, col_ok, eps, acc_ty,
                                                   ALPHA_PER_CHANNEL, AFFINE)
    row_start = pid_n * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, N)
    for start in range(row_start, row_end, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        ok = (rows < row_end)[:, None] & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * C + cols[None, :]
        x = tl.load(X + offs, mask=ok, other=0.0).to(acc_ty)  # [BLOCK_N, BLOCK_C]
        # subtract first: no cancellation for large offsets; lanes out of range stay 0 (no exp overflow)
        xhat = tl.where(ok, (x - mean[None, :]) * rstd[None, :], 0.0)
        p = tl.sigmoid(xhat * w[None, :] + b[None, :])
        y = x * (alpha[None, :] + (1.0 - alpha[None, :]) * p)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=ok)


@_jit
def _dice_bwd_kernel(
    X, DY,  # [N, C]
    DX,  # [N, C], written only with WRITE_DX
    MEAN, VAR, ALPHA, W, B,  # as in _dice_fwd_kernel
    PART,  # [P, 3, C] out, accumulation dtype
    N, C, rows_per_prog, eps,
    ALPHA_PER_CHANNEL: tl.constexpr,
    AFFINE: tl.constexpr,
    WRITE_DX: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Per-chunk sums over every row (padding included: its output depends on the statistics too), with
    ``dz = dy * x * (1 - alpha) * p * (1 - p)`` the gradient of ``z = w * xhat + b``:
    ``PART[0] = sum dz`` (= dbias), ``PART[1] = sum dz * xhat`` (= dweight),
    ``PART[2] = sum dy * x * (1 - p)`` (= dalpha).
    With WRITE_DX (eval: constant statistics), also ``dx = dy * (alpha + (1 - alpha) * p) + dz * w * rstd``."""
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    acc_ty: tl.constexpr = PART.dtype.element_ty
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mean, rstd, alpha, w, b = _load_channel_params(MEAN, VAR, ALPHA, W, B, cols, col_ok, eps, acc_ty,
                                                   ALPHA_PER_CHANNEL, AFFINE)
    sum_dz = tl.zeros([BLOCK_C], dtype=acc_ty)
    sum_dz_xhat = tl.zeros([BLOCK_C], dtype=acc_ty)
    sum_dalpha = tl.zeros([BLOCK_C], dtype=acc_ty)
    row_start = pid_n * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, N)
    for start in range(row_start, row_end, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        ok = (rows < row_end)[:, None] & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * C + cols[None, :]
        x = tl.load(X + offs, mask=ok, other=0.0).to(acc_ty)  # out of range: x = dy = 0, adds nothing
        dy = tl.load(DY + offs, mask=ok, other=0.0).to(acc_ty)
        xhat = tl.where(ok, (x - mean[None, :]) * rstd[None, :], 0.0)
        p = tl.sigmoid(xhat * w[None, :] + b[None, :])
        gx = dy * x
        dz = gx * (1.0 - alpha[None, :]) * p * (1.0 - p)
        sum_dz += tl.sum(dz, axis=0)
        sum_dz_xhat += tl.sum(dz * xhat, axis=0)
        sum_dalpha += tl.sum(gx * (1.0 - p), axis=0)
        if WRITE_DX:
            dx = dy * (alpha[None, :] + (1.0 - alpha[None, :]) * p) + dz * (w * rstd)[None, :]
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=ok)
    part = pid_n.to(tl.int64) * 3 * C + cols
    tl.store(PART + part, sum_dz, mask=col_ok)
    tl.store(PART + part + C, sum_dz_xhat, mask=col_ok)
    tl.store(PART + part + 2 * C, sum_dalpha, mask=col_ok)


@_jit
def _dice_bwd_dx_kernel(
    X, DY, DX,  # [N, C]
    MASK,  # [N] uint8 (read only with HAS_MASK)
    MEAN, VAR, ALPHA, W, B,
    SUMS,  # [3, C]: sum dz, sum dz * xhat, sum dy * x * (1 - p) over every row
    COUNT,  # [1] int32: valid rows n
    N, C, rows_per_prog, eps,
    ALPHA_PER_CHANNEL: tl.constexpr,
    AFFINE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Training dx: with ``dxhat = w * dz``, the batch-norm gradient through mean and variance reaches the
    valid rows only: ``dx = dy * (alpha + (1 - alpha) * p) + rstd * (dxhat - [valid] * (S1 + xhat * S2) / n)``,
    ``S1 = w * sum dz``, ``S2 = w * sum dz * xhat``."""
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    acc_ty: tl.constexpr = SUMS.dtype.element_ty
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mean, rstd, alpha, w, b = _load_channel_params(MEAN, VAR, ALPHA, W, B, cols, col_ok, eps, acc_ty,
                                                   ALPHA_PER_CHANNEL, AFFINE)
    inv_n = 1.0 / tl.maximum(tl.load(COUNT).to(acc_ty), 1.0)
    s1_n = w * tl.load(SUMS + cols, mask=col_ok, other=0.0) * inv_n  # S1 / n
    s2_n = w * tl.load(SUMS + C + cols, mask=col_ok, other=0.0) * inv_n  # S2 / n
    row_start = pid_n * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, N)
    for start in range(row_start, row_end, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        row_ok = rows < row_end
        ok = row_ok[:, None] & col_ok[None, :]
        if HAS_MASK:
            valid = (tl.load(MASK + rows, mask=row_ok, other=0) != 0).to(acc_ty)
        else:
            valid = row_ok.to(acc_ty)
        offs = rows[:, None].to(tl.int64) * C + cols[None, :]
        x = tl.load(X + offs, mask=ok, other=0.0).to(acc_ty)
        dy = tl.load(DY + offs, mask=ok, other=0.0).to(acc_ty)
        xhat = tl.where(ok, (x - mean[None, :]) * rstd[None, :], 0.0)
        p = tl.sigmoid(xhat * w[None, :] + b[None, :])
        dz = dy * x * (1.0 - alpha[None, :]) * p * (1.0 - p)
        through_stats = valid[:, None] * (s1_n[None, :] + xhat * s2_n[None, :])
        dx = dy * (alpha[None, :] + (1.0 - alpha[None, :]) * p) + rstd[None, :] * (dz * w[None, :] - through_stats)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _launch_config(n_rows: int, channels: int, device: torch.device) -> Tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_C, rows_per_prog, row chunks, num_warps). On a GPU about four programs per SM, each
    looping over its rows; under the interpreter (~26 ms per program) a handful of programs."""
    block_c = min(triton.next_power_of_2(channels), 128)
    col_blocks = triton.cdiv(channels, block_c)
    if device.type == "cuda":
        block_n = max(8, 4096 // block_c)
        target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        num_warps = 4
    else:
        block_n, target, num_warps = 16, 4, 1
    row_blocks = max(triton.cdiv(n_rows, block_n), 1)
    chunks = max(1, min(row_blocks, triton.cdiv(target, col_blocks)))
    rows_per_prog = triton.cdiv(row_blocks, chunks) * block_n
    chunks = max(triton.cdiv(n_rows, rows_per_prog), 1)
    return block_n, block_c, rows_per_prog, chunks, num_warps


def dice_forward(x: Tensor, alpha: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 running_mean: Optional[Tensor], running_var: Optional[Tensor], mask: Optional[Tensor],
                 training: bool, momentum: float, eps: float, out_dtype: torch.dtype):
    """Triton forward. x [N, C] contiguous, mask [N] bool or None, alpha [C] or [1] contiguous.
    Returns (y [N, C] out_dtype, mean [C], var [C], count [1] int32); running statistics updated in place."""
    n_rows, channels = x.shape
    acc = accumulation_dtype(x.dtype)
    y = torch.empty((n_rows, channels), dtype=out_dtype, device=x.device)
    block_n, block_c, rows_per_prog, chunks, num_warps = _launch_config(n_rows, channels, x.device)
    col_blocks = triton.cdiv(channels, block_c)
    if training:
        mask_u8 = mask.view(torch.uint8) if mask is not None else x  # a placeholder pointer without a mask
        # Shift by the first valid row (row 0 when none is valid: then nothing is summed at all).
        # (argmax has no answer for zero rows: then the pivot is zeros and nothing is summed)
        first = mask.view(torch.uint8).argmax().reshape(1) if mask is not None and n_rows else None
        if n_rows == 0:
            pivot = torch.zeros(channels, dtype=acc, device=x.device)
        elif first is None:
            pivot = x[0].to(acc)
        else:
            pivot = x.index_select(0, first)[0].to(acc)
        count_p = torch.empty(chunks, dtype=torch.int32, device=x.device)
        mean_p = torch.empty((chunks, channels), dtype=acc, device=x.device)
        m2_p = torch.empty((chunks, channels), dtype=acc, device=x.device)
        _dice_stats_kernel[(chunks, col_blocks)](
            x, mask_u8, pivot, count_p, mean_p, m2_p, n_rows, channels, rows_per_prog,
            HAS_MASK=mask is not None, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps,
        )
        mean = torch.empty(channels, dtype=acc, device=x.device)
        var = torch.empty(channels, dtype=acc, device=x.device)
        count = torch.empty(1, dtype=torch.int32, device=x.device)
        has_running = running_mean is not None
        # The kernel updates [C] vectors of stride 1: strided running statistics go through a copy.
        r_mean = running_mean.contiguous() if has_running else mean
        r_var = running_var.contiguous() if has_running else var
        _dice_merge_kernel[(col_blocks,)](
            count_p, mean_p, m2_p, pivot, mean, var, count, r_mean, r_var, chunks, channels, float(momentum),
            HAS_RUNNING=has_running, BLOCK_P=min(triton.next_power_of_2(chunks), 32), BLOCK_C=block_c,
            num_warps=num_warps,
        )
        if has_running and r_mean.data_ptr() != running_mean.data_ptr():
            running_mean.copy_(r_mean)
        if has_running and r_var.data_ptr() != running_var.data_ptr():
            running_var.copy_(r_var)
    else:
        # Copies: the running statistics may be updated in place before this backward runs.
        mean = running_mean.to(acc, copy=True)
        var = running_var.to(acc, copy=True)
        count = None
    if n_rows > 0:
        affine = weight is not None
        _dice_fwd_kernel[(chunks, col_blocks)](
            x, y, mean, var, alpha, weight if affine else alpha, bias if affine else alpha,
            n_rows, channels, rows_per_prog, float(eps),
            ALPHA_PER_CHANNEL=alpha.numel() > 1, AFFINE=affine, BLOCK_N=block_n, BLOCK_C=block_c,
            num_warps=num_warps,
        )
    return y, mean, var, count


def dice_backward(dy: Tensor, x: Tensor, alpha: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  mask: Optional[Tensor], mean: Tensor, var: Tensor, count: Optional[Tensor], training: bool,
                  eps: float, need_dx: bool):
    """Triton backward. Returns (dx [N, C] in x's dtype or None, sums [3, C]: dbias, dweight, dalpha
    before reshaping to the parameters)."""
    n_rows, channels = x.shape
    acc = accumulation_dtype(x.dtype)
    dy = dy.contiguous()
    block_n, block_c, rows_per_prog, chunks, num_warps = _launch_config(n_rows, channels, x.device)
    col_blocks = triton.cdiv(channels, block_c)
    affine = weight is not None
    params = (mean, var, alpha, weight if affine else alpha, bias if affine else alpha)
    flags = dict(ALPHA_PER_CHANNEL=alpha.numel() > 1, AFFINE=affine, BLOCK_N=block_n, BLOCK_C=block_c,
                 num_warps=num_warps)
    dx = torch.empty_like(x) if need_dx else None
    write_dx = need_dx and not training  # eval: no path through the statistics, one pass does it all
    part = torch.empty((chunks, 3, channels), dtype=acc, device=x.device)
    _dice_bwd_kernel[(chunks, col_blocks)](
        x, dy, dx if write_dx else x, *params, part, n_rows, channels, rows_per_prog, float(eps),
        WRITE_DX=write_dx, **flags,
    )
    sums = part.sum(dim=0)  # [3, C]: a fixed-order reduction, deterministic
    if need_dx and training and n_rows > 0:
        _dice_bwd_dx_kernel[(chunks, col_blocks)](
            x, dy, dx, mask.view(torch.uint8) if mask is not None else x, *params, sums, count,
            n_rows, channels, rows_per_prog, float(eps), HAS_MASK=mask is not None, **flags,
        )
    return dx, sums


# ----------------------------------------------------------------------------------------------------
# Torch composite path: the same algebra with fused torch ops (CPU users, or backend "torch").
# ----------------------------------------------------------------------------------------------------


# The composite path works on chunks of rows (about _chunk_elements() elements) with scratch buffers
# reused across chunks: a handful of [R, C] temporaries per call instead of fresh [N, C] ones, whose first
# touch (page faults) costs more than the math on the 2-core benchmark machine. Chunks stay large because
# every op on a chunk is one parallel region: on a machine where other processes hold the cores, each
# region's barrier can wait a scheduler slice, so the op count, not cache locality, decides there
# (measured: 256K-element chunks ~10% faster than 4M ones when idle, several times slower when busy).
def _chunk_elements() -> int:
    return max(1 << 22, (1 << 18) * torch.get_num_threads())


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _scratch(chunks, channels: int, dtype: torch.dtype, device: torch.device, slots: Optional[int] = None):
    """One chunk's worth of scratch, [R, C] (or [R, slots, C]), reused by every chunk of a call."""
    rows = max((end - start for start, end in chunks), default=1)
    shape = (rows, channels) if slots is None else (rows, slots, channels)
    return torch.empty(shape, dtype=dtype, device=device)


def _row_chunks(n_rows: int, channels: int):
    step = max(1, _chunk_elements() // channels)
    return [(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def _batch_stats_torch(x: Tensor, mask: Optional[Tensor], acc: torch.dtype, chunks):
    """(mean [C], biased var [C], count) over the valid rows of x [N, C]. Per chunk, the mean and the
    centred sum of squares of ``s = x - pivot`` over its valid rows (pivot: the first valid row, so that
    sums stay small whatever the offset and a constant channel gives exactly 0); Chan's rule merges the
    chunks in chunk order. (``torch.batch_norm_update_stats`` would do a chunk in one call, but it sums
    naively and opens a parallel region per call even for tiny inputs: 30 ms on a busy 2-core machine.)"""
    n_rows, channels = x.shape
    if mask is None:
        count, first = n_rows, 0
    else:
        count = int(mask.sum())
        first = int(mask.to(torch.uint8).argmax()) if count > 0 else 0
    if count == 0:  # nothing valid: any finite statistics do, the outputs are all padding
        zeros = torch.zeros(channels, dtype=acc, device=x.device)
        return zeros, zeros.clone(), 0
    pivot = _as(x[first], acc)
    invalid = ~mask[:, None] if mask is not None else None
    scratch = _scratch(chunks, channels, acc, x.device)
    counts, means, m2s = [], [], []
    for start, end in chunks:
        n = end - start if invalid is None else int(mask[start:end].sum())
        if n == 0:
            continue
        shifted = torch.sub(_as(x[start:end], acc), pivot, out=scratch[: end - start])
        if invalid is not None:
            shifted.masked_fill_(invalid[start:end], 0.0)  # fill, not multiply: padding may hold inf
        chunk_mean = shifted.sum(dim=0).div_(n)
        centred = shifted.sub_(chunk_mean)
        if invalid is not None:
            centred.masked_fill_(invalid[start:end], 0.0)
        means.append(chunk_mean)
        m2s.append(centred.mul_(centred).sum(dim=0))
        counts.append(float(n))
    if len(counts) == 1:
        return means[0] + pivot, m2s[0] / count, count
    n_k = torch.tensor(counts, dtype=acc, device=x.device)[:, None]  # [K, 1]
    means, m2s = torch.stack(means), torch.stack(m2s)  # [K, C]
    shifted_mean = (n_k * means).sum(dim=0) / count
    m2 = (m2s + n_k * (means - shifted_mean).square()).sum(dim=0)
    return shifted_mean + pivot, m2 / count, count


def _update_running(running_mean: Optional[Tensor], running_var: Optional[Tensor], mean: Tensor, var: Tensor,
                    count: int, momentum: float) -> None:
    """``nn.BatchNorm1d``'s update from the batch statistics (unbiased variance); nothing without valid rows."""
    if running_mean is not None and count > 0:
        with torch.no_grad():
            unbiased = var * (count / max(count - 1, 1))
            running_mean.mul_(1.0 - momentum).add_(momentum * mean.to(running_mean.dtype))
            running_var.mul_(1.0 - momentum).add_(momentum * unbiased.to(running_var.dtype))


def _dice_cpp_takes(x: Tensor, out_dtype: torch.dtype) -> bool:
    """The C++ op takes fp32/fp64 inputs whose result keeps x's dtype (parameters cast to it)."""
    return x.dtype in (torch.float32, torch.float64) and out_dtype == x.dtype


def _dice_forward_cpp(x: Tensor, alpha: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      running_mean: Optional[Tensor], running_var: Optional[Tensor], mask: Optional[Tensor],
                      training: bool, momentum: float, eps: float):
    """The C++ forward; the contract of ``_dice_forward_torch``: (y [N, C], mean [C], rstd [C], count)."""
    dtype, channels = x.dtype, x.shape[1]
    cast = (lambda t: None if t is None else _as(t, dtype).contiguous())  # noqa: E731
    stats = (None, None) if training else (cast(running_mean), cast(running_var))
    y, mean, var, rstd, count = cpu_extension.ops().dice_fwd(
        x, cast(alpha.expand(channels)), cast(weight), cast(bias), mask, *stats, training, eps,
        cpu_extension.threads())
    if training:
        _update_running(running_mean, running_var, mean, var, count, momentum)
    return y, mean, rstd, count


def _dice_backward_cpp(dy: Tensor, x: Tensor, alpha: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                       mask: Optional[Tensor], mean: Tensor, rstd: Tensor, count: int, training: bool,
                       need_dx: bool):
    """The C++ backward; the contract of ``_dice_backward_torch``: (dx or None, sums [3, C])."""
    dtype, channels = x.dtype, x.shape[1]
    cast = (lambda t: None if t is None else _as(t, dtype).contiguous())  # noqa: E731
    dx, sums = cpu_extension.ops().dice_bwd(
        cast(dy), x, cast(alpha.expand(channels)), cast(weight), cast(bias), mask, mean, rstd, count, training,
        need_dx, cpu_extension.threads())
    return (dx if need_dx else None), sums


def _dice_forward_torch(x: Tensor, alpha: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        running_mean: Optional[Tensor], running_var: Optional[Tensor], mask: Optional[Tensor],
                        training: bool, momentum: float, eps: float, out_dtype: torch.dtype):
    """Torch forward, chunk by chunk of rows. Returns (y [N, C], mean [C], rstd [C], count); p is not kept
    (the backward recomputes it: cheaper than a fresh [N, C] buffer)."""
    acc = accumulation_dtype(x.dtype)
    n_rows, channels = x.shape
    chunks = _row_chunks(n_rows, channels)
    if training:
        mean, var, count = _batch_stats_torch(x, mask, acc, chunks)
        _update_running(running_mean, running_var, mean, var, count, momentum)
    else:
        # a copy: the running statistics may be updated in place before this output's backward runs
        mean, var, count = running_mean.to(acc, copy=True), _as(running_var, acc), 0
    rstd = torch.rsqrt(var + eps)
    scale = rstd if weight is None else rstd * _as(weight, acc)
    shift = None if bias is None else _as(bias, acc)
    a = _as(alpha, acc)
    one_minus_a = 1.0 - a
    y = torch.empty((n_rows, channels), dtype=out_dtype, device=x.device)
    scratch = _scratch(chunks, channels, acc, x.device)
    for start, end in chunks:
        xc = _as(x[start:end], acc)
        z = torch.sub(xc, mean, out=scratch[: end - start])  # subtract first: no cancellation for large offsets
        p = (z.mul_(scale) if shift is None else torch.addcmul(shift, z, scale, out=z)).sigmoid_()
        if out_dtype == acc:
            torch.addcmul(a, p, one_minus_a, out=y[start:end]).mul_(xc)  # x * (alpha + (1 - alpha) * p)
        else:
            y[start:end].copy_(torch.addcmul(a, p, one_minus_a, out=p).mul_(xc))
    return y, mean, rstd, count


def _dice_backward_torch(dy: Tensor, x: Tensor, alpha: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                         mask: Optional[Tensor], mean: Tensor, rstd: Tensor, count: int, training: bool,
                         need_dx: bool):
    """The sums of ``_dice_bwd_kernel`` and the dx of ``_dice_bwd_dx_kernel``, chunk by chunk.
    Returns (dx [N, C] in x's dtype or None, sums [3, C]: sum dz, sum dz * xhat, dalpha)."""
    acc = rstd.dtype
    n_rows, channels = x.shape
    chunks = _row_chunks(n_rows, channels)
    a = _as(alpha, acc)
    one_minus_a = 1.0 - a
    w = _as(weight, acc) if weight is not None else None
    b = _as(bias, acc) if bias is not None else None
    dxhat_scale = one_minus_a * rstd if w is None else one_minus_a * rstd * w  # dx += rstd * w * dz
    # dz = (1 - alpha) * dzp, dzp = dy * x * p * (1 - p). Per chunk, column sums of dy * x * (1 - p), dzp and
    # dzp * xhat (xhat formed explicitly: sum dzp * x - mean * sum dzp would cancel for large offsets).
    sums = torch.zeros(3, channels, dtype=acc, device=x.device)
    # fp32 (fp64) dx: the statistics term is added in a second pass and rounded once at the end
    dx = torch.empty((n_rows, channels), dtype=acc, device=x.device) if need_dx else None
    work = _scratch(chunks, channels, acc, x.device, slots=3)  # [R, (dzp, dzp * xhat, dy * x * (1 - p)), C]
    xhat_buf, p_buf = _scratch(chunks, channels, acc, x.device), _scratch(chunks, channels, acc, x.device)
    for start, end in chunks:
        xc, gc = _as(x[start:end], acc), _as(dy[start:end], acc)
        buf, xhat, p = work[: end - start], xhat_buf[: end - start], p_buf[: end - start]
        dzp, dzp_xhat, da = buf.unbind(dim=1)
        torch.sub(xc, mean, out=xhat).mul_(rstd)
        torch.sigmoid(xhat, out=p) if w is None else torch.addcmul(b, xhat, w, out=p).sigmoid_()
        torch.mul(gc, xc, out=da)
        torch.ops.aten.sigmoid_backward(da, p, grad_input=dzp)  # dy * x * p * (1 - p)
        da.addcmul_(da, p, value=-1.0)  # dy * x * (1 - p)
        torch.mul(dzp, xhat, out=dzp_xhat)
        sums += buf.sum(dim=0)
        if need_dx:  # dy * (alpha + (1 - alpha) * p) + rstd * w * dz
            gated = torch.addcmul(a, p, one_minus_a, out=p).mul_(gc)
            torch.addcmul(gated, dzp, dxhat_scale, out=dx[start:end])
    if need_dx and training and count > 0:
        # - rstd / n * (S1 + xhat * S2) on the valid rows (S1 = w * sum dz, S2 = w * sum dz * xhat), as
        # (x - mean) * k1 + k0 per channel; k0 shares the direct term's factor, so that a single row cancels
        # as in the reference.
        k0 = -dxhat_scale * sums[0] / count
        k1 = -rstd * dxhat_scale * sums[1] / count
        valid = _as(mask[:, None], acc) if mask is not None else None
        for start, end in chunks:
            centred = torch.sub(_as(x[start:end], acc), mean, out=xhat_buf[: end - start])
            if valid is None:
                dx[start:end].addcmul_(centred, k1).add_(k0)
            else:
                dx[start:end].addcmul_(torch.addcmul(k0, centred, k1), valid[start:end])
    dx = dx.to(x.dtype) if need_dx else None
    return dx, torch.stack([one_minus_a * sums[0], one_minus_a * sums[1], sums[2]])


# ----------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------


class DiceFunction(torch.autograd.Function):
    """x [N, C] contiguous, alpha [C] or [1], mask [N] bool or None; the Triton, C++ or torch path chosen at
    forward and kept for the backward."""

    @staticmethod
    def forward(ctx, x, alpha, weight, bias, running_mean, running_var, mask, training, momentum, eps):
        path, alpha_flat, weight, bias, (y, mean, spread, count) = _dice_launch(
            x, alpha, weight, bias, running_mean, running_var, mask, training, momentum, eps)
        ctx.triton, ctx.cpp = path == "triton", path == "cpp"
        if ctx.triton:  # spread: the variance (Triton) or 1 / std (C++, torch)
            ctx.save_for_backward(x, alpha_flat, weight, bias, mask, mean, spread, count)
        else:
            ctx.save_for_backward(x, alpha_flat, weight, bias, mask, mean, spread)
            ctx.count = count
        ctx.training = training
        ctx.eps = eps
        ctx.alpha_shape, ctx.alpha_dtype = alpha.shape, alpha.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        need_dx, need_alpha, need_weight, need_bias = ctx.needs_input_grad[:4]
        if ctx.triton:
            x, alpha, weight, bias, mask, mean, var, count = ctx.saved_tensors
            dx, sums = dice_backward(dy, x, alpha, weight, bias, mask, mean, var, count, ctx.training, ctx.eps,
                                     need_dx)
        else:
            x, alpha, weight, bias, mask, mean, rstd = ctx.saved_tensors
            backward = _dice_backward_cpp if ctx.cpp else _dice_backward_torch
            dx, sums = backward(dy, x, alpha, weight, bias, mask, mean, rstd, ctx.count, ctx.training, need_dx)
        dalpha = dweight = dbias = None
        if need_alpha:
            dalpha = sums[2] if alpha.numel() > 1 else sums[2].sum()
            dalpha = dalpha.reshape(ctx.alpha_shape).to(ctx.alpha_dtype)
        if need_weight:
            dweight = sums[1].to(weight.dtype)
        if need_bias:
            dbias = sums[0].to(bias.dtype)
        return dx, dalpha, dweight, dbias, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# Inference as a custom op, for torch.compile / torch.export
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("din_kernels::dice_eval", mutates_args=())
def _dice_eval_op(x: Tensor, alpha: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  running_mean: Tensor, running_var: Tensor, eps: float) -> Tensor:
    """Eval-mode Dice of x [N, C] with the running statistics: the launchers ``DiceFunction`` runs (Triton,
    C++ or torch path, chosen the same way), so compiled and exported programs give the eager results. An
    op of its own because tracing into those launchers fails: the C++ op has no fake kernel, and the torch
    path writes into slices of preallocated buffers (``out=``), which export refuses. Training mode is not
    covered: its statistics count the valid rows on the host (a data-dependent ``int(mask.sum())``)."""
    return _dice_launch(x, alpha, weight, bias, running_mean, running_var, None, False, 0.0, eps)[-1][0]


@_dice_eval_op.register_fake
def _(x, alpha, weight, bias, running_mean, running_var, eps):
    return x.new_empty(x.shape, dtype=_out_dtype(x, alpha, weight, bias))


def _dice_eval_setup_context(ctx, inputs, output):
    x, alpha, weight, bias, running_mean, running_var, eps = inputs
    ctx.save_for_backward(x, alpha, weight, bias, running_mean, running_var)
    ctx.eps = eps


def _dice_eval_backward(ctx, dy):
    """With the statistics constant: ``dx = dy * (alpha + (1 - alpha) * p) + dz * w * rstd``,
    ``dz = dy * x * (1 - alpha) * p * (1 - p)``; dalpha, dweight, dbias the sums of ``_dice_bwd_kernel``.
    Plain torch ops, which AOTAutograd traces (only compiled or exported programs differentiated in eval
    mode come here; eager calls run ``DiceFunction``)."""
    x, alpha, weight, bias, running_mean, running_var = ctx.saved_tensors
    acc = accumulation_dtype(x.dtype)
    xa, dya, a = x.to(acc), dy.to(acc), alpha.reshape(-1).to(acc)
    rstd = torch.rsqrt(running_var.to(acc) + ctx.eps)
    xhat = (xa - running_mean.to(acc)) * rstd
    w = weight.to(acc) if weight is not None else None
    p = torch.sigmoid(xhat if w is None else xhat * w + bias.to(acc))
    gx = dya * xa
    dz = gx * (1.0 - a) * p * (1.0 - p)
    dx = dya * (a + (1.0 - a) * p) + dz * (rstd if w is None else rstd * w)
    dalpha = (gx * (1.0 - p)).sum(dim=0)
    dalpha = (dalpha if alpha.numel() > 1 else dalpha.sum()).reshape(alpha.shape).to(alpha.dtype)
    dweight = dbias = None
    if weight is not None:
        dweight, dbias = (dz * xhat).sum(dim=0).to(weight.dtype), dz.sum(dim=0).to(bias.dtype)
    return dx.to(x.dtype), dalpha, dweight, dbias, None, None, None


_dice_eval_op.register_autograd(_dice_eval_backward, setup_context=_dice_eval_setup_context)


def _dice_launch(x, alpha, weight, bias, running_mean, running_var, mask, training, momentum, eps):
    """The forward on the path chosen for ``x`` (Triton, C++ or torch): (path, alpha [C] or [1] contiguous,
    weight, bias contiguous, (y, mean, variance (Triton) or 1 / std, count)). Shared by ``DiceFunction`` and
    the eval-mode custom op, so both run the same launchers."""
    out_dtype = _out_dtype(x, alpha, weight, bias)
    path = select_path(x, cpp=_dice_cpp_takes(x, out_dtype))
    alpha = alpha.reshape(-1).contiguous()
    if weight is not None:
        weight, bias = weight.contiguous(), bias.contiguous()
    if path == "triton":
        outputs = dice_forward(x, alpha, weight, bias, running_mean, running_var, mask, training, momentum, eps,
                               out_dtype)
    else:
        forward = _dice_forward_cpp if path == "cpp" else functools.partial(_dice_forward_torch, out_dtype=out_dtype)
        outputs = forward(x, alpha, weight, bias, running_mean, running_var, mask, training, momentum, eps)
    return path, alpha, weight, bias, outputs


def _out_dtype(x: Tensor, alpha: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> torch.dtype:
    out_dtype = torch.result_type(x, alpha)
    if weight is not None:
        out_dtype = torch.promote_types(out_dtype, torch.promote_types(weight.dtype, bias.dtype))
    return out_dtype


def dice(x: Tensor, alpha: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], *,
         training: bool, momentum: float = 0.1, eps: float = 1e-8, mask: Optional[Tensor] = None,
         weight: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
    """``p * x + (1 - p) * alpha * x`` with ``p = sigmoid((x - E[x]) / sqrt(Var[x] + eps))`` per channel
    (the last dimension), or ``p = sigmoid(weight * xhat + bias)`` with the affine map.

    x [N, C] or [B, T, C] with mask [B, T] (True = valid: only valid rows enter the statistics).
    ``training``: batch statistics, and ``running_mean``/``running_var`` (if given) updated in place like
    ``nn.BatchNorm1d``; otherwise the running statistics. alpha has 1 or C entries. The result has the
    promoted dtype of x and the parameters, the shape of x. Semantics: ``reference.dice``.
    """
    check_dice_args(x, alpha, running_mean, running_var, training, momentum, eps, mask, weight, bias)
    channels = x.shape[-1]
    x2 = x.contiguous().view(-1, channels)  # [N, C]
    if not training and torch.compiler.is_compiling():  # torch.compile / torch.export: one graph node
        return _dice_eval_op(x2, alpha, weight, bias, running_mean, running_var, float(eps)).view(x.shape)
    mask_flat = mask.reshape(-1).contiguous() if mask is not None else None  # [N]
    y = DiceFunction.apply(x2, alpha, weight, bias, running_mean, running_var, mask_flat, bool(training),
                           float(momentum), float(eps))
    return y.view(x.shape)


class Dice(nn.Module):
    """Dice over the last dimension: x [N, C] or [B, T, C] (+ mask [B, T], True = valid).

    Batch statistics over the valid rows while training, moving averages at inference. ``alpha`` starts
    at 0 (Dice then begins as a smooth ReLU-like gate). ``affine=True`` adds a learnable scale and shift
    inside the sigmoid, as DeepCTR-Torch's Dice (a BatchNorm1d with affine parameters).
    """

    def __init__(self, num_features: int, eps: float = 1e-8, momentum: float = 0.1, affine: bool = False):
        super().__init__()
        if not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        self.num_features = num_features
        self.momentum, self.eps = check_momentum_eps(momentum, eps)
        self.affine = affine
        self.alpha = nn.Parameter(torch.zeros(num_features))
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    @classmethod
    def from_deepctr(cls, layer: nn.Module) -> "Dice":
        """A ``Dice`` equal to DeepCTR-Torch's ``deepctr_torch.layers.activation.Dice`` ``layer`` (either dim):
        alpha, the BatchNorm1d's weight, bias, running statistics, eps, momentum and train/eval mode.
        Unlike DeepCTR-Torch's layer, this one also takes a mask so that padding stays out of the statistics."""
        bn = getattr(layer, "bn", None)
        alpha = getattr(layer, "alpha", None)
        if not isinstance(bn, nn.BatchNorm1d) or not isinstance(alpha, torch.Tensor):
            raise TypeError(f"layer must be a deepctr_torch Dice (with .bn and .alpha), got {type(layer).__name__}")
        if bn.momentum is None or not bn.track_running_stats:
            raise ValueError("layer.bn must track running statistics with a fixed momentum "
                             "(momentum=None, the cumulative average, is not supported)")
        if alpha.numel() != bn.num_features:
            raise ValueError(f"layer.alpha must have {bn.num_features} entries, got {alpha.numel()}")
        module = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine)
        module.to(device=alpha.device, dtype=alpha.dtype)
        with torch.no_grad():
            module.alpha.copy_(alpha.reshape(-1))
            if bn.affine:
                module.weight.copy_(bn.weight)
                module.bias.copy_(bn.bias)
            module.running_mean.copy_(bn.running_mean)
            module.running_var.copy_(bn.running_var)
        return module.train(layer.training)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if isinstance(x, Tensor) and x.dim() >= 1 and x.shape[-1] != self.num_features:
            raise ValueError(f"x must have num_features={self.num_features} channels in its last dimension, "
                             f"got shape {tuple(x.shape)}")
        return dice(x, self.alpha, self.running_mean, self.running_var, training=self.training,
                    momentum=self.momentum, eps=self.eps, mask=mask, weight=self.weight, bias=self.bias)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
