"""Search before attention: SIM's retrieval stage (Pi et al., CIKM 2020, "Search-based User Interest Modeling
with Lifelong Sequential Behavior Data for Click-Through Rate Prediction", arXiv 2006.05639).

The local activation unit costs ``O(T)`` per candidate, so a history of thousands of behaviours is usually cut
to its last ``T``, losing every older interest. SIM first *retrieves*, per candidate, the ``k`` behaviours most
related to it from a long history and runs the attention on those only:

* ``"category"`` (SIM's hard search): the behaviours whose category equals the candidate's; of those, the
  ``k`` most recent. It reads only the id tensors, so it runs before any embedding lookup and the behaviours
  it drops are never embedded.
* ``"inner-product"`` (the idea of SIM's soft search, with the model's own item embeddings instead of a
  separately trained one): the ``k`` behaviours whose item embedding ``[goods_emb, cate_emb]`` has the largest
  inner product with the candidate's. The selection itself is not differentiable (as SIM's top-k); the
  gradient reaches the embeddings through the retained behaviours.

Both are vectorised over the batch (no Python loop over rows) and return, per row, the retained history
positions in time order, left-aligned, with the count retained: the layout of :class:`din.data.Batch`
(``[0, lengths[b])`` valid, oldest first, padding at the end), so the attention runs on them unchanged.
"""
from __future__ import annotations

from typing import Tuple

import torch

Tensor = torch.Tensor

#: ``ModelConfig.history_search`` values (``"none"``: the attention sees the whole, truncated, history)
SEARCH_MODES = ("none", "category", "inner-product")


def _check_top_k(top_k) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    return top_k


def _check_history(ids: Tensor, lengths: Tensor, name: str) -> Tuple[int, int]:
    if ids.dim() != 2:
        raise ValueError(f"{name} must be [B, T], got shape {tuple(ids.shape)}")
    batch, width = ids.shape
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must be [B] = [{batch}], got shape {tuple(lengths.shape)}")
    return batch, width


def category_search(hist_cates: Tensor, lengths: Tensor, cate: Tensor, top_k: int) -> Tuple[Tensor, Tensor]:
    """Per row, the positions of the ``top_k`` most recent valid behaviours whose category is ``cate[b]``.

    Args:
        hist_cates: ``[B, T]`` category ids, oldest first, valid positions ``[0, lengths[b])``.
        lengths: ``[B]`` valid positions per row (``0..T``).
        cate: ``[B]`` the candidates' category ids.
        top_k: the most behaviours to keep per row (> 0; may exceed ``T``).

    Returns:
        ``(positions [B, K], kept [B])`` with ``K = min(top_k, T)``: ``positions[b, :kept[b]]`` are the
        retained positions in increasing (time) order, the rest 0; ``kept[b] = min(top_k, matches in row b)``.
    """
    top_k = _check_top_k(top_k)
    batch, width = _check_history(hist_cates, lengths, "hist_cates")
    if cate.shape != (batch,):
        raise ValueError(f"cate must be [B] = [{batch}], got shape {tuple(cate.shape)}")
    slots = min(top_k, width)
    time = torch.arange(width, device=hist_cates.device)  # [T]
    match = (time[None, :] < lengths[:, None]) & (hist_cates == cate[:, None])  # [B, T]
    # matches at or after each position: a match is among the k most recent iff that count is <= k
    from_end = match.flip(1).cumsum(1).flip(1)  # [B, T]
    keep = match & (from_end <= top_k)  # [B, T]
    kept = keep.sum(1)  # [B]
    # each kept position goes to its rank among the kept ones; the others to a spare column, cut off after
    slot = torch.where(keep, keep.cumsum(1) - 1, slots)  # [B, T]
    positions = torch.zeros(batch, slots + 1, dtype=torch.long, device=hist_cates.device)
    positions.scatter_(1, slot, time.expand(batch, width))
    return positions[:, :slots], kept


@torch.no_grad()
def inner_product_search(query: Tensor, keys: Tensor, lengths: Tensor, top_k: int) -> Tuple[Tensor, Tensor]:
    """Per row, the positions of the ``top_k`` valid behaviours with the largest ``query[b] . keys[b, t]``.

    Ties (a goods clicked twice has one embedding) go to the more recent behaviour, so the result is a
    function of the inputs, not of the sort's internals.

    Args:
        query: ``[B, D]`` candidate embeddings.
        keys: ``[B, T, D]`` behaviour embeddings, valid positions ``[0, lengths[b])``.
        lengths: ``[B]``.
        top_k: the most behaviours to keep per row (> 0; may exceed ``T``).

    Returns:
        ``(positions [B, K], kept [B])`` with ``K = min(top_k, T)``, as :func:`category_search`;
        ``kept[b] = min(top_k, lengths[b])``.
    """
    top_k = _check_top_k(top_k)
    if keys.dim() != 3:
        raise ValueError(f"keys must be [B, T, D], got shape {tuple(keys.shape)}")
    batch, width = _check_history(keys[..., 0], lengths, "keys")
    if query.shape != (batch, keys.shape[2]):
        raise ValueError(f"query must be [B, D] = [{batch}, {keys.shape[2]}], got shape {tuple(query.shape)}")
    slots = min(top_k, width)
    time = torch.arange(width, device=keys.device)  # [T]
    valid = time[None, :] < lengths[:, None]  # [B, T]
    scores = torch.einsum("bd,btd->bt", query.float(), keys.float())  # [B, T]
    # a valid behaviour must outrank padding even when its score overflowed (or is NaN): finite first
    finite = torch.finfo(scores.dtype)
    scores = scores.nan_to_num(nan=finite.min, posinf=finite.max, neginf=finite.min).masked_fill(~valid, float("-inf"))
    # newest first, so that the stable descending sort puts the newest of equal scores first
    order = torch.sort(scores.flip(1), dim=1, descending=True, stable=True).indices[:, :slots]  # [B, K]
    kept = lengths.clamp(max=slots)  # [B]
    rank = torch.arange(slots, device=keys.device)  # [K]
    chosen = rank[None, :] < kept[:, None]  # [B, K]
    # back to time order, the unused slots (sorted past every real position) at the end
    positions = torch.where(chosen, width - 1 - order, width).sort(dim=1).values
    return torch.where(chosen, positions, 0), kept


def gather_history(ids: Tensor, positions: Tensor, kept: Tensor) -> Tensor:
    """``ids[b, positions[b, j]]`` for ``j < kept[b]``, 0 (the padding id) beyond: ``[B, T] -> [B, K]``."""
    slots = positions.shape[1]
    if ids.shape[1] == 0:  # an empty history has nothing to gather (and kept is 0)
        return ids.new_zeros(ids.shape[0], slots)
    valid = torch.arange(slots, device=ids.device)[None, :] < kept[:, None]
    return torch.where(valid, ids.gather(1, positions), 0)
