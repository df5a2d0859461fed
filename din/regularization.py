"""Embedding regularisation for training: none, full-table L2, or mini-batch aware (MBA, paper Eq. 4).

- ``mba``: the goods and category tables become ``din_kernels.MBAEmbedding`` with ``n_j`` counted on the
  training split, so each step penalises only the rows in the batch, each by ``lam / n_j``: cost
  proportional to the batch. The tables step with the optimiser family chosen for the run: ``sgd`` and
  ``adagrad`` (row-wise, as FBGEMM) run fused inside backward, no table gradient is ever materialised;
  ``adam`` uses ``torch.optim.SparseAdam`` on the sparse MBA gradient.
- ``full``: the baseline the paper argues against (DeepCTR-Torch, FuxiCTR): ``lam / 2 * ||W||^2`` over
  every row of both tables, added to each batch's loss: a dense gradient and an update of the whole table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch import nn

import din_kernels as dk

from .data import InteractionData

REGULARIZERS = ("none", "full", "mba")


@dataclass
class EmbeddingSetup:
    """What the trainer needs: custom tables (or None), extra optimisers, and a loss penalty (or None)."""

    goods_table: Optional[nn.Module] = None
    cate_table: Optional[nn.Module] = None
    make_optimizers: Callable[[nn.Module], List[torch.optim.Optimizer]] = field(default=lambda model: [])
    penalty: Optional[Callable[[nn.Module], torch.Tensor]] = None


def _mba_table(counts, dim: int, lam: float, optimizer: str, lr: float) -> dk.MBAEmbedding:
    fused = optimizer if optimizer in dk.MBA_OPTIMIZERS else None  # (adam: SparseAdam on the sparse gradient)
    return dk.MBAEmbedding(len(counts), dim, torch.as_tensor(counts), lam, optimizer=fused, lr=lr, padding_idx=0)


def embedding_setup(kind: str, lam: float, train: InteractionData, max_len: int, optimizer: str, lr: float,
                    goods_dim: int, cate_dim: int) -> EmbeddingSetup:
    """Tables, optimisers and penalty for regulariser ``kind`` with strength ``lam``."""
    if kind not in REGULARIZERS:
        raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {kind!r}")
    if not lam >= 0:
        raise ValueError(f"the regularisation strength must be >= 0, got {lam}")
    if kind == "none" or lam == 0:
        return EmbeddingSetup()
    if kind == "full":
        def full_l2(model: nn.Module) -> torch.Tensor:
            items = model.items
            return 0.5 * lam * (items.goods.weight.pow(2).sum() + items.cates.weight.pow(2).sum())
        return EmbeddingSetup(penalty=full_l2)

    goods = _mba_table(train.goods_frequencies(max_len), goods_dim, lam, optimizer, lr)
    cates = _mba_table(train.cates_frequencies(max_len), cate_dim, lam, optimizer, lr)

    def sparse_optimizers(model: nn.Module) -> List[torch.optim.Optimizer]:
        if goods.optimizer is not None:  # fused: the tables step inside backward
            return []
        return [torch.optim.SparseAdam([goods.weight, cates.weight], lr=lr)]

    return EmbeddingSetup(goods_table=goods, cate_table=cates, make_optimizers=sparse_optimizers)


def table_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Parameters of MBA tables: they have their own update rule and stay out of the dense optimiser."""
    return [module.weight for module in model.modules() if isinstance(module, dk.MBAEmbedding)]
