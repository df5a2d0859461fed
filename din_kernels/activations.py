"""The hidden-layer activations of the local activation unit: one entry each, read by every path.

Each :class:`ActivationSpec` says what the validation, the plan, the launchers, the composite MLP and the
kernels need to know of an activation::

    name        the ``activation=`` string of ``din_attention`` / ``DinAttention``
    code        the kernels' ``ACT`` constexpr (``attention._act_fwd`` / ``_act_bwd``) and the C++ op's
                activation code (``csrc/attention_cpu.cpp``: kIdentity .. kDice); None: no fused kernel
    has_alpha   a learnable per-unit parameter (prelu's slope, Dice's alpha): the ops take ``alphas``,
                one [H_l] (or [1]) tensor per hidden layer, and return their gradients; ``HAS_ALPHA``
    has_stats   batch statistics (Dice): eval mode reads ``dice_stats`` (running mean, var per layer),
                training mode normalises over the valid positions; ``HAS_STATS``
    saves       what the composite backward keeps of a layer: "output" (the derivative is a function of
                h), "input" (it needs z) or None (it needs nothing)
    apply       ``h = act(z)`` as differentiable torch ops (``attention_torch_small``)
    forward_    ``h = act(z)`` for the chunked composite path; may overwrite ``z``
    backward_   ``dz`` from ``dh`` (written into ``dh``) and ``dalpha`` summed over the positions, or None

The math, elementwise over a layer's pre-activations ``z`` [n, H], with per-unit ``a`` (alpha), and for
Dice ``p = sigmoid((z - mean) * rstd)``, ``rstd = 1 / sqrt(var + eps)``::

    identity  h = z                          dz = dh
    sigmoid   h = s = 1 / (1 + exp(-z))      dz = dh * h * (1 - h)
    relu      h = max(z, 0)                  dz = dh * [h > 0]
    tanh      h = tanh(z)                    dz = dh * (1 - h^2)
    prelu     h = z >= 0 ? z : a z           dz = dh * (z >= 0 ? 1 : a),          da = sum dh * z * [z < 0]
    dice      h = z * (a + (1 - a) p)        dz = dh * (a + (1 - a) (p + z p (1 - p) rstd)),
                                             da = sum dh * z * (1 - p)
    (dice's dz treats mean and rstd as constants: eval mode. Training mode, where they are the batch's
    statistics, runs through ``din_kernels.dice``, whose backward includes them.)

Adding an activation: an entry in ``ACTIVATION_SPECS`` and its formula in
``reference._hidden_activation``; it runs on the composite paths. ``code`` (a branch in the Triton
``_act_fwd`` / ``_act_bwd`` and in the C++ op's activation functions) puts it on the fused paths too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

Tensor = torch.Tensor
# (z, alpha, mean, rstd) -> h; alpha, mean, rstd are [H] tensors or None where the activation has none
Forward = Callable[[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]], Tensor]
# (dh, saved, alpha, mean, rstd) -> (dz written into dh, dalpha [H] or None)
Backward = Callable[[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]],
                    Tuple[Tensor, Optional[Tensor]]]


@dataclass(frozen=True)
class ActivationSpec:
    name: str
    code: Optional[int]
    has_alpha: bool
    has_stats: bool
    saves: Optional[str]
    apply: Forward
    forward_: Forward
    backward_: Backward

    @property
    def fused(self) -> bool:
        """Whether the Triton kernels and the C++ op implement it."""
        return self.code is not None


def _prelu(z, alpha, mean, rstd):
    return torch.where(z >= 0, z, z * alpha)


def _prelu_backward(dh, z, alpha, mean, rstd):
    negative = z < 0
    dalpha = (dh * z).masked_fill_(~negative, 0).sum(0)
    return dh.mul_(torch.where(negative, alpha, torch.ones_like(alpha))), dalpha


def _dice(z, alpha, mean, rstd):
    p = torch.sigmoid((z - mean) * rstd)
    return z * (alpha + (1.0 - alpha) * p)


def _dice_(z, alpha, mean, rstd):
    p = torch.sigmoid((z - mean) * rstd)
    # f = z * (a + (1 - a) p) = z * (p + a (1 - p)), built in p's memory
    return p.mul_(1.0 - alpha).add_(alpha).mul_(z)


def _dice_backward(dh, z, alpha, mean, rstd):
    p = torch.sigmoid((z - mean) * rstd)
    one_minus_p = 1.0 - p
    dalpha = (dh * z * one_minus_p).sum(0)
    # (1 - a) * (p + z p (1 - p) r) + a
    slope = (z * one_minus_p).mul_(rstd).add_(1.0).mul_(p).mul_(1.0 - alpha).add_(alpha)
    return dh.mul_(slope), dalpha


def _from_output(backward: Callable[..., Tensor]) -> Backward:
    """An aten ``*_backward.grad_input`` overload as a Backward: ``dz`` from ``dh`` and the saved output."""
    return lambda dh, h, alpha, mean, rstd: (backward(dh, h, grad_input=dh), None)


_aten = torch.ops.aten

#: every activation, in the order error messages and the CLI list them
ACTIVATION_SPECS: Dict[str, ActivationSpec] = {spec.name: spec for spec in (
    ActivationSpec("sigmoid", 1, False, False, "output", lambda z, a, m, r: torch.sigmoid(z),
                   lambda z, a, m, r: z.sigmoid_(), _from_output(_aten.sigmoid_backward.grad_input)),
    ActivationSpec("relu", 2, False, False, "output", lambda z, a, m, r: torch.relu(z),
                   lambda z, a, m, r: z.relu_(),
                   lambda dh, h, a, m, r: (_aten.threshold_backward.grad_input(dh, h, 0.0, grad_input=dh), None)),
    ActivationSpec("prelu", 3, True, False, "input", _prelu, _prelu, _prelu_backward),
    ActivationSpec("dice", 4, True, True, "input", _dice, _dice_, _dice_backward),
    ActivationSpec("identity", 0, False, False, None, lambda z, a, m, r: z, lambda z, a, m, r: z,
                   lambda dh, saved, a, m, r: (dh, None)),
    ActivationSpec("tanh", None, False, False, "output", lambda z, a, m, r: torch.tanh(z),
                   lambda z, a, m, r: z.tanh_(), _from_output(_aten.tanh_backward.grad_input)),
)}

ACTIVATIONS = tuple(ACTIVATION_SPECS)


def activation_spec(name: str) -> ActivationSpec:
    """The entry of ``name`` (a ValueError naming the choices for an unknown one)."""
    try:
        return ACTIVATION_SPECS[name]
    except (KeyError, TypeError):
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}; got {name!r}") from None
