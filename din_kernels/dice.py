"""Dice activation (paper Eq. 7): functional op and module."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import reference
from ._checks import check_dice_args

Tensor = torch.Tensor


def dice(x: Tensor, alpha: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], *,
         training: bool, momentum: float = 0.1, eps: float = 1e-8, mask: Optional[Tensor] = None,
         weight: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
    """``p * x + (1 - p) * alpha * x`` with ``p = sigmoid((x - E[x]) / sqrt(Var[x] + eps))``.
    x [N, C] or [B, T, C] with mask [B, T]; see ``reference.dice``."""
    check_dice_args(x, alpha, running_mean, running_var, training, momentum, eps, mask, weight, bias)
    return reference.dice(x, alpha, running_mean, running_var, training=training, momentum=momentum,
                          eps=eps, mask=mask, weight=weight, bias=bias)


class Dice(nn.Module):
    """Dice over the last dimension: x [N, C] or [B, T, C] (+ mask [B, T], True = valid).

    Batch statistics over the valid rows while training, moving averages at inference. ``alpha`` starts
    at 0 (Dice then begins as a smooth ReLU-like gate). ``affine=True`` adds a learnable scale and shift
    inside the sigmoid, as DeepCTR-Torch's Dice (a BatchNorm1d with affine parameters).
    """

    def __init__(self, num_features: int, eps: float = 1e-8, momentum: float = 0.1, affine: bool = False):
        super().__init__()
        if not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.alpha = nn.Parameter(torch.zeros(num_features))
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return dice(x, self.alpha, self.running_mean, self.running_var, training=self.training,
                    momentum=self.momentum, eps=self.eps, mask=mask, weight=self.weight, bias=self.bias)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
