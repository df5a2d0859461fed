"""Item representation: goods and category embeddings concatenated, padding id 0."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

Tensor = torch.Tensor


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
        return torch.cat([self.goods(goods), self.cates(cates)], dim=-1)

    def candidate_and_history(self, goods: Tensor, cates: Tensor, hist_goods: Tensor,
                              hist_cates: Tensor) -> Tuple[Tensor, Tensor]:
        """Embed the candidates [B] and the histories [B, T] with ONE lookup per table.

        One lookup matters for tables that update themselves inside backward (MBA with a fused
        optimizer): each step must see every id of the batch at once, so that a row occurring both as
        candidate and as behaviour is coalesced and stepped once.  -> ([B, D], [B, T, D])
        """
        items = self(torch.cat([goods[:, None], hist_goods], dim=1),
                     torch.cat([cates[:, None], hist_cates], dim=1))  # [B, 1 + T, D]
        return items[:, 0], items[:, 1:]
