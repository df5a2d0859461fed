"""Mini-batch aware (MBA) regularisation (paper Sec. 4.1): sparse row-wise updates whose cost follows the batch.

For each row j that occurs in the batch (``alpha_mj = 1``), with ``g_j`` the summed gradient of the batch-mean
loss over the occurrences of j and ``n_j`` the row's frequency in the training set::

    g'_j = g_j + lam * inv_freq[j] * w_j,   inv_freq[j] = 1 / n_j        # once per unique row
    SGD:               w_j <- w_j - lr * g'_j
    row-wise Adagrad:  s_j <- s_j + mean_d(g'_j ** 2);  w_j <- w_j - lr * g'_j / (sqrt(s_j) + eps)

Constant convention: ``lam * inv_freq[j] * w_j`` is the gradient of the explicit penalty
``lam / 2 * sum_{j in unique(batch)} ||w_j||^2 / n_j`` added to the batch-mean loss (once per unique row,
not once per occurrence). Rows absent from the batch are never read or written: the cost is
``O(K * D)`` for a batch of K ids, whatever the table size N is.

Coalescing: the flat ids are sorted once (stable) and cut into runs of equal ids
(``torch.unique_consecutive``); run r covers the sorted positions ``[starts[r], ends[r])`` and
``order[p]`` is the original position of sorted position p. The Triton kernel runs one program per run
(unique row): it segment-sums that run's gradient rows itself, ``BLOCK_P`` occurrences at a time, adds the
penalty and applies the step in place, all in fp32 with one rounding to the table's dtype on the store.
Fusing the segment sum (instead of ``index_add_`` into a ``[U, D]`` buffer first) saves a launch and a
``[U, D]`` fp32 round trip, and keeps the sum deterministic: ``index_add_`` on CUDA uses atomics, so its
summation order (and last bits) would change from run to run; here the order is fixed by the stable sort.
A run of a hot id (Zipf: hundreds of occurrences in a batch of 1024) is reduced ``BLOCK_P`` rows per
iteration, not one row per iteration.

The torch path (CPU users, or ``set_backend("torch")``) is the same algebra with ``torch.unique``,
``index_add_`` into a ``[U, D]`` fp32 buffer, ``index_select`` and ``index_copy_``.

Validation runs first and reads ``ids.min()``/``ids.max()`` and ``inv_freq[ids]`` on the host (a sync on
CUDA), and the number of unique rows sizes the launch (a second sync): a Triton kernel handed a bad id
would silently write someone else's memory.
"""
from __future__ import annotations

import types
import weakref
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ._backend import select_path
from ._dtypes import accumulation_dtype
from ._checks import (
    check_ids,
    check_inv_freq,
    check_mba_step_args,
    check_nonnegative_finite,
    check_same_device,
    check_table,
    check_tensor,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional (setup.py): without it only the torch path runs
    triton = types.SimpleNamespace(jit=lambda fn: fn)
    tl = None

Tensor = torch.Tensor

_MODE_VALUES, _MODE_SGD, _MODE_ADAGRAD = 0, 1, 2  # the update kernel's MODE constexpr


@dataclass(frozen=True)
class MBAOptimizerSpec:
    """A row-wise optimizer the MBA update runs fused inside backward. As FBGEMM's TBE separates the optimizer
    type from the weight-decay mode, the spec names the type: its kernel ``mode`` and its state (``row_state``:
    one accumulator per row, [N] in the table's accumulation dtype); the weight decay is MBA's
    frequency-scaled L2, ``g'_j = g_j + lam * inv_freq[j] * w_j``, the same for every type. Adding one: an
    entry here, a ``MODE`` branch in ``_mba_update_kernel`` and ``mba_update_``'s torch path."""
    name: str
    mode: int
    row_state: bool


#: the fused optimizers of ``MBAEmbedding(optimizer=...)``, by name
MBA_OPTIMIZERS: Dict[str, MBAOptimizerSpec] = {spec.name: spec for spec in (
    MBAOptimizerSpec("sgd", _MODE_SGD, row_state=False),
    MBAOptimizerSpec("adagrad", _MODE_ADAGRAD, row_state=True),
)}
OPTIMIZERS = (None, *MBA_OPTIMIZERS)  # None: no fused optimizer, a sparse gradient instead


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _sqrt(x):
    """Correctly rounded square root: ``sqrt_rn`` in fp32 (the default fp32 sqrt is approximate on GPUs),
    ``sqrt`` in fp64 (already correctly rounded; ``sqrt_rn`` takes fp32 only)."""
    if x.dtype == tl.float64:
        y = tl.sqrt(x)
    else:
        y = tl.sqrt_rn(x)
    return y


@triton.jit
def _penalised_grad_tile(grad_ptr, order_ptr, weight_ptr, row, start, end, coef, offs_d, mask_d,
                         stride_gk, stride_wn, stride_wd, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                         ACC: tl.constexpr):
    """One D tile of row j = ``row``: ``g'_j = sum_{p in [start, end)} grad[order[p]] + coef * w_j``,
    ``coef = lam / n_j``. Returns (g'_j, w_j) in ``ACC`` (fp32, fp64 for an fp64 table), both [BLOCK_D]."""
    offs_p = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=ACC)
    for p0 in range(start, end, BLOCK_P):
        pos = p0 + offs_p
        mask_p = pos < end
        src = tl.load(order_ptr + pos, mask=mask_p, other=0)  # [BLOCK_P] original positions (int64)
        g_ptrs = grad_ptr + src[:, None] * stride_gk + offs_d[None, :]
        acc += tl.load(g_ptrs, mask=mask_p[:, None] & mask_d[None, :], other=0.0).to(ACC)
    w = tl.load(weight_ptr + row * stride_wn + offs_d * stride_wd, mask=mask_d, other=0.0).to(ACC)
    return tl.sum(acc, axis=0) + coef * w, w


@triton.jit
def _mba_embedding_fwd_kernel(ids_ptr, weight_ptr, out_ptr, K, D, stride_wn, stride_wd,
                              BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Gather: ``out[i, d] = weight[ids[i], d]`` for a [BLOCK_K, BLOCK_D] tile of (id, column)."""
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_k = offs_k < K
    mask = mask_k[:, None] & (offs_d < D)[None, :]
    rows = tl.load(ids_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)  # [BLOCK_K]
    w = tl.load(weight_ptr + rows[:, None] * stride_wn + offs_d[None, :] * stride_wd, mask=mask, other=0.0)
    tl.store(out_ptr + offs_k[:, None] * D + offs_d[None, :], w, mask=mask)  # out: [K, D] contiguous


@triton.jit
def _mba_update_kernel(grad_ptr, order_ptr, rows_ptr, starts_ptr, ends_ptr, weight_ptr, inv_freq_ptr,
                       state_ptr, values_ptr, D, lam, lr, eps,
                       stride_gk, stride_wn, stride_wd, stride_f, stride_s,
                       MODE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                       SINGLE_TILE: tl.constexpr, ACC: tl.constexpr):
    """One program per unique row j = rows[r] (run r of the sorted ids), looping over D in BLOCK_D tiles:

        g'_j = sum_{p in [starts[r], ends[r])} grad[order[p]] + lam * inv_freq[j] * w_j     # in ACC
        MODE 0 (sparse gradient):  values[r] = g'_j
        MODE 1 (SGD):              w_j -= lr * g'_j
        MODE 2 (row-wise Adagrad): s_j += sum_d(g'_j ** 2) / D;  w_j -= lr * g'_j / (sqrt(s_j) + eps)

    Rows that are not in ``rows`` are never touched. Adagrad needs the whole row's ``sum_d`` before the
    first store: with several D tiles a first pass accumulates it and a second pass recomputes ``g'_j``
    tile by tile (each tile reads only its own old ``w_j``, so storing it afterwards is safe).
    """
    r = tl.program_id(0)
    row = tl.load(rows_ptr + r).to(tl.int64)
    start = tl.load(starts_ptr + r)
    end = tl.load(ends_ptr + r)
    coef = lam * tl.load(inv_freq_ptr + row * stride_f).to(ACC)
    offs = tl.arange(0, BLOCK_D)
    if MODE == 2:
        if SINGLE_TILE:
            mask_d = offs < D
            g, w = _penalised_grad_tile(grad_ptr, order_ptr, weight_ptr, row, start, end, coef, offs, mask_d,
                                        stride_gk, stride_wn, stride_wd, BLOCK_P, BLOCK_D, ACC)
            s = tl.load(state_ptr + row * stride_s).to(ACC) + tl.sum(g * g, axis=0) / D
            tl.store(state_ptr + row * stride_s, s.to(state_ptr.dtype.element_ty))
            w = w - lr * g / (_sqrt(s) + eps)
            tl.store(weight_ptr + row * stride_wn + offs * stride_wd, w.to(weight_ptr.dtype.element_ty),
                     mask=mask_d)
        else:
            sq = tl.zeros([BLOCK_D], dtype=ACC)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + offs
                mask_d = offs_d < D
                g, w = _penalised_grad_tile(grad_ptr, order_ptr, weight_ptr, row, start, end, coef, offs_d,
                                            mask_d, stride_gk, stride_wn, stride_wd, BLOCK_P, BLOCK_D, ACC)
                sq += g * g
            s = tl.load(state_ptr + row * stride_s).to(ACC) + tl.sum(sq, axis=0) / D
            tl.store(state_ptr + row * stride_s, s.to(state_ptr.dtype.element_ty))
            denom = _sqrt(s) + eps
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + offs
                mask_d = offs_d < D
                g, w = _penalised_grad_tile(grad_ptr, order_ptr, weight_ptr, row, start, end, coef, offs_d,
                                            mask_d, stride_gk, stride_wn, stride_wd, BLOCK_P, BLOCK_D, ACC)
                w = w - lr * g / denom
                tl.store(weight_ptr + row * stride_wn + offs_d * stride_wd, w.to(weight_ptr.dtype.element_ty),
                         mask=mask_d)
    else:
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs
            mask_d = offs_d < D
            g, w = _penalised_grad_tile(grad_ptr, order_ptr, weight_ptr, row, start, end, coef, offs_d, mask_d,
                                        stride_gk, stride_wn, stride_wd, BLOCK_P, BLOCK_D, ACC)
            if MODE == 0:
                tl.store(values_ptr + r.to(tl.int64) * D + offs_d, g.to(values_ptr.dtype.element_ty),
                         mask=mask_d)  # values: [U, D] contiguous
            else:
                w = w - lr * g
                tl.store(weight_ptr + row * stride_wn + offs_d * stride_wd, w.to(weight_ptr.dtype.element_ty),
                         mask=mask_d)


# ----------------------------------------------------------------------------------------------------------
# Launchers (arguments validated by the public functions below)
# ----------------------------------------------------------------------------------------------------------

_MAX_BLOCK_D = 256  # columns per tile; wider rows loop over tiles
_TILE_ELEMENTS = 2048  # BLOCK_P * BLOCK_D (or BLOCK_K * BLOCK_D): registers per program


def _block_d(dim: int) -> int:
    return min(triton.next_power_of_2(max(dim, 1)), _MAX_BLOCK_D)


def _num_warps(elements: int) -> int:
    return 1 if elements <= 512 else 2 if elements <= 1024 else 4


def _coalesce(ids: Tensor, padding_idx: Optional[int]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Runs of equal ids: (order [K], rows [U], starts [U], ends [U]) with ``rows`` sorted ascending and run
    r at sorted positions ``[starts[r], ends[r])``; ``order[p]`` is the original position of sorted position
    p. The stable sort fixes the summation order. The padding row's run, if any, is dropped."""
    flat = ids.reshape(-1).long()
    sorted_ids, order = torch.sort(flat, stable=True)
    rows, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    if padding_idx is not None:
        keep = rows != padding_idx
        rows, starts, ends = rows[keep], starts[keep], ends[keep]
    return order, rows, starts, ends


def _launch_update(mode: int, weight: Tensor, ids: Tensor, grad_rows: Tensor, inv_freq: Tensor, lr: float,
                   lam: float, eps: float, state: Optional[Tensor], padding_idx: Optional[int]):
    """Triton path of every backward mode. Returns (rows [U], values [U, D] or None)."""
    order, rows, starts, ends = _coalesce(ids, padding_idx)
    num_runs, dim = rows.numel(), weight.shape[1]
    values = None
    if mode == _MODE_VALUES:
        values = torch.empty(num_runs, dim, dtype=weight.dtype, device=weight.device)
    if num_runs == 0:
        return rows, values
    grad_rows = grad_rows.reshape(-1, dim).contiguous()  # [K, D]
    block_d = _block_d(dim)
    block_p = max(1, min(16, _TILE_ELEMENTS // block_d))
    state_arg = state if state is not None else inv_freq  # never read unless MODE == 2
    _mba_update_kernel[(num_runs,)](
        grad_rows, order, rows, starts, ends, weight, inv_freq, state_arg,
        values if values is not None else grad_rows,  # never written unless MODE == 0
        dim, lam, lr, eps,
        grad_rows.stride(0), weight.stride(0), weight.stride(1), inv_freq.stride(0), state_arg.stride(0),
        MODE=mode, BLOCK_P=block_p, BLOCK_D=block_d, SINGLE_TILE=dim <= block_d,
        ACC=tl.float64 if accumulation_dtype(weight.dtype) == torch.float64 else tl.float32,
        num_warps=_num_warps(block_p * block_d),
    )
    return rows, values


def _penalised_rows_torch(weight: Tensor, ids: Tensor, grad_rows: Tensor, inv_freq: Tensor, lam: float,
                          padding_idx: Optional[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """Torch path: (rows [U], g' [U, D] fp32, w [U, D] fp32), the padding row left out."""
    dim, acc = weight.shape[1], accumulation_dtype(weight.dtype)
    rows, inverse = torch.unique(ids.reshape(-1).long(), return_inverse=True)
    grad = torch.zeros(rows.numel(), dim, dtype=acc, device=weight.device)
    grad.index_add_(0, inverse.reshape(-1), grad_rows.reshape(-1, dim).to(acc))
    if padding_idx is not None:
        keep = rows != padding_idx
        if not bool(keep.all()):
            rows, grad = rows[keep], grad[keep]
    w = weight.index_select(0, rows).to(acc, copy=True)  # a copy: the table is written back once, at the end
    coef = inv_freq.index_select(0, rows).to(acc).mul_(lam)
    grad.addcmul_(coef[:, None], w)
    return rows, grad, w


def mba_embedding_forward(ids: Tensor, weight: Tensor) -> Tensor:
    """``weight[ids]``.  ids [...] -> [..., D]"""
    dim = weight.shape[1]
    if select_path(weight, cpp=False) != "triton":
        return weight.index_select(0, ids.reshape(-1).long()).view(*ids.shape, dim)
    flat = ids.reshape(-1).contiguous()  # reshape can return a strided view; the kernel reads ids[i] at i
    out = torch.empty(flat.numel(), dim, dtype=weight.dtype, device=weight.device)  # [K, D]
    if flat.numel():
        block_d = _block_d(dim)
        block_k = max(1, min(64, _TILE_ELEMENTS // block_d))
        grid = (triton.cdiv(flat.numel(), block_k), triton.cdiv(dim, block_d))
        _mba_embedding_fwd_kernel[grid](flat, weight, out, flat.numel(), dim, weight.stride(0), weight.stride(1),
                                        BLOCK_K=block_k, BLOCK_D=block_d, num_warps=_num_warps(block_k * block_d))
    return out.view(*ids.shape, dim)


def mba_embedding_backward(grad_out: Tensor, ids: Tensor, weight: Tensor, inv_freq: Tensor, lam: float,
                           padding_idx: Optional[int] = None) -> Tensor:
    """The weight gradient as a coalesced sparse COO tensor: indices = unique ids (padding left out),
    values = ``segment sums of grad_out + lam * inv_freq[j] * w_j`` in the table's dtype."""
    dim = weight.shape[1]
    grad_rows = grad_out.reshape(-1, dim)
    if select_path(weight, cpp=False) == "triton":
        rows, values = _launch_update(_MODE_VALUES, weight, ids, grad_rows, inv_freq, 0.0, lam, 0.0, None,
                                      padding_idx)
    else:
        rows, values, _ = _penalised_rows_torch(weight, ids, grad_rows, inv_freq, lam, padding_idx)
        values = values.to(weight.dtype)
    return torch.sparse_coo_tensor(rows[None, :], values, weight.shape, is_coalesced=True,
                                   check_invariants=False)  # sorted and unique by construction


@torch.no_grad()
def mba_update_(weight: Tensor, ids: Tensor, grad_rows: Tensor, inv_freq: Tensor, lr: float, lam: float,
                state: Optional[Tensor] = None, eps: float = 1e-10, padding_idx: Optional[int] = None) -> Tensor:
    """In place: the MBA SGD step (``state is None``) or the row-wise Adagrad step over the unique ids."""
    if ids.numel() == 0:
        return weight
    if select_path(weight, cpp=False) == "triton":
        _launch_update(_MODE_SGD if state is None else _MODE_ADAGRAD, weight, ids, grad_rows, inv_freq, lr, lam,
                       eps, state, padding_idx)
        # Triton's stores bypass autograd: bump the version counters as an in-place torch op would, so that a
        # graph that saved the table (or the state) before this step fails loudly instead of using new values.
        torch.autograd.graph.increment_version(weight)
        if state is not None:
            torch.autograd.graph.increment_version(state)
        return weight
    rows, grad, w = _penalised_rows_torch(weight, ids, grad_rows, inv_freq, lam, padding_idx)
    if state is None:
        w.sub_(grad.mul_(lr))
    else:
        s = state.index_select(0, rows).to(grad.dtype).add_(grad.square().mean(dim=1))
        state.index_copy_(0, rows, s.to(state.dtype))
        w.sub_(grad.mul_(lr).div_(s.sqrt_().add_(eps)[:, None]))
    weight.index_copy_(0, rows, w.to(weight.dtype))
    return weight


def _local_row_sums(ids: Tensor, grad_out: Tensor, weight: Tensor, inv_freq: Tensor,
                    padding_idx: Optional[int]) -> Tuple[Tensor, Tensor]:
    """This process's occurrences coalesced: (unique ids [U], summed gradient rows [U, D]), padding left out.
    The Triton path's sums are the update kernel's own (``lam = 0``: deterministic order, table dtype); the
    torch path sums in the accumulation dtype."""
    dim = weight.shape[1]
    grad_rows = grad_out.reshape(-1, dim)
    if select_path(weight, cpp=False) == "triton":
        return _launch_update(_MODE_VALUES, weight, ids, grad_rows, inv_freq, 0.0, 0.0, 0.0, None, padding_idx)
    rows, inverse = torch.unique(ids.reshape(-1).long(), return_inverse=True)
    sums = torch.zeros(rows.numel(), dim, dtype=accumulation_dtype(weight.dtype), device=weight.device)
    sums.index_add_(0, inverse.reshape(-1), grad_rows.to(sums.dtype))
    if padding_idx is not None:
        keep = rows != padding_idx
        rows, sums = rows[keep], sums[keep]
    return rows, sums


def _gather_rows(ids: Tensor, grad_out: Tensor, weight: Tensor, inv_freq: Tensor, padding_idx: Optional[int],
                 group) -> Tuple[Tensor, Tensor]:
    """Every process's coalesced ``(ids [U_r], gradient sums [U_r, D])`` of this step (:func:`_local_row_sums`),
    concatenated in rank order, the sums divided by the number of processes (the mean over processes, as
    DistributedDataParallel averages dense gradients). The backward then runs on the union as on one batch:
    rows held by several processes are summed once more, and the MBA term and the update apply once per unique
    row of the global batch, identically on every process (same inputs, same order). Coalescing first sends
    U_r rows instead of every occurrence (a category table: tens of rows for 50k lookups). Three collectives:
    the counts (they differ), then ids and sums padded to the largest."""
    import torch.distributed as dist

    rows, sums = _local_row_sums(ids, grad_out, weight, inv_freq, padding_idx)
    world = dist.get_world_size(group)
    count = torch.tensor([rows.numel()], dtype=torch.int64, device=rows.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in counts]
    most = max(counts)
    sent_ids = rows.new_zeros(most)
    sent_ids[:rows.numel()] = rows
    sent_sums = sums.new_zeros(most, sums.shape[1])
    sent_sums[:rows.numel()] = sums
    all_ids = [torch.empty_like(sent_ids) for _ in range(world)]
    all_sums = [torch.empty_like(sent_sums) for _ in range(world)]
    dist.all_gather(all_ids, sent_ids, group=group)
    dist.all_gather(all_sums, sent_sums, group=group)
    gathered_ids = torch.cat([part[:n] for part, n in zip(all_ids, counts)])
    gathered_sums = torch.cat([part[:n] for part, n in zip(all_sums, counts)]).div_(world)
    return gathered_ids, gathered_sums


# ----------------------------------------------------------------------------------------------------------
# Autograd function, functional API
# ----------------------------------------------------------------------------------------------------------

def _check_padding_idx(padding_idx, num_rows: int) -> Optional[int]:
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
        raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")
    if not 0 <= padding_idx < num_rows:
        raise ValueError(f"padding_idx must lie in [0, {num_rows}) or be None, got {padding_idx}")
    return padding_idx


class MBAEmbeddingFunction(torch.autograd.Function):
    """``weight[ids]`` whose backward either returns the sparse MBA gradient for ``weight``
    (``optimizer=None``) or applies the MBA SGD / row-wise Adagrad step to ``weight`` in place and returns no
    weight gradient at all (optimizer in backward, as FBGEMM's TBE and torchrec's fused embeddings). With a
    ``process_group`` both run on every process's rows at once (:func:`_gather_rows`)."""

    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, inv_freq: Tensor, lam: float, padding_idx: Optional[int],
                optimizer: Optional[str], lr: float, eps: float, state: Optional[Tensor],
                process_group=None) -> Tensor:
        ctx.lam, ctx.padding_idx, ctx.optimizer, ctx.lr, ctx.eps = lam, padding_idx, optimizer, lr, eps
        ctx.process_group = process_group
        if optimizer is None:
            ctx.save_for_backward(ids, weight, inv_freq)
        else:
            # The table is read when backward runs (that is the w_j the step updates), so it is kept as is,
            # with its version: a second update in between must be an error, not a silent double step.
            ctx.save_for_backward(ids, inv_freq)
            ctx.weight, ctx.state, ctx.version = weight, state, weight._version
        return mba_embedding_forward(ids, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        nones = (None,) * 8
        if ctx.optimizer is None:
            ids, weight, inv_freq = ctx.saved_tensors
            if ctx.process_group is not None:
                ids, grad_out = _gather_rows(ids, grad_out, weight, inv_freq, ctx.padding_idx, ctx.process_group)
            grad_weight = mba_embedding_backward(grad_out, ids, weight, inv_freq, ctx.lam, ctx.padding_idx)
            return (None, grad_weight) + nones
        ids, inv_freq = ctx.saved_tensors
        weight = ctx.weight
        if weight._version != ctx.version:
            raise RuntimeError(
                "MBAEmbedding: the table was modified between this lookup and its backward (called twice in one "
                "graph, or stepped in between). With a fused optimizer, look up all of a table's ids for the "
                "step in one call (e.g. torch.cat candidate and history ids), then split the output.")
        if ctx.process_group is not None:
            ids, grad_out = _gather_rows(ids, grad_out, weight, inv_freq, ctx.padding_idx, ctx.process_group)
        mba_update_(weight, ids, grad_out, inv_freq, ctx.lr, ctx.lam, state=ctx.state, eps=ctx.eps,
                    padding_idx=ctx.padding_idx)
        ctx.stepped = True  # (``MBAEmbedding`` allows the next lookup)
        return (None, None) + nones


def mba_embedding(ids: Tensor, weight: Tensor, inv_freq: Tensor, lam: float, *,
                  padding_idx: Optional[int] = None) -> Tensor:
    """``weight[ids]`` whose weight gradient is a coalesced sparse COO tensor over the unique ids j with rows
    ``sum_{i: ids_i = j} grad_out_i + lam * inv_freq[j] * w_j``: the MBA term once per unique row. ``padding_idx``
    (optional) is left out of the gradient. Works with ``torch.optim.SGD``, ``Adagrad`` and ``SparseAdam``.
    ids [...] int -> [..., D]"""
    check_table(weight)
    check_ids(ids, weight.shape[0])
    check_inv_freq(inv_freq, weight, ids)
    check_same_device(ids=ids, weight=weight, inv_freq=inv_freq)
    lam = check_nonnegative_finite("lam", lam)
    padding_idx = _check_padding_idx(padding_idx, weight.shape[0])
    return MBAEmbeddingFunction.apply(ids, weight, inv_freq, lam, padding_idx, None, 0.0, 0.0, None, None)


def mba_sgd_(weight: Tensor, ids: Tensor, grad_rows: Tensor, inv_freq: Tensor, lr: float, lam: float, *,
             padding_idx: Optional[int] = None) -> Tensor:
    """In place: ``w_j -= lr * (g_j + lam * inv_freq[j] * w_j)`` for each unique id j, ``g_j`` the sum of the
    ``grad_rows`` with id j; every other row (and ``padding_idx``, if given) stays bit-identical.
    weight [N, D], ids [K] (any shape), grad_rows [K, D], inv_freq [N] (= 1 / n_j)."""
    lr, lam = check_mba_step_args(weight, ids, grad_rows, inv_freq, lr, lam)
    padding_idx = _check_padding_idx(padding_idx, weight.shape[0])
    return mba_update_(weight, ids, grad_rows, inv_freq, lr, lam, padding_idx=padding_idx)


def mba_adagrad_(weight: Tensor, state: Tensor, ids: Tensor, grad_rows: Tensor, inv_freq: Tensor,
                 lr: float, lam: float, eps: float = 1e-10, *, padding_idx: Optional[int] = None) -> Tensor:
    """In place row-wise Adagrad with the MBA term (FBGEMM's exact row-wise Adagrad), touched rows only:
    ``g'_j = g_j + lam * inv_freq[j] * w_j``; ``state_j += mean_d(g'_j ** 2)``;
    ``w_j -= lr * g'_j / (sqrt(state_j) + eps)``.  state [N] (fp32)."""
    lr, lam = check_mba_step_args(weight, ids, grad_rows, inv_freq, lr, lam, state=state)
    eps = check_nonnegative_finite("eps", eps)
    padding_idx = _check_padding_idx(padding_idx, weight.shape[0])
    return mba_update_(weight, ids, grad_rows, inv_freq, lr, lam, state=state, eps=eps, padding_idx=padding_idx)


def row_frequencies(ids: Tensor, num_rows: int) -> Tensor:
    """``n_j`` counts over a training set's ids (any shape).  -> [num_rows] int64"""
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows <= 0:
        raise ValueError(f"num_rows must be a positive int, got {num_rows!r}")
    check_ids(ids, num_rows)
    return torch.bincount(ids.reshape(-1).long(), minlength=num_rows)


def inverse_frequencies(frequencies: Tensor) -> Tensor:
    """``inv_freq[j] = 1 / n_j`` where ``n_j > 0``, and 0 (no penalty) for rows that never occur.  -> [N] fp32"""
    check_tensor("frequencies", frequencies, ndim=1)
    if frequencies.dtype == torch.bool or frequencies.is_complex():
        raise TypeError(f"frequencies must hold counts (an integer or floating tensor), got {frequencies.dtype}")
    counts = frequencies.float()
    if frequencies.numel() and (not bool(torch.isfinite(counts).all()) or bool((counts < 0).any())):
        raise ValueError("frequencies must be finite counts >= 0")
    return torch.where(counts > 0, counts.reciprocal(), torch.zeros_like(counts))


# ----------------------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------------------

class MBAEmbedding(nn.Module):
    """An embedding table trained with mini-batch aware L2 (paper Eq. 4).

    ``frequencies``: ``n_j`` per row ([N] counts over the training ids, e.g. ``row_frequencies``). The
    penalty is ``lam / 2 * sum_{j in unique(batch)} ||w_j||^2 / n_j`` added to the batch-mean loss. Rows with
    ``n_j = 0`` get ``inv_freq = 0`` (no penalty); since the counts cover the training set such a row should
    never be trained on, so a lookup that will be differentiated (grad enabled, ``lam > 0``) raises a
    ValueError naming such an id: the counts do not match the data.

    ``optimizer=None``: ``weight.grad`` is a coalesced sparse tensor (penalty included); step it with
    ``torch.optim.SGD``, ``Adagrad`` or ``SparseAdam``. ``optimizer="sgd"`` / ``"adagrad"`` (row-wise, state
    in the ``state`` buffer, [N] fp32): the step runs inside backward and no gradient for the table is ever
    materialised (``weight.grad`` stays None); ``lr`` (settable: ``module.lr = ...``) is read at lookup time.
    With a fused optimizer call the module once per step with all of the table's ids (a second lookup in the
    same graph would step twice; it raises instead).

    ``padding_idx`` (default 0, None for none): as ``nn.Embedding``, the row is looked up as stored (zeros
    at initialisation) and never updated. Initialisation: ``N(0, 1)`` as ``nn.Embedding``.

    ``process_group`` (default None; settable): data-parallel training where every process holds the whole
    table and looks up its own share of each batch. Backward then gathers every process's rows (its unique
    ids and their gradient sums), averages the gradients over the processes (as DistributedDataParallel
    averages dense ones: scale each process's loss so that the mean is the gradient you want) and applies the
    MBA term and the step once per unique row of the union, so every process applies the identical update (fused), or holds
    the identical sparse gradient (``optimizer=None``). Every process must run each backward (a collective);
    keep the table out of DistributedDataParallel (its gradient is not dense, and with a fused optimizer
    there is none). The frequencies must count the whole training set on every process.
    ids [...] int -> [..., D]
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, frequencies: Tensor, lam: float,
                 optimizer: Optional[str] = None, lr: float = 0.01, padding_idx: Optional[int] = 0,
                 eps: float = 1e-10, *, device=None, dtype=None):
        super().__init__()
        for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be None or one of {', '.join(map(repr, MBA_OPTIMIZERS))}, "
                             f"got {optimizer!r}")
        if isinstance(padding_idx, int) and not isinstance(padding_idx, bool) and padding_idx < 0:
            padding_idx += num_embeddings  # nn.Embedding's convention
        self.padding_idx = _check_padding_idx(padding_idx, num_embeddings)
        check_tensor("frequencies", frequencies, ndim=1)
        if frequencies.shape[0] != num_embeddings:
            raise ValueError(f"frequencies must have one count per row ({num_embeddings}), "
                             f"got {frequencies.shape[0]}")
        self.num_embeddings, self.embedding_dim, self.optimizer = num_embeddings, embedding_dim, optimizer
        self.lam, self.lr, self.eps = lam, lr, eps  # validated by the setters
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        self.register_buffer("inv_freq", inverse_frequencies(frequencies).to(self.weight.device))
        # the Adagrad state in the table's accumulation dtype (fp32; fp64 for an fp64 table)
        state = (torch.zeros(num_embeddings, device=device, dtype=accumulation_dtype(self.weight.dtype))
                 if optimizer is not None and MBA_OPTIMIZERS[optimizer].row_state else None)
        self.register_buffer("state", state)
        self.process_group = None
        self._pending_lookup = None  # weakref to the last fused lookup's autograd node (``forward``)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.normal_(self.weight)
            if self.padding_idx is not None:
                self.weight[self.padding_idx].zero_()
            if self.state is not None:
                self.state.zero_()

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = check_nonnegative_finite("lr", value)

    @property
    def process_group(self):
        return self._process_group

    @process_group.setter
    def process_group(self, group) -> None:
        if group is not None:
            import torch.distributed as dist

            if not isinstance(group, dist.ProcessGroup):
                raise TypeError(f"process_group must be a torch.distributed ProcessGroup or None, "
                                f"got {type(group).__name__}")
        self._process_group = group

    @property
    def lam(self) -> float:
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        self._lam = check_nonnegative_finite("lam", value)

    @property
    def eps(self) -> float:
        return self._eps

    @eps.setter
    def eps(self, value: float) -> None:
        self._eps = check_nonnegative_finite("eps", value)

    def forward(self, ids: Tensor) -> Tensor:
        weight = self.weight
        check_ids(ids, self.num_embeddings)
        check_same_device(ids=ids, weight=weight)
        if not (torch.is_grad_enabled() and weight.requires_grad):
            return mba_embedding_forward(ids, weight)
        if self.lam > 0 and ids.numel():
            flat = ids.reshape(-1).long()
            used = self.inv_freq[flat] > 0
            if self.padding_idx is not None:
                used |= flat == self.padding_idx
            if not bool(used.all()):
                bad = int(flat[~used][0])
                raise ValueError(f"ids contains {bad}, whose training frequency is 0: frequencies must count every "
                                 "id the table is trained on (e.g. row_frequencies over all training ids)")
        tracked = self.optimizer is not None and self.training
        if tracked:
            # A fused step updates the table when its lookup's backward runs: a second lookup before that
            # backward would step rows twice, the first time under the other's feet (the backward refuses it,
            # but only after the first update). Refused here, in training mode, before anything changes; a
            # dropped graph frees its node, which ends the wait.
            pending = self._pending_lookup() if self._pending_lookup is not None else None
            if pending is not None and not pending.stepped:
                raise ValueError("MBAEmbedding with a fused optimizer: looked up again before the previous "
                                 "lookup's backward ran. Look up all of a table's ids for the step in one call "
                                 "(e.g. torch.cat candidate and history ids), then split the output.")
        out = MBAEmbeddingFunction.apply(ids, weight, self.inv_freq, self.lam, self.padding_idx, self.optimizer,
                                         self.lr, self.eps, self.state, self.process_group)
        if tracked:
            out.grad_fn.stepped = False  # (the Function's context: set True by its backward)
            self._pending_lookup = weakref.ref(out.grad_fn)  # dead once the graph is dropped
        return out

    def extra_repr(self) -> str:
        text = f"{self.num_embeddings}, {self.embedding_dim}, lam={self.lam}"
        if self.optimizer is not None:
            text += f", optimizer={self.optimizer!r}, lr={self.lr}"
        if self.padding_idx is not None:
            text += f", padding_idx={self.padding_idx}"
        return text
