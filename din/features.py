"""Item representation: goods and category embeddings concatenated, padding id 0; embedding initialisation."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

import din_kernels as dk

Tensor = torch.Tensor

#: embedding initialisation schemes (``ModelConfig.embedding_init``):
#: ``normal``  N(0, std^2), as DeepCTR-Torch and FuxiCTR (std 1e-4);
#: ``uniform`` U(-a, a) with a = std * sqrt(3), the same variance;
#: ``glorot``  TensorFlow's default for a variable [N, D], U(-a, a) with a = sqrt(6 / (N + D)), as the
#:             official DIN code (std is ignored);
#: ``torch``   N(0, 1), ``nn.Embedding``'s own default (std is ignored).
EMBEDDING_INITS = ("normal", "uniform", "glorot", "torch")


@torch.no_grad()
def init_embedding_(weight: Tensor, scheme: str, std: float, padding_idx: Optional[int] = 0) -> Tensor:
    """Re-initialise an embedding table ``weight`` [N, D] in place by ``scheme`` (see :data:`EMBEDDING_INITS`);
    the ``padding_idx`` row (if any) is set to zeros. Works for ``nn.Embedding`` and ``MBAEmbedding`` tables."""
    if scheme not in EMBEDDING_INITS:
        raise ValueError(f"embedding init must be one of {EMBEDDING_INITS}, got {scheme!r}")
    if not (isinstance(std, (int, float)) and math.isfinite(std) and std > 0):
        raise ValueError(f"embedding init std must be a finite number > 0, got {std!r}")
    rows, dim = weight.shape
    if scheme == "normal":
        weight.normal_(0.0, std)
    elif scheme == "uniform":
        weight.uniform_(-std * math.sqrt(3.0), std * math.sqrt(3.0))
    elif scheme == "glorot":
        bound = math.sqrt(6.0 / (rows + dim))
        weight.uniform_(-bound, bound)
    else:
        weight.normal_(0.0, 1.0)
    if padding_idx is not None:
        weight[padding_idx].zero_()
    return weight


def _plain(table: nn.Module, grad: bool) -> bool:
    """A CPU ``nn.Embedding`` whose lookup ``din_kernels.embedding_concat`` reproduces exactly (the value; with
    ``grad``, the gradient too: dense, unscaled)."""
    return (type(table) is nn.Embedding and table.weight.device.type == "cpu" and table.max_norm is None
            and not (grad and (table.sparse or table.scale_grad_by_freq)))


def lookup(table: nn.Module, ids: Tensor) -> Tensor:
    """``table(ids)``; a plain CPU ``nn.Embedding`` through ``din_kernels.embedding_concat`` (same values and
    gradient)."""
    return lookup_concat([table], [ids])


def lookup_concat(tables: Sequence[nn.Module], ids: Sequence[Tensor]) -> Tensor:
    """``torch.cat([table(i) for table, i in zip(tables, ids)], dim=-1)`` (ids of one shape); plain CPU
    ``nn.Embedding`` tables through ``din_kernels.embedding_concat`` in one pass, any others as they are. Under
    ``torch.compile`` / ``torch.export`` the tables' own lookups: the gathers into slices of one output
    (``index_select(out=)``) trace into a graph whose parameters cannot take gradients through them."""
    if torch.compiler.is_compiling() or not all(_plain(t, torch.is_grad_enabled()) for t in tables):
        parts = [table(i) for table, i in zip(tables, ids)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return dk.embedding_concat([t.weight for t in tables], ids, [t.padding_idx for t in tables])


class ItemEmbedding(nn.Module):
    """``item(g, c) = [goods_emb(g), cate_emb(c)]``: the vector DIN uses for a candidate and a behaviour.

    Id 0 is padding in both tables (its row starts at zero and gets no gradient). ``goods``/``cates`` may be
    any shape; the output adds a last dimension of ``goods_dim + cate_dim``. Custom tables (for example
    ``din_kernels.MBAEmbedding``) can replace the default ``nn.Embedding`` ones.
    """

    def __init__(self, num_goods: int, num_cates: int, goods_dim: int = 18, cate_dim: int = 18,
                 goods_table: Optional[nn.Module] = None, cate_table: Optional[nn.Module] = None):
        super().__init__()
        self.goods = goods_table if goods_table is not None else nn.Embedding(num_goods, goods_dim, padding_idx=0)
        self.cates = cate_table if cate_table is not None else nn.Embedding(num_cates, cate_dim, padding_idx=0)
        self.dim = goods_dim + cate_dim

    def forward(self, goods: Tensor, cates: Tensor) -> Tensor:
        return lookup_concat([self.goods, self.cates], [goods, cates])

    def candidate_and_history(self, goods: Tensor, cates: Tensor, hist_goods: Tensor,
                              hist_cates: Tensor) -> Tuple[Tensor, Tensor]:
        """Embed the candidates [B] (or [B, C]: several per history) and the histories [B, T] with ONE
        lookup per table.

        One lookup matters for tables that update themselves inside backward (MBA with a fused
        optimizer): each step must see every id of the batch at once, so that a row occurring both as
        candidate and as behaviour is coalesced and stepped once.
        -> ([B, D] (or [B, C, D]), [B, T, D]), both contiguous
        """
        batch, seq_len = hist_goods.shape
        # histories first, then candidates, so that both come out as contiguous views of the lookup; split
        # (unlike indexing) backpropagates as one concatenation, not a zero-filled [B, 1 + T, D] per view
        items = self(torch.cat([hist_goods.reshape(-1), goods.reshape(-1)]),
                     torch.cat([hist_cates.reshape(-1), cates.reshape(-1)]))  # [B * T + B * C, D]
        history, candidate = torch.split(items, [batch * seq_len, goods.numel()])
        dim = items.shape[-1]  # explicit: a view of zero elements (T = 0 or C = 0) cannot infer -1
        return candidate.view(*goods.shape, dim), history.view(batch, seq_len, dim)
