"""Pure-PyTorch oracle of every op in din_kernels.

Nothing here is fast and nothing here is clever: each function spells out the definition from the
paper (Zhou et al., KDD 2018) or DESIGN.md in plain tensor code, for any depth and width, so that the
fused kernels and the composite path can be tested against it. It is never the fast path.

The functions assume validated arguments; the public wrappers in ``din_kernels`` validate first.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._dtypes import accumulation_dtype

Tensor = torch.Tensor

__all__ = [
    "attention_features",
    "din_attention",
    "dice",
    "mba_embedding",
    "mba_sgd_",
    "mba_adagrad_",
    "row_frequencies",
    "valid_mask",
]


def valid_mask(lengths: Tensor, max_len: int) -> Tensor:
    """``mask[b, t] = t < lengths[b]``: valid positions sit first, padding at the end.  # [B, T] bool"""
    positions = torch.arange(max_len, device=lengths.device)
    return positions[None, :] < lengths[:, None]


def attention_features(query: Tensor, keys: Tensor, form: str) -> Tensor:
    """Input of the local activation unit's MLP for every (candidate, behaviour) pair.

    ``form="concat"``: ``[q, k, q - k, q * k]`` (official DIN code, DeepCTR)   -> [B, T, 4D]
    ``form="outer"``:  ``[q, k, vec(q outer k)]`` with element (a, c) at a*D + c (paper figure) -> [B, T, 2D + D^2]
    """
    batch, seq_len, dim = keys.shape
    q = query[:, None, :].expand(batch, seq_len, dim)
    if form == "concat":
        return torch.cat([q, keys, q - keys, q * keys], dim=-1)
    if form == "outer":
        outer = q[..., :, None] * keys[..., None, :]  # [B, T, D, D], (a, c) = q_a * k_c
        return torch.cat([q, keys, outer.reshape(batch, seq_len, dim * dim)], dim=-1)
    raise ValueError(f"form must be 'concat' or 'outer', got {form!r}")


def dice(
    x: Tensor,
    alpha: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-8,
    mask: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """Dice (paper Eq. 7): ``f(x) = p * x + (1 - p) * alpha * x``, ``p = sigmoid((x - E[x]) / sqrt(Var[x] + eps))``.

    x: [N, C] or [B, T, C]; mask: [B, T] bool (True = valid) for the 3-D form, so that padded positions
    neither enter the statistics nor matter. Training: per-channel mean and biased variance over the valid
    rows; ``running_mean``/``running_var`` (when given) are updated in place as ``nn.BatchNorm1d`` does,
    with the unbiased variance. Eval: the running statistics. ``weight``/``bias`` (both or neither) put a
    learnable affine map inside the sigmoid, ``p = sigmoid(weight * xhat + bias)``, as DeepCTR-Torch's Dice.
    """
    channels = x.shape[-1]
    if training:
        rows = x.reshape(-1, channels)
        if mask is not None:
            rows = rows[mask.reshape(-1)]
        count = rows.shape[0]
        if count > 0:
            mean = rows.mean(dim=0)
            var = rows.var(dim=0, unbiased=False)
        else:  # nothing valid: any finite statistics do, the outputs are all padding
            mean = x.new_zeros(channels)
            var = x.new_zeros(channels)
        if running_mean is not None and count > 0:
            with torch.no_grad():
                unbiased = var * (count / max(count - 1, 1))
                running_mean.mul_(1.0 - momentum).add_(momentum * mean.to(running_mean.dtype))
                running_var.mul_(1.0 - momentum).add_(momentum * unbiased.to(running_var.dtype))
    else:
        mean, var = running_mean.to(x.dtype), running_var.to(x.dtype)
    normalized = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        normalized = normalized * weight + bias
    p = torch.sigmoid(normalized)
    return p * x + (1.0 - p) * alpha * x


def dice_mlp(
    x: Tensor,
    weights: Sequence[Tensor],
    alphas: Sequence[Tensor],
    running_means: Optional[Sequence[Tensor]],
    running_vars: Optional[Sequence[Tensor]],
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-8,
) -> Tensor:
    """DIN's head: ``[Linear -> Dice] * L -> Linear`` over x [N, F]; ``weights = (W_1, b_1, ..., W_out, b_out)``
    as ``nn.Linear`` keeps them, one alpha (and optionally one pair of running statistics) per hidden layer."""
    h = x
    for layer in range(len(weights) // 2 - 1):
        stats = (running_means[layer], running_vars[layer]) if running_means is not None else (None, None)
        h = dice(h @ weights[2 * layer].T + weights[2 * layer + 1], alphas[layer], *stats, training=training,
                 momentum=momentum, eps=eps)
    return h @ weights[-2].T + weights[-1]


def _hidden_activation(
    h: Tensor,
    activation: str,
    layer: int,
    mask: Tensor,
    alphas: Optional[Sequence[Tensor]],
    dice_stats: Optional[Sequence[Tuple[Tensor, Tensor]]],
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    if activation == "sigmoid":
        return torch.sigmoid(h)
    if activation == "relu":
        return torch.relu(h)
    if activation == "identity":
        return h
    if activation == "tanh":
        return torch.tanh(h)
    if activation == "prelu":
        alpha = alphas[layer]
        return torch.where(h >= 0, h, alpha * h)
    if activation == "dice":
        running_mean, running_var = dice_stats[layer] if dice_stats is not None else (None, None)
        return dice(h, alphas[layer], running_mean, running_var, training=training,
                    momentum=momentum, eps=eps, mask=mask)
    raise ValueError(f"unknown activation {activation!r}")


def din_attention(
    query: Tensor,
    keys: Tensor,
    lengths: Tensor,
    weights: Sequence[Tensor],
    *,
    form: str = "concat",
    activation: str = "sigmoid",
    normalize: str = "none",
    scale: Optional[float] = None,
    return_scores: bool = False,
    alphas: Optional[Sequence[Tensor]] = None,
    dice_stats: Optional[Sequence[Tuple[Tensor, Tensor]]] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-8,
):
    """Local activation unit: ``out_b = sum_t w[b, t] * k[b, t]`` with ``w`` from an MLP over features(q_b, k[b, t]).

    query [B, D], keys [B, T, D], lengths [B] (valid positions [0, lengths[b])), weights
    ``(w1, b1, ..., w_out, b_out)`` in ``nn.Linear`` layout; hidden layers use ``activation``, the output
    layer (width 1) is linear. Scores ``s = mlp(...) * scale`` (scale when given).
    ``normalize="none"``: ``w = s`` at valid positions, 0 at padding (paper: the sum keeps interest
    intensity). ``"softmax"``: softmax over the valid positions only (official code). A row of length 0
    gets weights 0, output 0 and finite gradients. ``alphas``: one [H_l] tensor per hidden layer (prelu
    slope or dice alpha); ``dice_stats``: one (running_mean, running_var) pair per hidden layer.
    Returns ``out`` [B, D], or ``(out, weights [B, T])`` with ``return_scores``. ``query`` [B, C, D] scores C
    candidates against each history: per candidate exactly the above (out [B, C, D], weights [B, C, T]);
    Dice's batch statistics in training then span every candidate's valid positions.
    """
    if query.dim() == 3:
        batch, candidates, dim = query.shape
        result = din_attention(
            query.reshape(batch * candidates, dim), keys.repeat_interleave(candidates, 0),
            lengths.reshape(-1).repeat_interleave(candidates), weights, form=form, activation=activation,
            normalize=normalize, scale=scale, return_scores=True, alphas=alphas, dice_stats=dice_stats,
            training=training, momentum=momentum, eps=eps)
        out, attn = result[0].view(batch, candidates, dim), result[1].view(batch, candidates, keys.shape[1])
        return (out, attn) if return_scores else out
    batch, seq_len, _ = keys.shape
    mask = valid_mask(lengths, seq_len)  # [B, T]
    h = attention_features(query, keys, form)  # [B, T, F]
    num_hidden = len(weights) // 2 - 1
    for layer in range(num_hidden):
        h = F.linear(h, weights[2 * layer], weights[2 * layer + 1])
        h = _hidden_activation(h, activation, layer, mask, alphas, dice_stats, training, momentum, eps)
    scores = F.linear(h, weights[-2], weights[-1]).squeeze(-1)  # [B, T]
    if scale is not None:
        scores = scores * scale
    if normalize == "none":
        attn = torch.where(mask, scores, torch.zeros_like(scores))
    elif normalize == "softmax":
        # A finite fill (not -inf) keeps an all-padding row finite: its uniform softmax is zeroed below,
        # and masked_fill sends no gradient to the padded scores.
        filled = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        attn = torch.softmax(filled, dim=-1)
        attn = torch.where(mask, attn, torch.zeros_like(attn))
    else:
        raise ValueError(f"normalize must be 'none' or 'softmax', got {normalize!r}")
    out = torch.einsum("bt,btd->bd", attn, keys)
    return (out, attn) if return_scores else out


class _MBAEmbeddingFunction(torch.autograd.Function):
    """Gather whose weight gradient is the coalesced sparse row gradient plus the MBA term."""

    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, inv_freq: Tensor, lam: float) -> Tensor:
        ctx.save_for_backward(ids, weight, inv_freq)
        ctx.lam = lam
        return weight[ids]

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        ids, weight, inv_freq = ctx.saved_tensors
        unique_ids, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        grad_rows = grad_out.reshape(-1, weight.shape[1])
        acc = accumulation_dtype(weight.dtype)
        summed = torch.zeros(unique_ids.numel(), weight.shape[1], dtype=acc, device=weight.device)
        summed.index_add_(0, inverse, grad_rows.to(acc))
        rows = weight[unique_ids].to(acc)
        values = summed + ctx.lam * inv_freq[unique_ids].to(acc)[:, None] * rows
        grad_weight = torch.sparse_coo_tensor(
            unique_ids[None, :], values.to(weight.dtype), weight.shape, is_coalesced=True,
            check_invariants=False,  # indices are unique and sorted by construction
        )
        return None, grad_weight, None, None


def mba_embedding(ids: Tensor, weight: Tensor, inv_freq: Tensor, lam: float) -> Tensor:
    """``weight[ids]``; the gradient for ``weight`` is a coalesced sparse COO tensor over the unique ids j
    with rows ``sum_{i: ids_i = j} grad_out_i + lam * inv_freq[j] * w_j`` (the gradient of
    ``lam / 2 * sum_{j in batch} ||w_j||^2 / n_j`` added once per unique row).  ids [...] -> [..., D]"""
    return _MBAEmbeddingFunction.apply(ids, weight, inv_freq, float(lam))


def _coalesce_rows(ids: Tensor, grad_rows: Tensor, acc: torch.dtype) -> Tuple[Tensor, Tensor]:
    unique_ids, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
    summed = torch.zeros(unique_ids.numel(), grad_rows.shape[-1], dtype=acc, device=grad_rows.device)
    summed.index_add_(0, inverse, grad_rows.reshape(-1, grad_rows.shape[-1]).to(acc))
    return unique_ids, summed


@torch.no_grad()
def mba_sgd_(weight: Tensor, ids: Tensor, grad_rows: Tensor, inv_freq: Tensor, lr: float, lam: float) -> Tensor:
    """MBA SGD step, in place: for each unique id j in ``ids``, ``g_j = sum of grad_rows with id j`` and
    ``w_j <- w_j - lr * (g_j + lam * inv_freq[j] * w_j)``. Every other row stays bit-identical.
    weight [N, D], ids [K], grad_rows [K, D], inv_freq [N] (= 1 / n_j)."""
    acc = accumulation_dtype(weight.dtype)
    unique_ids, summed = _coalesce_rows(ids, grad_rows, acc)
    rows = weight[unique_ids].to(acc)
    rows -= lr * (summed + lam * inv_freq[unique_ids].to(acc)[:, None] * rows)
    weight[unique_ids] = rows.to(weight.dtype)
    return weight


@torch.no_grad()
def mba_adagrad_(
    weight: Tensor, state: Tensor, ids: Tensor, grad_rows: Tensor, inv_freq: Tensor,
    lr: float, lam: float, eps: float = 1e-10,
) -> Tensor:
    """Row-wise Adagrad with the MBA term (FBGEMM's exact row-wise Adagrad), in place, touched rows only:
    ``g'_j = g_j + lam * inv_freq[j] * w_j``; ``state_j += mean_d(g'_j ** 2)``;
    ``w_j -= lr * g'_j / (sqrt(state_j) + eps)``.  state [N] (fp32)."""
    acc = accumulation_dtype(weight.dtype)
    unique_ids, summed = _coalesce_rows(ids, grad_rows, acc)
    rows = weight[unique_ids].to(acc)
    grad = summed + lam * inv_freq[unique_ids].to(acc)[:, None] * rows
    accumulated = state[unique_ids].to(acc) + grad.pow(2).mean(dim=1)
    state[unique_ids] = accumulated.to(state.dtype)
    rows -= lr * grad / (accumulated.sqrt() + eps)[:, None]
    weight[unique_ids] = rows.to(weight.dtype)
    return weight


def row_frequencies(ids: Tensor, num_rows: int) -> Tensor:
    """``n_j``: how often row j occurs in ``ids`` (any shape).  -> [num_rows] int64"""
    return torch.bincount(ids.reshape(-1).long(), minlength=num_rows)
