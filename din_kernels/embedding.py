"""Several embedding tables looked up at once into one concatenated output (DIN's item vector: the goods and
category embeddings side by side), with a dense, deterministic gradient for each table.

    embedding_concat(weights [N_i, D_i] each, ids (one shape S each), padding_idx=None) -> [*S, sum D_i]

Equal to ``torch.cat([F.embedding(ids_i, w_i, padding_idx_i) for ...], dim=-1)``, values and gradients (the
``padding_idx`` rows get none), in one pass: each table is gathered straight into its column slice of the
output (13k ids into two [*, 18] tables, one thread: 88 us against 340 us for the gathers and ``torch.cat``;
on the CPU by the C++ op ``gather_rows``, which prefetches rows ahead: see ``_gather_rows``),
and its gradient is ``zeros.index_add_(0, ids_i, grad_i)`` with ``grad_i`` made contiguous first (index_add_
over a strided slice ran 1.7x slower than a copy and a contiguous one), 3.5x faster on CPU than aten's
``embedding_dense_backward`` (26k ids into [9763, 18]: 0.34 ms against 1.2 ms). On the CPU the accumulation
runs in the C++ op ``index_add_rows`` (``csrc/embedding_cpu.cpp``: the same additions in the same order, the
same bits, without index_add_'s per-row dispatch: see there) where it is built; on CUDA ``index_add_``
(atomics: not in a fixed order).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from . import cpu_extension
from ._backend import use_cpu_extension

Tensor = torch.Tensor

__all__ = ["embedding_concat"]


def _cpp_takes(tensor: Tensor) -> bool:
    return tensor.dtype in (torch.float32, torch.float64) and use_cpu_extension(tensor)


def _gather_rows(out: Tensor, column: int, weight: Tensor, index: Tensor) -> None:
    """``out[:, column:column + D] = weight[index]``: on the CPU the C++ loop, which prefetches the rows a few
    ids ahead (a DIN step's 13k ids into a table the attention has pushed out of the caches: 103 us against
    index_select's 177 us, one thread; 34 against 51 us with the table in cache)."""
    width = weight.shape[1]
    if _cpp_takes(out) and weight.is_contiguous():
        cpu_extension.ops().gather_rows(out, column, weight, index)
    else:
        torch.index_select(weight, 0, index, out=out[:, column:column + width])


def _index_add_rows(out: Tensor, index: Tensor, source: Tensor) -> Tensor:
    """``out.index_add_(0, index, source)`` (source contiguous): the C++ loop on the CPU where it runs."""
    if _cpp_takes(out):
        return cpu_extension.ops().index_add_rows(out, index, source)
    return out.index_add_(0, index, source)


class EmbeddingConcatFunction(torch.autograd.Function):
    """Arguments ``(padding_idxs, *ids, *weights)``: one ids tensor per table (all of one shape, int64) and one
    [N_i, D_i] weight per table, validated by ``embedding_concat``."""

    @staticmethod
    def forward(ctx, padding_idxs: Tuple[Optional[int], ...], *tensors: Tensor) -> Tensor:
        count = len(padding_idxs)
        ids, weights = tensors[:count], tensors[count:]
        flat = [i.reshape(-1) for i in ids]
        ctx.save_for_backward(*flat)
        ctx.padding_idxs, ctx.rows = padding_idxs, [w.shape[0] for w in weights]
        ctx.widths = [w.shape[1] for w in weights]
        out = weights[0].new_empty(flat[0].numel(), sum(ctx.widths))  # [N, sum D_i]
        column = 0
        for index, weight, width in zip(flat, weights, ctx.widths):
            _gather_rows(out, column, weight, index)
            column += width
        return out.view(*ids[0].shape, out.shape[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        ids = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        grads, column = [], 0
        for index, rows, width, padding_idx in zip(ids, ctx.rows, ctx.widths, ctx.padding_idxs):
            part = grad[:, column:column + width].contiguous()
            grad_weight = _index_add_rows(grad.new_zeros(rows, width), index, part)
            if padding_idx is not None:
                grad_weight[padding_idx] = 0
            grads.append(grad_weight)
            column += width
        return (None,) + (None,) * len(ids) + tuple(grads)


def embedding_concat(weights: Sequence[Tensor], ids: Sequence[Tensor],
                     padding_idx: Optional[Sequence[Optional[int]]] = None) -> Tensor:
    """``torch.cat([F.embedding(ids[i], weights[i], padding_idx[i]) for i], dim=-1)`` in one pass, with a dense
    gradient for each weight (module docstring). ``ids``: integer tensors of one shape S, each id in
    [0, N_i); ``padding_idx``: per table a row that gets no gradient, or None."""
    weights, ids = list(weights), list(ids)
    if not weights or len(weights) != len(ids):
        raise ValueError(f"embedding_concat needs one ids tensor per weight, got {len(weights)} weights and "
                         f"{len(ids)} ids tensors")
    padding = [None] * len(weights) if padding_idx is None else list(padding_idx)
    if len(padding) != len(weights):
        raise ValueError(f"padding_idx needs one entry per weight ({len(weights)}), got {len(padding)}")
    for i, (weight, index) in enumerate(zip(weights, ids)):
        if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise TypeError(f"weights[{i}] must be a floating [N, D] tensor, got "
                            f"{getattr(weight, 'shape', type(weight).__name__)}")
        if weight.dtype != weights[0].dtype or weight.device != weights[0].device:
            raise ValueError(f"weights[{i}] must share weights[0]'s dtype and device ({weights[0].dtype}, "
                             f"{weights[0].device}), got {weight.dtype}, {weight.device}")
        if not isinstance(index, Tensor) or index.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ids[{i}] must be an int64 or int32 tensor, got "
                            f"{getattr(index, 'dtype', type(index).__name__)}")
        if index.shape != ids[0].shape or index.device != weight.device:
            raise ValueError(f"ids[{i}] must have ids[0]'s shape {tuple(ids[0].shape)} on {weight.device}, got "
                             f"{tuple(index.shape)} on {index.device}")
        if index.numel():
            low, high = (int(v) for v in torch.aminmax(index))
            if low < 0 or high >= weight.shape[0]:
                raise IndexError(f"ids[{i}] must lie in [0, {weight.shape[0]}) (weights[{i}] has "
                                 f"{weight.shape[0]} rows), got values in [{low}, {high}]")
        row = padding[i]
        if row is not None and not (isinstance(row, int) and -weight.shape[0] <= row < weight.shape[0]):
            raise ValueError(f"padding_idx[{i}] must be None or a row of weights[{i}], got {row!r}")
    ids = [i.to(torch.int64) for i in ids]
    padding = tuple(None if p is None else p % w.shape[0] for p, w in zip(padding, weights))
    return EmbeddingConcatFunction.apply(padding, *ids, *weights)
