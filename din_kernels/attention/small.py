"""The local activation unit for small problems, and Dice attention in training: one plain-autograd pass of
the same algebra as the chunked path (``first_layer.py``), over the whole padded batch at once.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .._dtypes import accumulation_dtype
from ..activations import activation_spec
from ..dice import dice as dice_op
from .composite import _check_launcher_args, candidates_per_history
from .first_layer import FirstLayer

Tensor = torch.Tensor

__all__ = ["SMALL_POSITIONS", "attention_torch_small"]

# Problems of at most this many positions (B x T, padding included) run ``attention_torch_small`` in eager
# mode: a dozen torch ops under autograd, without chunks, sorting or a hand-written backward, whose fixed
# Python cost (~1 ms a forward + backward) dominates there. Measured on the 2-core CPU (forward + backward,
# medians): B=16, T=10: 2.0x faster than the chunked path; B=64, T=20: 1.45x; B=128, T=20: 1.15x; B=256,
# T=20 (5,120): 1.05x; B=256, T=50 (12,800): 0.66x, and with short histories 0.41x (it scores the padding).
SMALL_POSITIONS = 4096


def attention_torch_small(
    query: Tensor, keys: Tensor, lengths: Tensor, weights: Sequence[Tensor],
    alphas: Optional[Sequence[Tensor]], dice_eval: Optional[Sequence[Tuple[Tensor, Tensor]]], eps: float,
    *, form: str, activation: str, normalize: str, scale: Optional[float],
    dice_training: Optional[float] = None,
) -> Tuple[Tensor, Tensor]:
    """Local activation unit for small problems (``SMALL_POSITIONS``), differentiable by autograd:
    query [R, D] (R = B * C candidate rows), keys [B, T, D], lengths [B] -> (out [R, D] in the query's dtype,
    attn [R, T]).

    The same algebra as the chunked path, over the whole padded batch at once: "concat" scores every
    position with one GEMM over ``[k, k * q_b]``, "outer" with ``bmm(k, M_b)``; the padding is scored and
    masked out. Autograd keeps the activations (small here) and runs the backward in C++. Same dtypes as
    the launchers: fp16/bf16 computed in fp32, attn in fp32 (fp64 for fp64 inputs).

    ``dice_training=momentum``: Dice in training mode (``din_attention(activation="dice", training=True)``,
    any size): every hidden layer through ``din_kernels.dice`` with the valid positions as its mask, so
    the batch statistics cover those only and ``dice_eval``'s running statistics are updated in place;
    gradients flow through the statistics (the Dice op's backward). ``dice_eval`` may then be None (no
    running statistics to update). With "concat" and under 3/4 of the positions valid, only the valid
    positions are scored (packed [P, H] activations: measured 1.3-1.5x at B=256-1024 with lengths uniform in
    [1, T]); the statistics are the same either way.
    """
    if dice_training is not None and dice_eval is None:
        dice_eval = [(None, None)] * (len(weights) // 2 - 1)  # one per hidden layer
    _check_launcher_args(weights, alphas, dice_eval, form, activation, normalize)
    candidates = candidates_per_history(query, keys)
    if candidates != 1:
        # query [B * C, D]: each history once per candidate row. A copy, C x the keys: small problems (B x C x
        # T <= SMALL_POSITIONS), and Dice in training mode, whose statistics span every candidate row
        keys, lengths = keys.repeat_interleave(candidates, 0), lengths.repeat_interleave(candidates)
    batch, max_len, dim = keys.shape
    dtype = accumulation_dtype(keys.dtype)
    q = query.to(dtype)  # [B, D]
    first = FirstLayer(weights[0], weights[1], dim, form, dtype)  # (its split is differentiable)
    invalid = torch.arange(max_len, device=keys.device) >= lengths[:, None]  # [B, T]
    # the padding is scored and pooled with weight 0 here: zeroed first, so that NaN or inf stored there
    # (0 * inf = NaN) reaches neither the output nor a gradient, as on the other paths
    k = keys.to(dtype).masked_fill(invalid[..., None], 0.0)  # [B, T, D]
    packed = None  # the flat indices of the valid positions, when only those are scored
    traced = dice_training is not None and torch.compiler.is_compiling()  # (no host read, no packing)
    if dice_training is not None and form == "concat" and batch * max_len and not traced:
        valid_count = int(lengths.clamp(0, max_len).sum())  # (Dice training runs eagerly: one read)
        if valid_count < 0.75 * batch * max_len:
            packed = (~invalid).reshape(-1).nonzero().squeeze(1)  # [P]
    u = first.u(q)  # [B, H1]
    if form == "concat":
        w_k = first.w_k  # [2D, H1]: k M_b = [k, k * q_b] @ W_k
        if packed is not None:
            rows = packed // max_len
            k_p = k.reshape(-1, dim).index_select(0, packed)  # [P, D]
            z = torch.cat([k_p, k_p * q.index_select(0, rows)], dim=1) @ w_k  # [P, H1]
            u = u.index_select(0, rows)[:, None, :]  # [P, 1, H1]: added as the padded form adds it
            z = z[:, None, :]
        else:
            kq = torch.cat([k, k * q[:, None, :]], dim=2)  # [B, T, 2D]
            z = torch.matmul(kq, w_k)  # [B, T, H1]
    else:
        z = torch.bmm(k, first.m(q))  # [B, T, H1]
    widths = [weights[i].shape[0] for i in range(0, len(weights) - 2, 2)]
    spec = activation_spec(activation)
    h = z + u[:, None, :] if packed is None else (z + u)[:, 0]  # [B, T, H1] or [P, H1]
    for layer in range(len(widths)):
        if layer:
            h = F.linear(h, weights[2 * layer].to(dtype), weights[2 * layer + 1].to(dtype))
        alpha = alphas[layer].to(dtype) if spec.has_alpha else None
        if dice_training is not None:
            running_mean, running_var = dice_eval[layer]
            if traced:
                h = _dice_training_traced(h, alpha, running_mean, running_var, ~invalid, dice_training, eps)
            else:
                h = dice_op(h, alpha, running_mean, running_var, training=True, momentum=dice_training, eps=eps,
                            mask=~invalid if packed is None else None)
            continue
        mean, rstd = (None, None)
        if spec.has_stats:
            mean, var = (t.to(dtype) for t in dice_eval[layer])
            rstd = torch.rsqrt(var + eps)
        h = spec.apply(h, alpha, mean, rstd)  # [B, T, H_l]
    scores = F.linear(h, weights[-2].to(dtype), weights[-1].to(dtype)).squeeze(-1)  # [B, T] (or [P])
    if packed is not None:
        scores = scores.new_zeros(batch * max_len).index_copy(0, packed, scores).view(batch, max_len)
    if scale is not None:
        scores = scores * scale
    if normalize == "none":
        attn = scores.masked_fill(invalid, 0.0)
    else:
        # an empty row gets finite (uniform) scores, zeroed below: no NaN in the softmax or its gradient
        filled = scores.masked_fill(invalid, -math.inf).masked_fill((lengths == 0)[:, None], 0.0)
        attn = torch.softmax(filled, dim=1).masked_fill(invalid, 0.0)
    out = torch.bmm(attn[:, None, :], k).squeeze(1)  # sum_t w * k
    return out.to(query.dtype), attn


def _dice_training_traced(h: Tensor, alpha: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                          valid: Tensor, momentum: float, eps: float) -> Tensor:
    """Dice in training mode on h [B, T, H] with the batch statistics over the ``valid`` [B, T] positions, in
    ops that ``torch.compile`` traces into one graph (``din_kernels.dice`` calls launchers without fake
    kernels, and the reference indexes the valid rows out, a data-dependent shape): masked sums, the count a
    tensor. The running statistics are updated as ``nn.BatchNorm1d`` does (unbiased variance), not at all
    when no position is valid; then the registry's Dice formula. Same math as ``reference.dice``; padding
    rows are left as they come (their scores are masked out after the MLP)."""
    weight = valid[..., None].to(h.dtype)  # [B, T, 1]
    count = weight.sum()
    denominator = count.clamp(min=1.0)
    mean = (h * weight).sum(dim=(0, 1)) / denominator  # [H]
    var = ((h - mean).square() * weight).sum(dim=(0, 1)) / denominator
    if running_mean is not None:
        with torch.no_grad():
            unbiased = var * (count / (count - 1.0).clamp(min=1.0))
            seen = count > 0
            for running, batch_value in ((running_mean, mean), (running_var, unbiased)):
                updated = running * (1.0 - momentum) + momentum * batch_value.to(running.dtype)
                running.copy_(torch.where(seen, updated, running))
    return activation_spec("dice").apply(h, alpha, mean, torch.rsqrt(var + eps))
