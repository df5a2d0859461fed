"""Local activation unit (DIN's attention): functional op and module.

``out_b = sum_t w[b, t] * k[b, t]``, with ``w`` scored by a small MLP over features of the candidate
``q_b`` and each behaviour ``k[b, t]`` (see ``reference.din_attention`` for the exact semantics).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from . import reference
from ._checks import ACTIVATIONS, FORMS, NORMALIZATIONS, check_attention_args, check_choice
from .dice import Dice

Tensor = torch.Tensor


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
    """Local activation unit. query [B, D], keys [B, T, D], lengths [B] (or [B, 1]) -> pooled [B, D]
    (and the [B, T] weights with ``return_scores=True``). See ``reference.din_attention``."""
    lengths, weights = check_attention_args(query, keys, lengths, weights, form, activation, normalize,
                                            scale, alphas, dice_stats)
    return reference.din_attention(
        query, keys, lengths, weights, form=form, activation=activation, normalize=normalize,
        scale=scale, return_scores=return_scores, alphas=alphas, dice_stats=dice_stats,
        training=training, momentum=momentum, eps=eps,
    )


class LocalActivationUnit(nn.Module):
    """DIN's local activation unit: an MLP ``features(q, k) -> hidden_units -> 1`` and a weighted sum.

    forward(query [B, D], keys [B, T, D], lengths [B]) -> [B, D]. ``activation`` applies to the hidden
    layers (prelu: a learnable slope per unit, initialised to 0.25; dice: a ``Dice`` per layer whose
    statistics come from the valid positions only).
    """

    def __init__(self, embedding_dim: int, hidden_units: Sequence[int] = (80, 40), activation: str = "sigmoid",
                 form: str = "concat", normalize: str = "none", scale: Optional[float] = None):
        super().__init__()
        if not isinstance(embedding_dim, int) or embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
        hidden_units = tuple(hidden_units)
        if not hidden_units or any(not isinstance(h, int) or h <= 0 for h in hidden_units):
            raise ValueError(f"hidden_units must be a non-empty sequence of positive ints, got {hidden_units!r}")
        self.embedding_dim = embedding_dim
        self.hidden_units = hidden_units
        self.activation = check_choice("activation", activation, ACTIVATIONS)
        self.form = check_choice("form", form, FORMS)
        self.normalize = check_choice("normalize", normalize, NORMALIZATIONS)
        self.scale = scale
        in_features = 4 * embedding_dim if form == "concat" else 2 * embedding_dim + embedding_dim ** 2
        widths = (in_features,) + hidden_units
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.output = nn.Linear(widths[-1], 1)
        self.prelu_alphas = None
        self.dice = None
        if activation == "prelu":
            self.prelu_alphas = nn.ParameterList(nn.Parameter(torch.full((h,), 0.25)) for h in hidden_units)
        elif activation == "dice":
            self.dice = nn.ModuleList(Dice(h) for h in hidden_units)

    def weights(self) -> Tuple[Tensor, ...]:
        """``(w1, b1, ..., w_out, b_out)`` as ``din_attention`` takes them."""
        flat = []
        for layer in list(self.hidden) + [self.output]:
            flat += [layer.weight, layer.bias]
        return tuple(flat)

    def forward(self, query: Tensor, keys: Tensor, lengths: Tensor, return_scores: bool = False):
        alphas = dice_stats = None
        if self.prelu_alphas is not None:
            alphas = list(self.prelu_alphas)
        elif self.dice is not None:
            alphas = [d.alpha for d in self.dice]
            dice_stats = [(d.running_mean, d.running_var) for d in self.dice]
        momentum = self.dice[0].momentum if self.dice is not None else 0.1
        eps = self.dice[0].eps if self.dice is not None else 1e-8
        return din_attention(query, keys, lengths, self.weights(), form=self.form, activation=self.activation,
                             normalize=self.normalize, scale=self.scale, return_scores=return_scores,
                             alphas=alphas, dice_stats=dice_stats, training=self.training,
                             momentum=momentum, eps=eps)

    def extra_repr(self) -> str:
        return (f"embedding_dim={self.embedding_dim}, hidden_units={self.hidden_units}, "
                f"activation={self.activation!r}, form={self.form!r}, normalize={self.normalize!r}, "
                f"scale={self.scale}")
