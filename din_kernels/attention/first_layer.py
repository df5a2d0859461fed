"""The first layer of the local activation unit, split by input block: the one home of its algebra.

The MLP's input for candidate ``q_b`` and behaviour ``k[b, t]`` is ``[q, k, q - k, q * k]`` ("concat", 4D
features) or ``[q, k, vec(q outer k)]`` ("outer", 2D + D^2), so ``W1`` splits into blocks and the first
layer becomes a per-row affine map of the keys::

    concat, W1 = [Wa | Wb | Wc | Wd]:  z1[b, t] = u_b + k[b, t] @ M_b
        u_b = q_b (Wa + Wc)^T + b1                        # [H1]
        M_b = (Wb - Wc)^T + diag(q_b) Wd^T                # [D, H1]
    outer,  W1 = [Wq | Wk | Wo], Wo[h, a, c] at a*D + c:
        u_b = q_b Wq^T + b1,   M_b = Wk^T + sum_a q_b[a] Wo[:, a, :]^T

and the ``[B, T, 4D]`` (or ``[B, T, 2D + D^2]``) feature tensor never exists. Backward, from
``du_b = sum_t dz1[b, t]`` and ``dM_b = k_b^T dz1_b``::

    concat: dWa = dWc|u = du^T q,  d(Wb - Wc)^T = sum_b dM_b,  dWd^T = sum_b diag(q_b) dM_b,
            dq_b = du_b (Wa + Wc) + sum_h dM_b[:, h] * Wd^T[:, h]
    outer:  dWq = du^T q,  dWk^T = sum_b dM_b,  dWo from sum_b q_b outer dM_b,  dq_b = du_b Wq + (dM_b . Wo)

Every path uses :class:`FirstLayer`: the Triton launchers build ``u`` and ``M`` for all rows
(``FirstLayer.u`` / ``FirstLayer.m``) and reduce the kernels' per-row ``du`` / ``dM``
(``FirstLayer.row_grads``); the chunked composite path runs it chunk by chunk (``forward`` /
``backward``, per row or per position); the C++ op takes its split weights; the small autograd path and
the compat layer's composite build ``u`` and ``M`` from it too.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, Optional, Tuple

import torch

Tensor = torch.Tensor
if TYPE_CHECKING:  # (the chunked path's scratch buffers; composite.py imports this module)
    from .composite import Workspace

# The first layer of "concat" runs per position (one GEMM over [k, k * q_b]) for chunks whose longest history is
# at most this, per row (bmm against M_b) above: see ``_FirstLayer``. Measured on the 2-core CPU (forward +
# backward, ~16k positions, full histories, 20 interleaved runs): the two break even at T = 24-32 for D = 16,
# 36 and 64 alike (per position 1.1x-1.6x faster at T = 8-16, per row 1.1x-1.3x faster at T >= 48). The break
# even does not depend on D: per position adds ~T * D * H1 multiply-adds per row, per row adds ~D * H1.
PER_POSITION_MAX_LEN = 24


class FirstLayer:
    """The first layer as ``z1[b, t] = u_b + k[b, t] @ M_b`` (module docstring), forward and backward per chunk.

    Two ways to apply ``M_b``, chosen per chunk by its longest history Tc:
    - per row (``bmm``): build ``M_b`` [D, H1] for each row, then ``[Tc, D] x [D, H1]`` products.
          dM_b = k_b^T dz1_b;  dk = dz1 @ M_b^T;  dq_b and dW1 from dM_b and du_b = sum_t dz1[b, t]
      Always for "outer" (its D^2 features are far larger than M_b); for "concat" when
      Tc > ``PER_POSITION_MAX_LEN``.
    - per position (one GEMM, "concat" with Tc <= ``PER_POSITION_MAX_LEN``):
      ``k M_b = k (Wb - Wc)^T + (k * q_b) Wd^T = [k, k * q_b] @ W_k`` with ``W_k = [(Wb - Wc)^T; Wd^T]``
      [2D, H1]. Twice the multiply-adds, but no D * H1 of per-row work (build M_b, dM_b and its
      reductions), which dominates short histories.
          G = dz1 @ W_k^T [n, 2D];  dk = G[:, :D] + G[:, D:] * q_b;  dq_b = sum_t G[:, D:] * k + du_b Wu
          dW_k = [k, k * q]^T dz1
    Where they break even: see ``PER_POSITION_MAX_LEN``.
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
        return self.form == "concat" and length <= PER_POSITION_MAX_LEN

    def forward(self, q: Tensor, k: Tensor, work: "Workspace") -> Tuple[Tensor, Tensor]:
        """q [r, D], k [r, Tc, D] -> (z1 [r, Tc, H1] in the workspace, what ``backward`` needs)."""
        rows, length, dim = k.shape
        u = self.u(q)  # [r, H1]
        z = work.take("z0", rows, length, self.hidden)
        if self.per_position(length):
            kq = work.take("kq", rows, length, 2 * dim)  # [k, k * q_b]
            kq[..., :dim] = k
            torch.mul(k, q[:, None, :], out=kq[..., dim:])
            torch.mm(kq.view(-1, 2 * dim), self.w_k, out=z.view(-1, self.hidden))
            cache = kq
        else:
            m = self.m(q, out=work.take_per_row("m", rows, dim, self.hidden))  # M_b [r, D, H1]
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
                 work: "Workspace") -> Tensor:
        """dz1 [r, Tc, H1] -> dq [r, D]; writes dk [r, Tc, D] into ``dk_out``; accumulates dW1, db1."""
        rows, length, dim = k.shape
        dq = self.u_backward(q, dz.sum(1))  # [r, D]
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
        dm = torch.bmm(k.transpose(1, 2), dz, out=work.take_per_row("dm", rows, dim, self.hidden))  # [r, D, H1]
        torch.bmm(dz, m.transpose(1, 2), out=dk_out)
        return self.m_backward(q, dm, dq)

    def u(self, q: Tensor) -> Tensor:
        """u_b = q_b Wu^T + b1: q [r, D] -> [r, H1]."""
        return torch.addmm(self.b1, q, self.w_u.t())

    def m(self, q: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """M_b: q [r, D] -> [r, D, H1], row-major (into ``out`` when given)."""
        if self.form == "concat":
            return torch.addcmul(self.m_base, q[:, :, None], self.wd_t, out=out)  # (Wb-Wc)^T + diag(q_b) Wd^T
        rows = q.shape[0]
        flat = torch.addmm(self.m_base.reshape(1, -1), q, self.wo_p, out=None if out is None else out.view(rows, -1))
        return flat.view(rows, self.dim, self.hidden)

    def u_backward(self, q: Tensor, du: Tensor) -> Tensor:
        """du [r, H1] -> dq's u part [r, D]; accumulates dWu, db1."""
        self.d_wu.addmm_(du.t(), q)
        self.d_b1 += du.sum(0)
        return du @ self.w_u

    def m_backward(self, q: Tensor, dm: Tensor, dq: Tensor) -> Tensor:
        """dM [r, D, H1] -> dq [r, D] (added to ``dq`` in place); accumulates dW1's M parts."""
        if self.form == "concat":
            # M[r, d, h] = base[d, h] + q[r, d] * WdT[d, h] (a product and a sum: faster here than the
            # matrix-vector products batched over d, which torch runs as a loop over d)
            self.d_wk[:self.dim] += dm.sum(0)
            self.d_wk[self.dim:] += (dm * q[:, :, None]).sum(0)  # sum_r q[r, d] dm[r, d, :]
            dq += (dm * self.wd_t).sum(-1)  # sum_h dm[r, d, h] WdT[d, h]
        else:
            self.d_mbase += dm.sum(0)
            dm_flat = dm.view(q.shape[0], self.dim * self.hidden)  # [r, D*H1]
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

    @staticmethod
    def m_sums(q: Tensor, dm: Tensor, wd_t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """"concat": (sum_b dM_b [D, H1], sum_b diag(q_b) dM_b [D, H1], dq's M part sum_h dM_b[d, h] WdT[d, h]
        [B, D]) from q [B, D], every row's dM [B, D, H1] and Wd^T [D, H1], by torch's batched products over d:
        two reads of dM, nothing of its size written. (``m_backward``'s product-and-sum, fast on the CPU for a
        chunk, would on a GPU write a [B, D, H1] temporary per product, seven passes over the Triton kernels'
        largest output.) The Triton launchers pass ``fused_first_layer.first_layer_m_grads``: one read."""
        q_t = q.t()
        coeff = torch.stack([torch.ones_like(q_t), q_t], dim=1)  # [D, 2, B]
        dm_by_d = dm.transpose(0, 1)  # [D, B, H1], a view (cuBLAS takes its strides)
        sums = torch.bmm(coeff, dm_by_d)  # [D, 2, H1]
        return sums[:, 0], sums[:, 1], torch.bmm(dm_by_d, wd_t[:, :, None]).squeeze(-1).t()

    def row_grads(self, q: Tensor, du: Tensor, dm: Tensor, w1: Tensor, b1: Tensor,
                  m_sums: Optional[Callable[[Tensor, Tensor, Tensor], Tuple[Tensor, Tensor, Tensor]]] = None,
                  ) -> Tuple[Tensor, Tensor, Tensor]:
        """(dq [B, D], dW1, db1) from every row's du [B, H1] and dM [B, D, H1] (the Triton kernels' outputs),
        the whole batch at once; ``m_sums``: ``FirstLayer.m_sums``'s contract ("concat"; default that)."""
        self.start_backward()
        dq = self.u_backward(q, du)
        if self.form == "concat":
            total, weighted, dq_m = (m_sums or self.m_sums)(q, dm, self.wd_t)
            self.d_wk[:self.dim] += total
            self.d_wk[self.dim:] += weighted
            dq += dq_m
        else:
            # [q, 1]^T dm_flat: dWo_p and d(Wk^T) in one product, then dq's part: two reads of dM
            dm_flat = dm.view(q.shape[0], self.dim * self.hidden)  # [B, D*H1]
            sums = torch.cat([q, torch.ones_like(q[:, :1])], dim=1).t() @ dm_flat  # [D + 1, D*H1]
            self.d_wo_p += sums[:self.dim]
            self.d_mbase += sums[self.dim].view(self.dim, self.hidden)
            dq.addmm_(dm_flat, self.wo_p.t())
        return (dq, *self.weight_grads(w1, b1))
