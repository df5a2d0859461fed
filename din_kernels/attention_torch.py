"""Torch composite path of the local activation unit: what runs where the Triton kernels do not (CPU).

Same algebra as the kernels (DESIGN.md, "Kernel design"): split the first layer ``W1`` by input block,

    concat ([q, k, q-k, q*k], W1 = [Wa|Wb|Wc|Wd]):
        z1[b,t] = u_b + k[b,t] @ M_b,   u_b = q_b (Wa + Wc)^T + b1,   M_b = (Wb - Wc)^T + diag(q_b) Wd^T
    outer  ([q, k, vec(q outer k)] with (a, c) at a*D + c, W1 = [Wq|Wk|Wo]):
        z1[b,t] = u_b + k[b,t] @ M_b,   u_b = q_b Wq^T + b1,          M_b = Wk^T + sum_a q_b[a] Wo[:, a*D:(a+1)*D]^T

so the ``[B, T, 4D]`` (or ``[B, T, D^2]``) feature tensor never exists: each batch row costs one
``[T, D] x [D, H1]`` product (``bmm``), or, for "concat" and short histories, ``k M_b`` is one GEMM over
``[k, k * q_b]`` (see ``_FirstLayer``); the other layers are plain GEMMs over the positions.

The backward is written by hand. Nothing of size ``[B, T, H]`` is kept between forward and backward
(only ``out``, the ``[B, T]`` weights and the ``[B]`` log-sum-exp): the backward recomputes the MLP and
fuses the activation derivatives into in-place passes. Work is done in chunks of batch rows, sorted by
history length, each chunk cut to its longest history: padded positions (weight 0, gradient 0) are
never scored, and a chunk's intermediates stay small enough to live in the CPU caches, which also
bounds the extra memory by the chunk size instead of ``B * T``. fp16/bf16 inputs are computed in fp32
(fp64 in fp64, for gradcheck).

Launchers (the same contract as the Triton launchers in ``attention.py``):

    attention_torch_forward(query, keys, lengths, weights, alphas, dice_eval, eps, *, form, activation,
                            normalize, scale) -> (out [B, D], attn [B, T], lse [B] or empty)
    attention_torch_backward(grad_out, query, keys, lengths, weights, alphas, dice_eval, eps, out, attn, lse,
                             *, form, activation, normalize, scale) -> (dquery, dkeys, dweights, dalphas)

``activation="dice"`` is Dice in eval mode (running statistics):
``f(x) = x * (alpha + (1 - alpha) * sigmoid((x - mean) / sqrt(var + eps)))``.
"""
from __future__ import annotations

import functools
import math
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ._checks import ACTIVATIONS, FORMS, NORMALIZATIONS, check_choice

Tensor = torch.Tensor

__all__ = ["attention_torch_forward", "attention_torch_backward"]

# Positions (rows x longest history) per chunk. Large enough that every GEMM is efficient, small enough
# that a chunk's [n, H] intermediates (n * 80 * 4 bytes ~ 2.6 MB) stay in cache and the extra memory small.
# On the 2-core CPU 8192 was as fast as or faster than 4096, 16384 and 32768 (B=1024, T=100 / B=256, T=500).
CHUNK_POSITIONS = 8192


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunks(lengths: Tensor, max_len: int, batch: int, dim: int) -> Iterator[Tuple[Union[slice, Tensor], int]]:
    """Chunks of batch rows, longest histories first; yields (rows, Tc) with Tc the chunk's longest length.

    A chunk holds about ``CHUNK_POSITIONS`` positions, and at most ``CHUNK_POSITIONS // D`` rows: each row
    also carries its ``M_b`` [D, H1], which dominates for short histories.

    ``rows`` is a slice when the lengths are already non-increasing (e.g. all equal: no gather needed),
    else an index tensor. Rows of length 0 are never yielded: they pool to zeros with zero gradients.
    """
    if batch == 0 or max_len == 0:
        return
    lengths_host = lengths.detach().to("cpu", torch.int64)
    sorted_len, perm = torch.sort(lengths_host, descending=True, stable=True)
    in_order = bool(torch.equal(perm, torch.arange(batch)))
    perm_device = None if in_order else perm.to(lengths.device)
    sorted_list = sorted_len.tolist()
    nonempty = batch - sorted_list.count(0)  # the empty rows sort last and are never read
    start = 0
    while start < nonempty:
        longest = sorted_list[start]
        stop = min(nonempty, start + max(1, CHUNK_POSITIONS // max(longest, dim)))
        rows = slice(start, stop) if in_order else perm_device[start:stop]
        yield rows, longest
        start = stop


class _FirstLayer:
    """The first layer as ``z1[b, t] = u_b + k[b, t] @ M_b`` (module docstring), forward and backward per chunk.

    Two ways to apply ``M_b``, chosen per chunk by its longest history Tc:
    - per row (``bmm``): build ``M_b`` [D, H1] for each row, then ``[Tc, D] x [D, H1]`` products.
          dM_b = k_b^T dz1_b;  dk = dz1 @ M_b^T;  dq_b and dW1 from dM_b and du_b = sum_t dz1[b, t]
      Always for "outer" (its D^2 features are far larger than M_b); for "concat" when Tc > 3D/4.
    - per position (one GEMM, "concat" with Tc <= 3D/4): ``k M_b = k (Wb - Wc)^T + (k * q_b) Wd^T
      = [k, k * q_b] @ W_k`` with ``W_k = [(Wb - Wc)^T; Wd^T]`` [2D, H1]. Twice the multiply-adds, but no
      D * H1 of per-row work (build M_b, dM_b and its reductions), which dominates short histories.
          G = dz1 @ W_k^T [n, 2D];  dk = G[:, :D] + G[:, D:] * q_b;  dq_b = sum_t G[:, D:] * k + du_b Wu
          dW_k = [k, k * q]^T dz1
    Measured here (one thread, forward + backward, full histories): B=1024, D=36, T=24: 43 ms per row, 32 ms
    per position; T=100: 112 vs 133 ms; B=512, D=64, T=64: 46 vs 53 ms.
    """

    def __init__(self, w1: Tensor, b1: Tensor, dim: int, form: str, dtype: torch.dtype):
        w1 = w1.to(dtype)
        self.form = form
        self.dim = dim
        self.hidden = w1.shape[0]
        self.b1 = b1.to(dtype)
        if form == "concat":
            wa, wb, wc, wd = w1.split(dim, dim=1)  # [H1, D] each
            self.w_u = wa + wc  # [H1, D]
            self.w_k = torch.cat([wb - wc, wd], dim=1).t().contiguous()  # [2D, H1] = [(Wb-Wc)^T; Wd^T]
            self.m_base, self.wd_t = self.w_k[:dim], self.w_k[dim:]  # [D, H1] each
        else:
            self.w_u = w1[:, :dim].contiguous()  # Wq [H1, D]
            self.m_base = w1[:, dim:2 * dim].t().contiguous()  # Wk^T [D, H1]
            # Wo[h, a*D + c] -> wo_p[a, c*H1 + h], so that M_b = Wk^T + q_b @ wo_p viewed [D, H1]
            wo = w1[:, 2 * dim:].reshape(self.hidden, dim, dim)  # [h, a, c]
            self.wo_p = wo.permute(1, 2, 0).reshape(dim, dim * self.hidden)

    def per_position(self, length: int) -> bool:
        return self.form == "concat" and 4 * length <= 3 * self.dim

    def forward(self, q: Tensor, k: Tensor, work: "_Workspace") -> Tuple[Tensor, Tensor]:
        """q [r, D], k [r, Tc, D] -> (z1 [r, Tc, H1] in the workspace, what ``backward`` needs)."""
        rows, length, dim = k.shape
        u = torch.addmm(self.b1, q, self.w_u.t())  # [r, H1]
        z = work.take("z0", rows, length, self.hidden)
        if self.per_position(length):
            kq = work.take("kq", rows, length, 2 * dim)  # [k, k * q_b]
            kq[..., :dim] = k
            torch.mul(k, q[:, None, :], out=kq[..., dim:])
            torch.mm(kq.view(-1, 2 * dim), self.w_k, out=z.view(-1, self.hidden))
            cache = kq
        else:
            if self.form == "concat":
                m = torch.addcmul(self.m_base, q[:, :, None], self.wd_t)  # (Wb-Wc)^T + diag(q_b) Wd^T
            else:
                m = torch.addmm(self.m_base.reshape(1, -1), q, self.wo_p).view(rows, dim, self.hidden)
            torch.bmm(k, m, out=z)  # [r, Tc, H1]
            cache = m
        return z.add_(u[:, None, :]), cache  # bmm/mm then an in-place add: baddbmm would copy u into z first

    def start_backward(self) -> None:
        zeros = functools.partial(torch.zeros, dtype=self.b1.dtype, device=self.b1.device)
        self.d_wu = zeros(self.hidden, self.dim)
        self.d_b1 = zeros(self.hidden)
        if self.form == "concat":
            self.d_wk = zeros(2 * self.dim, self.hidden)  # [d(Wb-Wc)^T; dWd^T]
        else:
            self.d_mbase = zeros(self.dim, self.hidden)
            self.d_wo_p = zeros(self.dim, self.dim * self.hidden)

    def backward(self, q: Tensor, k: Tensor, dz: Tensor, cache: Tensor, dk_out: Tensor,
                 work: "_Workspace") -> Tensor:
        """dz1 [r, Tc, H1] -> dq [r, D]; writes dk [r, Tc, D] into ``dk_out``; accumulates dW1, db1."""
        rows, length, dim = k.shape
        du = dz.sum(1)  # [r, H1]
        self.d_wu.addmm_(du.t(), q)
        self.d_b1 += du.sum(0)
        dq = du @ self.w_u  # [r, D]
        dz_flat = dz.view(-1, self.hidden)
        if self.per_position(length):
            kq = cache
            self.d_wk.addmm_(kq.view(-1, 2 * dim).t(), dz_flat)
            g = torch.mm(dz_flat, self.w_k.t(), out=work.take("g", rows * length, 2 * dim)).view(rows, length, -1)
            g_k, g_kq = g[..., :dim], g[..., dim:]  # [r, Tc, D] each
            torch.addcmul(g_k, g_kq, q[:, None, :], out=dk_out)
            dq += g_kq.mul_(k).sum(1)
            return dq
        m = cache
        dm = torch.bmm(k.transpose(1, 2), dz, out=work.take("dm", rows, dim, self.hidden))  # [r, D, H1]
        torch.bmm(dz, m.transpose(1, 2), out=dk_out)
        if self.form == "concat":
            # M[r, d, h] = base[d, h] + q[r, d] * WdT[d, h] (a product and a sum: faster here than the
            # matrix-vector products batched over d, which torch runs as a loop over d)
            self.d_wk[:dim] += dm.sum(0)
            self.d_wk[dim:] += (dm * q[:, :, None]).sum(0)  # sum_r q[r, d] dm[r, d, :]
            dq += (dm * self.wd_t).sum(-1)  # sum_h dm[r, d, h] WdT[d, h]
        else:
            self.d_mbase += dm.sum(0)
            dm_flat = dm.view(rows, -1)  # [r, D*H1]
            self.d_wo_p.addmm_(q.t(), dm_flat)
            dq.addmm_(dm_flat, self.wo_p.t())
        return dq

    def weight_grads(self, w1: Tensor, b1: Tensor) -> Tuple[Tensor, Tensor]:
        if self.form == "concat":
            d_wb_minus_wc, d_wd = self.d_wk.t().split(self.dim, dim=1)  # [H1, D] each
            dw1 = torch.cat([self.d_wu, d_wb_minus_wc, self.d_wu - d_wb_minus_wc, d_wd], dim=1)
        else:
            dim, hidden = self.dim, self.hidden
            d_wo = self.d_wo_p.view(dim, dim, hidden).permute(2, 0, 1).reshape(hidden, dim * dim)
            dw1 = torch.cat([self.d_wu, self.d_mbase.t(), d_wo], dim=1)
        return dw1.to(w1.dtype), self.d_b1.to(b1.dtype)


class _Activation:
    """Hidden-layer activation with a forward that works in place and a fused backward.

    ``forward(z)`` returns ``(h, saved)``: ``saved`` is what ``backward`` needs (h itself for sigmoid/relu,
    z for prelu/dice, nothing for identity). ``backward(dh, saved, layer)`` turns ``dh`` into ``dz`` in
    place and accumulates ``dalpha``.
        sigmoid: dz = dh * h * (1 - h)            relu: dz = dh * (h > 0)
        prelu:   dz = dh * (z >= 0 ? 1 : a),       da = sum dh * z * (z < 0)
        dice:    p = sigmoid((z - m) * r), r = 1/sqrt(v + eps), f = z * (a + (1 - a) p)
                 dz = dh * (a + (1 - a) * (p + z * p * (1 - p) * r)),   da = sum dh * z * (1 - p)
    """

    def __init__(self, kind: str, alphas, dice_eval, eps: float, widths: Sequence[int], dtype, device):
        self.kind = kind
        self.alphas: List[Optional[Tensor]] = [None] * len(widths)
        self.alpha_grads: List[Optional[Tensor]] = [None] * len(widths)
        self.alpha_full: List[bool] = [True] * len(widths)
        self.dice: List[Optional[Tuple[Tensor, Tensor]]] = [None] * len(widths)
        if kind in ("prelu", "dice"):
            for layer, width in enumerate(widths):
                alpha = alphas[layer].reshape(-1).to(dtype)
                self.alpha_full[layer] = alpha.numel() == width
                self.alphas[layer] = alpha.expand(width)
                self.alpha_grads[layer] = torch.zeros(width, dtype=dtype, device=device)
        if kind == "dice":
            for layer in range(len(widths)):
                mean, var = dice_eval[layer]
                self.dice[layer] = (mean.to(dtype), torch.rsqrt(var.to(dtype) + eps))

    def forward(self, z: Tensor, layer: int, keep: bool) -> Tuple[Tensor, Optional[Tensor]]:
        kind = self.kind
        if kind == "sigmoid":
            h = z.sigmoid_()
            return h, h
        if kind == "relu":
            h = z.relu_()
            return h, h
        if kind == "identity":
            return z, None
        alpha = self.alphas[layer]
        if kind == "prelu":
            h = torch.where(z >= 0, z, z * alpha)
            return h, (z if keep else None)
        mean, rstd = self.dice[layer]
        p = torch.sigmoid((z - mean) * rstd)
        # f = z * (a + (1 - a) p) = z * (p + a (1 - p))
        h = p.mul_(1.0 - alpha).add_(alpha).mul_(z)
        return h, (z if keep else None)

    def backward(self, dh: Tensor, saved: Optional[Tensor], layer: int) -> Tensor:
        kind = self.kind
        if kind == "sigmoid":
            # dh * h * (1 - h): aten's fused kernel, one pass, written into dh
            return torch.ops.aten.sigmoid_backward.grad_input(dh, saved, grad_input=dh)
        if kind == "relu":
            return torch.ops.aten.threshold_backward.grad_input(dh, saved, 0.0, grad_input=dh)
        if kind == "identity":
            return dh
        z, alpha = saved, self.alphas[layer]
        if kind == "prelu":
            negative = z < 0
            self.alpha_grads[layer] += (dh * z).masked_fill_(~negative, 0).sum(0)
            return dh.mul_(torch.where(negative, alpha, torch.ones_like(alpha)))
        mean, rstd = self.dice[layer]
        p = torch.sigmoid((z - mean) * rstd)
        one_minus_p = 1.0 - p
        dz_gate = dh * z  # [n, H]
        self.alpha_grads[layer] += (dz_gate * one_minus_p).sum(0)
        # (1 - a) * (p + z p (1 - p) r) + a
        slope = (z * one_minus_p).mul_(rstd).add_(1.0).mul_(p).mul_(1.0 - alpha).add_(alpha)
        return dh.mul_(slope)

    def alpha_grads_like(self, alphas) -> Optional[Tuple[Tensor, ...]]:
        if self.kind not in ("prelu", "dice"):
            return None
        grads = []
        for layer, alpha in enumerate(alphas):
            grad = self.alpha_grads[layer]
            if not self.alpha_full[layer]:
                grad = grad.sum()
            grads.append(grad.reshape(alpha.shape).to(alpha.dtype))
        return tuple(grads)


class _Workspace:
    """Scratch buffers shared by the chunks of one call. Every chunk writes its intermediates (``out=``) into
    the same memory: the pages are faulted in once and stay warm in cache, where a fresh multi-MB tensor per
    chunk and op costs page faults (measured: ~0.4 ms per MB touched here) and cache misses."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self.buffers = {}

    def take(self, name: str, *shape: int) -> Tensor:
        numel = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[name] = torch.empty(numel, dtype=self.dtype, device=self.device)
        return buffer[:numel].view(shape)


class _MLP:
    """The scoring MLP on one chunk of rows: recomputable forward, hand-written backward."""

    def __init__(self, weights: Sequence[Tensor], dim: int, form: str, activation: str, alphas, dice_eval,
                 eps: float, dtype: torch.dtype, device: torch.device):
        self.first = _FirstLayer(weights[0], weights[1], dim, form, dtype)
        self.layers = [(weights[i].to(dtype), weights[i + 1].to(dtype)) for i in range(2, len(weights) - 2, 2)]
        self.w_out = weights[-2].to(dtype).reshape(-1)  # [H_L]
        self.b_out = weights[-1].to(dtype)  # [1]
        self.widths = [weights[i].shape[0] for i in range(0, len(weights) - 2, 2)]
        self.act = _Activation(activation, alphas, dice_eval, eps, self.widths, dtype, device)
        self.dtype, self.device = dtype, device
        self.work = _Workspace(dtype, device)

    def scores(self, q: Tensor, k: Tensor, keep: bool):
        """q [r, D], k [r, Tc, D] -> scores [r, Tc] (+ what ``backward`` needs when ``keep``).
        The scores live in the workspace: consume them before the next chunk."""
        rows, length, _ = k.shape
        n, work = rows * length, self.work
        z, first_cache = self.first.forward(q, k, work)  # [r, Tc, H1]
        h, saved = self.act.forward(z.view(n, -1), 0, keep)  # [n, H1]
        hs, saveds = [h], [saved]
        for layer, (w, b) in enumerate(self.layers, start=1):
            z = torch.addmm(b, h, w.t(), out=work.take(f"z{layer}", n, self.widths[layer]))  # [n, H_l]
            h, saved = self.act.forward(z, layer, keep)
            hs.append(h)
            saveds.append(saved)
        s = torch.addmv(self.b_out, h, self.w_out, out=work.take("s", n)).view(rows, length)  # [r, Tc]
        return (s, (first_cache, hs, saveds)) if keep else (s, None)

    def start_backward(self) -> None:
        self.first.start_backward()
        self.d_layers = [(torch.zeros_like(w), torch.zeros_like(b)) for w, b in self.layers]
        self.d_w_out = torch.zeros_like(self.w_out)
        self.d_b_out = torch.zeros_like(self.b_out)

    def backward(self, q: Tensor, k: Tensor, grad_scores: Tensor, cache, dk_out: Tensor) -> Tensor:
        """grad_scores [r, Tc] -> dq [r, D]; writes dk through the MLP (dz1 @ M_b^T) into ``dk_out``
        [r, Tc, D]; accumulates the weight gradients."""
        first_cache, hs, saveds = cache
        rows, length, dim = k.shape
        n, work = rows * length, self.work
        g = grad_scores.reshape(-1)  # [n]
        self.d_w_out.addmv_(hs[-1].t(), g)
        self.d_b_out += g.sum()
        last = len(hs) - 1
        dh = torch.mul(g[:, None], self.w_out, out=work.take(f"d{last}", n, self.widths[last]))  # [n, H_L]
        for layer in range(last, 0, -1):
            dz = self.act.backward(dh, saveds[layer], layer)  # [n, H_l]
            w, _ = self.layers[layer - 1]
            d_w, d_b = self.d_layers[layer - 1]
            d_w.addmm_(dz.t(), hs[layer - 1])
            d_b += dz.sum(0)
            dh = torch.mm(dz, w, out=work.take(f"d{layer - 1}", n, self.widths[layer - 1]))  # [n, H_{l-1}]
        dz1 = self.act.backward(dh, saveds[0], 0).view(rows, length, -1)  # [r, Tc, H1]
        return self.first.backward(q, k, dz1, first_cache, dk_out, work)

    def weight_grads(self, weights: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        grads = list(self.first.weight_grads(weights[0], weights[1]))
        for index, (d_w, d_b) in enumerate(self.d_layers, start=1):
            grads += [d_w.to(weights[2 * index].dtype), d_b.to(weights[2 * index + 1].dtype)]
        grads += [self.d_w_out.view_as(weights[-2]).to(weights[-2].dtype), self.d_b_out.to(weights[-1].dtype)]
        return tuple(grads)


def _gather_keys(keys: Tensor, rows: Union[slice, Tensor], length: int, work: _Workspace) -> Tensor:
    """keys[rows, :length] in the compute dtype: a view when possible, else one copy into the workspace."""
    if isinstance(rows, slice):
        k = keys[rows, :length]
        return k if k.dtype == work.dtype else work.take("k", *k.shape).copy_(k)
    out = work.take("k", rows.numel(), length, keys.shape[2])
    if keys.dtype == work.dtype:
        return torch.index_select(keys[:, :length], 0, rows, out=out)
    return out.copy_(keys[rows, :length])


def _valid(lengths: Tensor, length: int) -> Tensor:
    return torch.arange(length, device=lengths.device) < lengths[:, None]  # [r, Tc] bool


def _normalize_(scores: Tensor, lengths: Tensor, normalize: str, scale: Optional[float]):
    """Scores [r, Tc] -> final weights (in place) and the softmax log-sum-exp [r] (None for "none")."""
    if scale is not None:
        scores.mul_(scale)
    invalid = ~_valid(lengths, scores.shape[1])
    if normalize == "none":
        return scores.masked_fill_(invalid, 0.0), None
    scores.masked_fill_(invalid, -math.inf)
    lse = torch.logsumexp(scores, dim=1)  # [r]; -inf for a row with no valid position
    lse.masked_fill_(lengths == 0, 0.0)  # finite, and exp(-inf - 0) = 0 weights that row out
    return scores.sub_(lse[:, None]).exp_(), lse


def _check_launcher_args(weights, alphas, dice_eval, form, activation, normalize):
    check_choice("form", form, FORMS)
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("normalize", normalize, NORMALIZATIONS)
    hidden = len(weights) // 2 - 1
    if len(weights) % 2 or hidden < 1:
        raise ValueError(f"weights must be (w1, b1, [w2, b2, ...], w_out, b_out) with at least one hidden "
                         f"layer, got {len(weights)} tensors")
    if activation in ("prelu", "dice") and (alphas is None or len(alphas) != hidden):
        raise ValueError(f"activation={activation!r} needs alphas, one per hidden layer ({hidden})")
    if activation == "dice" and (dice_eval is None or len(dice_eval) != hidden):
        raise ValueError(f"activation='dice' needs dice_eval: (running_mean, running_var) per hidden layer "
                         f"({hidden}); the composite path runs Dice in eval mode only")


def attention_torch_forward(
    query: Tensor, keys: Tensor, lengths: Tensor, weights: Sequence[Tensor],
    alphas: Optional[Sequence[Tensor]], dice_eval: Optional[Sequence[Tuple[Tensor, Tensor]]], eps: float,
    *, form: str, activation: str, normalize: str, scale: Optional[float],
) -> Tuple[Tensor, Tensor, Tensor]:
    """Local activation unit, forward. query [B, D], keys [B, T, D], lengths [B] ->
    (out [B, D] in the query's dtype, attn [B, T] final weights (0 at padding), lse [B] (softmax) or empty).

    attn and lse are fp32 (fp64 for fp64 inputs). Arguments are assumed validated by the caller
    (``_checks.check_attention_args``).
    """
    _check_launcher_args(weights, alphas, dice_eval, form, activation, normalize)
    batch, max_len, dim = keys.shape
    dtype, device = _compute_dtype(keys.dtype), keys.device
    mlp = _MLP(weights, dim, form, activation, alphas, dice_eval, eps, dtype, device)
    out = torch.zeros(batch, dim, dtype=query.dtype, device=device)
    attn = torch.zeros(batch, max_len, dtype=dtype, device=device)
    lse = torch.zeros(batch if normalize == "softmax" else 0, dtype=dtype, device=device)
    with torch.no_grad():
        for rows, length in _row_chunks(lengths, max_len, batch, dim):
            q = query[rows].to(dtype)  # [r, D]
            k = _gather_keys(keys, rows, length, mlp.work)  # [r, Tc, D]
            row_lengths = lengths[rows]
            scores, _ = mlp.scores(q, k, keep=False)
            w, row_lse = _normalize_(scores, row_lengths, normalize, scale)  # [r, Tc]
            attn[rows, :length] = w
            out[rows] = torch.bmm(w[:, None, :], k).squeeze(1).to(out.dtype)  # sum_t w * k
            if row_lse is not None:
                lse[rows] = row_lse
    return out, attn, lse


def attention_torch_backward(
    grad_out: Tensor, query: Tensor, keys: Tensor, lengths: Tensor, weights: Sequence[Tensor],
    alphas: Optional[Sequence[Tensor]], dice_eval: Optional[Sequence[Tuple[Tensor, Tensor]]], eps: float,
    out: Tensor, attn: Tensor, lse: Tensor,
    *, form: str, activation: str, normalize: str, scale: Optional[float],
):
    """Local activation unit, backward: recomputes the MLP chunk by chunk from the inputs.

    dattn[b, t] = grad_out_b . k[b, t];  softmax: ds = attn * (dattn - sum_t attn * dattn), else ds = dattn at
    valid positions; the scores' gradient is ds * scale. dk = attn * grad_out + dz1 @ M_b^T; dq, dW from
    du_b = sum_t dz1 and dM_b = k_b^T dz1 (see ``_FirstLayerGrad``).
    Returns (dquery [B, D], dkeys [B, T, D], dweights like weights, dalphas like alphas or None).
    ``out`` and ``lse`` are not needed here (the saved weights carry the softmax) but are part of the
    launcher contract shared with the Triton path.
    """
    _check_launcher_args(weights, alphas, dice_eval, form, activation, normalize)
    batch, max_len, dim = keys.shape
    dtype, device = _compute_dtype(keys.dtype), keys.device
    mlp = _MLP(weights, dim, form, activation, alphas, dice_eval, eps, dtype, device)
    mlp.start_backward()
    d_query = torch.zeros(batch, dim, dtype=query.dtype, device=device)
    # Written chunk by chunk below; only the padding tails and the empty rows need explicit zeros.
    d_keys = torch.empty(batch, max_len, dim, dtype=keys.dtype, device=device)
    with torch.no_grad():
        for rows, length in _row_chunks(lengths, max_len, batch, dim):
            q = query[rows].to(dtype)  # [r, D]
            k = _gather_keys(keys, rows, length, mlp.work)  # [r, Tc, D]
            g_out = grad_out[rows].to(dtype)  # [r, D]
            w = attn[rows, :length].to(dtype)  # [r, Tc]
            d_attn = torch.bmm(k, g_out[:, :, None]).squeeze(2)  # [r, Tc]
            if normalize == "softmax":
                d_scores = d_attn.sub_((w * d_attn).sum(1, keepdim=True)).mul_(w)
            else:
                d_scores = d_attn.masked_fill_(~_valid(lengths[rows], length), 0.0)
            if scale is not None:
                d_scores.mul_(scale)
            _, cache = mlp.scores(q, k, keep=True)
            direct = isinstance(rows, slice) and length == max_len and d_keys.dtype == dtype
            # full-length rows in order: write dk straight into d_keys, else via the workspace
            dk = d_keys[rows] if direct else mlp.work.take("dk", k.shape[0], length, dim)  # [r, Tc, D]
            dq = mlp.backward(q, k, d_scores, cache, dk)
            dk.addcmul_(w[:, :, None], g_out[:, None, :])  # pooling: d(sum_t w k)/dk = w * grad_out
            d_query[rows] = dq.to(d_query.dtype)
            if not direct:
                d_keys[rows, :length] = dk.to(d_keys.dtype)
                if length < max_len:
                    d_keys[rows, length:] = 0.0
        empty_rows = lengths == 0
        if max_len and bool(empty_rows.any()):
            d_keys[empty_rows] = 0.0
    d_alphas = mlp.act.alpha_grads_like(alphas) if alphas is not None else None
    return d_query, d_keys, mlp.weight_grads(weights), d_alphas
