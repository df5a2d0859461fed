"""DIN's head MLP with Dice (paper Section 4.3: 200-80 Dice, then one logit) as one op.

    dice_mlp(x [N, F], weights (W_1 [H_1, F], b_1 [H_1], ..., W_L, b_L, W_out [O, H_L], b_out [O]),
             alphas ([H_l] or [1] each, L of them), running_means, running_vars ([H_l] each, or None),
             *, training, momentum=0.1, eps=1e-8) -> [N, O]

Per hidden layer l: ``z_l = h_{l-1} W_l^T + b_l`` (h_0 = x), ``h_l = dice(z_l, alpha_l)`` with the batch
statistics over the N rows in training (running statistics updated as ``nn.BatchNorm1d`` does) and the
running statistics in eval; then ``out = h_L W_out^T + b_out``. Exactly ``F.linear`` and
``din_kernels.dice`` in a chain (``reference.dice_mlp``); Dice without its affine map (``Dice(affine=False)``,
DIN's).

On the CPU (fp32 / fp64) the C++ op ``csrc/mlp_cpu.cpp`` runs the forward and the backward as one pass of
row blocks per layer on the C++ ops' threads (``set_cpu_threads``), deterministic whatever the thread count:
DIN's head of a training step ([256, 108] -> 200 -> 80 -> 1), forward+backward, 0.99 ms at one thread and 0.79
ms at two against 1.12-1.17 ms as the same modules on torch's one thread (benchmarks/RESULTS.md, section 8). Elsewhere (CUDA, the Triton
interpreter, other dtypes, ``set_backend("torch")``, under ``torch.compile``) the chain itself runs: the
composite path, ``F.linear`` and ``din_kernels.dice`` (whose Triton kernels run on CUDA).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_extension
from ._backend import select_path
from ._checks import check_momentum_eps, check_same_device, check_tensor, check_writable
from .dice import Dice, _update_running, dice

Tensor = torch.Tensor

__all__ = ["DiceMLP", "dice_mlp"]


def _cpp_takes(x: Tensor, weights: Sequence[Tensor], alphas: Sequence[Tensor]) -> bool:
    """The C++ op computes in x's dtype: fp32 or fp64, every parameter of that dtype."""
    return (x.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling()
            and all(t.dtype == x.dtype for t in (*weights, *alphas)))


class DiceMLPFunction(torch.autograd.Function):
    """The C++ op's forward and backward. Arguments ``(x, running_means, running_vars, training, momentum, eps,
    hidden, *weights, *alphas)``: L = ``hidden`` Dice layers, ``weights`` 2 (L + 1) tensors, ``alphas`` L
    (each [H_l], contiguous; validated by ``dice_mlp``)."""

    @staticmethod
    def forward(ctx, x, running_means, running_vars, training, momentum, eps, hidden, *params):
        weights, alphas = list(params[:2 * hidden + 2]), list(params[2 * hidden + 2:])
        stats = ([], []) if training else (list(running_means), list(running_vars))
        out, zs, ps, hs, means, variances = cpu_extension.ops().dice_mlp_fwd(
            x, weights, alphas, *stats, training, eps, cpu_extension.threads())
        if training and running_means is not None:
            for running_mean, running_var, mean, var in zip(running_means, running_vars, means, variances):
                _update_running(running_mean, running_var, mean, var, x.shape[0], momentum)
        ctx.save_for_backward(x, *weights, *alphas, *zs, *ps, *hs, *means, *variances)
        ctx.hidden, ctx.training, ctx.eps = hidden, training, eps
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        hidden = ctx.hidden
        saved = list(ctx.saved_tensors)
        x, weights = saved[0], saved[1:2 * hidden + 3]
        alphas, zs, ps, hs, means, variances = (
            saved[2 * hidden + 3 + i * hidden:2 * hidden + 3 + (i + 1) * hidden] for i in range(6))
        dx, grads, dalphas = cpu_extension.ops().dice_mlp_bwd(
            dout.contiguous(), x, weights, alphas, zs, ps, hs, means, variances, ctx.training, ctx.eps,
            ctx.needs_input_grad[0], cpu_extension.threads())
        return ((dx if ctx.needs_input_grad[0] else None), None, None, None, None, None, None, *grads, *dalphas)


def _check_dice_mlp_args(x, weights, alphas, running_means, running_vars, training, momentum, eps) -> int:
    """Validates ``dice_mlp``'s arguments; returns L, the hidden layers."""
    check_tensor("x", x, ndim=2, floating=True)
    if not isinstance(weights, (list, tuple)) or len(weights) < 4 or len(weights) % 2:
        raise ValueError("weights must be a sequence (W_1, b_1, ..., W_out, b_out) with at least one hidden layer, "
                         f"got {len(weights) if isinstance(weights, (list, tuple)) else type(weights).__name__}")
    hidden = len(weights) // 2 - 1
    width = x.shape[1]
    for l in range(hidden + 1):
        w, b = weights[2 * l], weights[2 * l + 1]
        check_tensor(f"weights[{2 * l}]", w, ndim=2, floating=True)
        check_tensor(f"weights[{2 * l + 1}]", b, ndim=1, floating=True)
        if w.shape[1] != width:
            raise ValueError(f"weights[{2 * l}] must be [out, {width}] (the width coming in), got {tuple(w.shape)}")
        if b.shape[0] != w.shape[0]:
            raise ValueError(f"weights[{2 * l + 1}] must have {w.shape[0]} entries (weights[{2 * l}]'s rows), got "
                             f"{b.shape[0]}")
        width = w.shape[0]
    widths = [weights[2 * l].shape[0] for l in range(hidden)]
    if not isinstance(alphas, (list, tuple)) or len(alphas) != hidden:
        raise ValueError(f"alphas must be a sequence of {hidden} tensors (one per hidden layer), got "
                         f"{len(alphas) if isinstance(alphas, (list, tuple)) else type(alphas).__name__}")
    for l, (alpha, h) in enumerate(zip(alphas, widths)):
        check_tensor(f"alphas[{l}]", alpha, floating=True)
        if alpha.numel() != 1 and alpha.numel() != h:
            raise ValueError(f"alphas[{l}] must have 1 or {h} entries, got {alpha.numel()}")
    if (running_means is None) != (running_vars is None):
        raise ValueError("running_means and running_vars must be given together")
    if running_means is None:
        if not training:
            raise ValueError("running_means and running_vars are required in eval mode (training=False)")
    else:
        for name, stats in (("running_means", running_means), ("running_vars", running_vars)):
            if not isinstance(stats, (list, tuple)) or len(stats) != hidden:
                raise ValueError(f"{name} must be a sequence of {hidden} tensors (one per hidden layer)")
            for l, (stat, h) in enumerate(zip(stats, widths)):
                check_tensor(f"{name}[{l}]", stat, ndim=1, floating=True)
                if stat.shape[0] != h:
                    raise ValueError(f"{name}[{l}] must have {h} entries, got {stat.shape[0]}")
                if training:
                    check_writable(f"{name}[{l}]", stat)
    check_momentum_eps(momentum, eps)
    everything = [*weights, *alphas, *(running_means or ()), *(running_vars or ())]
    if any(t.device != x.device for t in everything):  # (the names only when needed: this runs every step)
        tensors = {"x": x, **{f"weights[{i}]": w for i, w in enumerate(weights)},
                   **{f"alphas[{i}]": a for i, a in enumerate(alphas)}}
        for name, stats in (("running_means", running_means), ("running_vars", running_vars)):
            tensors.update({f"{name}[{i}]": s for i, s in enumerate(stats or ())})
        check_same_device(**tensors)
    return hidden


def dice_mlp(x: Tensor, weights: Sequence[Tensor], alphas: Sequence[Tensor],
             running_means: Optional[Sequence[Tensor]], running_vars: Optional[Sequence[Tensor]], *,
             training: bool, momentum: float = 0.1, eps: float = 1e-8) -> Tensor:
    """``[Linear -> Dice] * L -> Linear`` over x [N, F] -> [N, O] (module docstring); ``weights`` as
    ``nn.Linear`` keeps them ([out, in] and [out]), one alpha and (optionally in training) one pair of running
    statistics per hidden layer, updated in place in training. Dice's eps and momentum are shared by the layers."""
    hidden = _check_dice_mlp_args(x, weights, alphas, running_means, running_vars, training, momentum, eps)
    momentum, eps = check_momentum_eps(momentum, eps)
    weights, alphas = list(weights), list(alphas)
    if select_path(x, cpp=_cpp_takes(x, weights, alphas)) != "cpp":
        h = x
        for l in range(hidden):
            h = dice(F.linear(h, weights[2 * l], weights[2 * l + 1]), alphas[l],
                     running_means[l] if running_means is not None else None,
                     running_vars[l] if running_vars is not None else None,
                     training=training, momentum=momentum, eps=eps)
        return F.linear(h, weights[-2], weights[-1])
    flat_alphas = [a.reshape(-1).expand(w.shape[0]).contiguous() if a.numel() == 1 else a.reshape(-1).contiguous()
                   for a, w in zip(alphas, weights[0:-2:2])]
    out = DiceMLPFunction.apply(
        x.contiguous(), None if running_means is None else list(running_means),
        None if running_vars is None else list(running_vars), bool(training), momentum, eps, hidden,
        *[w.contiguous() for w in weights], *flat_alphas)
    return out


class DiceMLP(nn.Module):
    """``[Linear -> Dice] * len(hidden_units) -> Linear(.., out_features)`` (``dice_mlp``): DIN's head, a drop-in
    for DeepCTR-Torch's ``DNN(..., activation="dice")`` followed by its output layer. ``linears`` and ``dices``
    hold the ``nn.Linear`` and ``Dice`` modules (their usual state_dict entries)."""

    def __init__(self, in_features: int, hidden_units: Sequence[int], out_features: int = 1, eps: float = 1e-8,
                 momentum: float = 0.1):
        super().__init__()
        units = list(hidden_units) if isinstance(hidden_units, (list, tuple)) else None
        if not units or any(isinstance(u, bool) or not isinstance(u, int) or u <= 0 for u in units):
            raise ValueError(f"hidden_units must be a non-empty sequence of positive ints, got {hidden_units!r}")
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        widths = [in_features, *units, out_features]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.dices = nn.ModuleList(Dice(u, eps=eps, momentum=momentum) for u in units)

    def forward(self, x: Tensor) -> Tensor:
        first = self.dices[0]
        return dice_mlp(x, [t for m in self.linears for t in (m.weight, m.bias)], [d.alpha for d in self.dices],
                        [d.running_mean for d in self.dices], [d.running_var for d in self.dices],
                        training=self.training, momentum=first.momentum, eps=first.eps)
