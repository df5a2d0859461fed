"""``LocalActivationUnit``: the local activation unit's MLP and activation parameters as an ``nn.Module``."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .._checks import ACTIVATIONS, FORMS, NORMALIZATIONS, check_choice
from ..dice import Dice
from .function import din_attention

Tensor = torch.Tensor

__all__ = ["LocalActivationUnit"]


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
        if isinstance(keys, Tensor) and keys.dim() == 3 and keys.shape[-1] != self.embedding_dim:
            raise ValueError(f"keys must be [B, T, D] with D=embedding_dim={self.embedding_dim}, "
                             f"got shape {tuple(keys.shape)}")
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
