"""Drop-in replacement for DeepCTR-Torch's ``AttentionSequencePoolingLayer`` (deepctr-torch 0.3.0).

Same constructor, same forward signature, same module tree and parameter names (a DeepCTR state_dict loads
as is), same results; the scoring runs on ``din_kernels.din_attention`` (M_b algebra, fused kernels on
CUDA, the hand-written composite on CPU) instead of materialising the ``[B, T, 4E]`` features.

    from din_kernels.compat import AttentionSequencePoolingLayer
    layer = AttentionSequencePoolingLayer(att_hidden_units=(80, 40), embedding_dim=E)   # or:
    layer = AttentionSequencePoolingLayer.from_deepctr(deepctr_layer)                   # copies weights
    pooled = layer(query [B, 1, E], keys [B, T, E], keys_length [B, 1])                 # -> [B, 1, E]

Paths. sigmoid / relu / prelu / linear scoring (or the classes ``nn.Sigmoid``, ``nn.ReLU``, ``nn.Tanh``,
``nn.Identity``) with a prefix mask (``keys_length``, or a ``mask`` whose valid positions come first) and
``return_score=False`` runs ``din_kernels.din_attention``. Three cases run
an autograd composite of the same algebra instead (still no ``[B, T, 4E]`` tensor): ``att_activation="dice"``
(DeepCTR's Dice is a BatchNorm with an affine map inside the sigmoid, statistics over every position,
padding included, which ``din_attention``'s Dice does not model), ``return_score=True`` (the returned
scores carry gradients, as in DeepCTR) and a ``mask`` that is not a prefix.

Differences from DeepCTR-Torch, all at rows without any valid position:
- ``weight_normalization=True`` and a history of length 0: DeepCTR fills the padded scores with
  ``-2**32 + 1`` and its softmax spreads the weight uniformly over the padding (the output is the mean of the
  padding embeddings); here the row pools to zeros with zero weights, as everywhere in din_kernels.
  Rows with at least one valid position agree.
- ``keys_length`` outside ``[0, T]`` is clamped to it (DeepCTR's ``arange(T) < length`` comparison does the
  same implicitly).
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
from torch import nn

from .dice import dice as dice_op
from .attention import din_attention
from .attention.first_layer import FirstLayer
from .reference import valid_mask

Tensor = torch.Tensor

__all__ = ["AttentionSequencePoolingLayer"]

_ACTIVATIONS = {"sigmoid": "sigmoid", "relu": "relu", "prelu": "prelu", "dice": "dice", "linear": "identity"}
# parameter-free module classes din_attention computes itself (other classes run as modules: composite)
_MODULE_ACTIVATIONS = {nn.Sigmoid: "sigmoid", nn.ReLU: "relu", nn.Tanh: "tanh", nn.Identity: "identity"}


class Dice(nn.Module):
    """DeepCTR-Torch's ``Dice(emb_size, dim=2, epsilon=1e-8, device)``, same parameter names and shapes
    (``alpha`` [H] for ``dim=2``, [H, 1] for ``dim=3``; ``bn.*``: their state_dicts load both ways),
    computed by ``din_kernels.dice``: ``p = sigmoid(bn.weight * (x - E[x]) / sqrt(Var[x] + eps) + bn.bias)``,
    ``f = p * x + (1 - p) * alpha * x``; batch statistics over every row of x [B, H] (dim 2) or every
    position of x [B, T, H] (dim 3, padding included, as DeepCTR) while training, ``bn``'s running
    statistics in eval mode."""

    def __init__(self, emb_size: int, dim: int = 2, epsilon: float = 1e-8, device=None):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3 (DeepCTR's Dice), got {dim!r}")
        emb_size = _positive_int("emb_size", emb_size)
        self.dim = dim
        self.bn = nn.BatchNorm1d(emb_size, eps=epsilon, device=device)
        self.alpha = nn.Parameter(torch.zeros((emb_size,) if dim == 2 else (emb_size, 1), device=device))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.dim:
            raise ValueError(f"Dice(dim={self.dim}) takes a {self.dim}-d input, got shape {tuple(x.shape)}")
        bn = self.bn
        if self.training:
            bn.num_batches_tracked.add_(1)
        return dice_op(x, self.alpha.view(-1), bn.running_mean, bn.running_var, training=self.training,
                       momentum=bn.momentum, eps=bn.eps, weight=bn.weight, bias=bn.bias)


class Identity(nn.Module):
    def forward(self, inputs: Tensor) -> Tensor:
        return inputs


def _positive_int(name: str, value) -> int:
    """An int > 0; numpy and other integral types accepted, as DeepCTR accepts them (bool is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _activation_layer(name, hidden_size: int) -> nn.Module:
    """DeepCTR's ``activation_layer``: a name, or an ``nn.Module`` class instantiated without arguments."""
    if isinstance(name, type):
        return name()
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "relu":
        return nn.ReLU()
    if name == "prelu":
        return nn.PReLU()
    if name == "dice":
        return Dice(hidden_size, dim=3)
    return Identity()


class _DNN(nn.Module):
    """Holds the hidden layers under DeepCTR's names (``linears``, ``activation_layers``)."""

    def __init__(self, inputs_dim: int, hidden_units: Sequence[int], activation: str, init_std: float = 1e-4):
        super().__init__()
        widths = [inputs_dim] + list(hidden_units)
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.activation_layers = nn.ModuleList(_activation_layer(activation, h) for h in hidden_units)
        for layer in self.linears:  # DeepCTR's DNN initialisation
            nn.init.normal_(layer.weight, mean=0.0, std=init_std)


class _LocalActivationUnit(nn.Module):
    def __init__(self, hidden_units: Sequence[int], embedding_dim: int, activation: str):
        super().__init__()
        self.dnn = _DNN(4 * embedding_dim, hidden_units, activation)
        self.dense = nn.Linear(hidden_units[-1], 1)


class AttentionSequencePoolingLayer(nn.Module):
    """DIN's attentional sequence pooling, DeepCTR-Torch's API, din_kernels' speed.

    Arguments as DeepCTR-Torch 0.3.0: ``att_hidden_units`` (widths of the scoring MLP), ``att_activation``
    ("sigmoid", "dice", "relu", "prelu", "linear", case-insensitive, or an ``nn.Module`` class such as
    ``nn.Tanh``, instantiated once per hidden layer; ``nn.Sigmoid``, ``nn.ReLU``, ``nn.Tanh`` and ``nn.Identity``
    run on ``din_attention``, any other class by the composite path), ``weight_normalization`` (softmax over
    the valid positions instead of raw scores), ``return_score`` (return the [B, 1, T] weights instead of
    the pooled vector), ``supports_masking`` (take the valid positions from ``mask`` [B, T] instead of
    ``keys_length``), ``embedding_dim``. Extra keyword arguments are accepted and ignored, as DeepCTR does.

    forward(query [B, 1, E], keys [B, T, E], keys_length [B, 1] (or [B]), mask=None) -> [B, 1, E]
    (or the [B, 1, T] weights with ``return_score``).
    """

    def __init__(self, att_hidden_units=(80, 40), att_activation="sigmoid", weight_normalization=False,
                 return_score=False, supports_masking=False, embedding_dim=4, **kwargs):
        super().__init__()
        module_class = isinstance(att_activation, type) and issubclass(att_activation, nn.Module)
        if not module_class and (not isinstance(att_activation, str) or att_activation.lower() not in _ACTIVATIONS):
            raise ValueError(f"att_activation must be one of {', '.join(map(repr, _ACTIVATIONS))} or an nn.Module "
                             f"class, got {att_activation!r}")
        try:
            hidden_units = tuple(_positive_int("att_hidden_units", h) for h in att_hidden_units)
        except (TypeError, ValueError):
            hidden_units = ()
        if not hidden_units:
            raise ValueError(f"att_hidden_units must be a non-empty sequence of positive ints, got "
                             f"{att_hidden_units!r}")
        embedding_dim = _positive_int("embedding_dim", embedding_dim)
        self.return_score = return_score
        self.weight_normalization = weight_normalization
        self.supports_masking = supports_masking
        self.embedding_dim = embedding_dim
        # a module class runs as given (the composite path); names as din_attention's activations
        self.att_activation = att_activation if module_class else att_activation.lower()
        self.local_att = _LocalActivationUnit(hidden_units, embedding_dim, self.att_activation)

    @classmethod
    def from_deepctr(cls, layer: nn.Module) -> "AttentionSequencePoolingLayer":
        """A copy of a ``deepctr_torch.layers.sequence.AttentionSequencePoolingLayer``: same configuration,
        weights, Dice parameters and running statistics, device, dtype and train/eval mode."""
        dnn = layer.local_att.dnn
        if getattr(dnn, "use_bn", False) or getattr(dnn, "dropout_rate", 0):
            raise ValueError("from_deepctr supports the attention unit as DeepCTR builds it: no BatchNorm, "
                             "no dropout")
        first = dnn.activation_layers[0]
        if hasattr(first, "bn") and hasattr(first, "alpha"):
            activation = "dice"
        elif isinstance(first, nn.PReLU):
            activation = "prelu"
        elif isinstance(first, nn.Sigmoid):
            activation = "sigmoid"
        elif isinstance(first, nn.ReLU):
            activation = "relu"
        elif type(first).__name__ == "Identity":
            activation = "linear"
        else:  # an nn.Module class DeepCTR instantiated without arguments (its activation_layer): the same here
            activation = type(first)
        new = cls(att_hidden_units=[linear.out_features for linear in dnn.linears], att_activation=activation,
                  weight_normalization=layer.weight_normalization, return_score=layer.return_score,
                  supports_masking=layer.supports_masking, embedding_dim=dnn.linears[0].in_features // 4)
        reference_param = next(layer.parameters())
        new.to(device=reference_param.device, dtype=reference_param.dtype)
        new.load_state_dict(layer.state_dict())
        new.train(layer.training)
        return new

    def _weights(self):
        flat = []
        for linear in list(self.local_att.dnn.linears) + [self.local_att.dense]:
            flat += [linear.weight, linear.bias]
        return flat

    def forward(self, query: Tensor, keys: Tensor, keys_length: Optional[Tensor], mask: Optional[Tensor] = None):
        if query.dim() != 3 or query.shape[1] != 1:
            raise ValueError(f"query must have shape [B, 1, E], got {tuple(query.shape)}")
        if keys.dim() != 3:
            raise ValueError(f"keys must have shape [B, T, E], got {tuple(keys.shape)}")
        batch, max_len, _ = keys.shape
        if self.supports_masking:
            if mask is None:
                raise ValueError("When supports_masking=True,input must support masking")
            if mask.shape != (batch, max_len):
                raise ValueError(f"mask must have shape [B, T]=[{batch}, {max_len}], got {tuple(mask.shape)}")
            valid = mask.to(torch.bool)
            lengths = valid.sum(dim=1)
            prefix = bool(torch.equal(valid, valid_mask(lengths, max_len)))
        else:
            if not isinstance(keys_length, torch.Tensor) or keys_length.numel() != batch:
                raise ValueError(f"keys_length must be a tensor of shape [B, 1] (B={batch})")
            lengths = keys_length.reshape(batch)
            if lengths.is_floating_point():
                lengths = lengths.ceil()  # DeepCTR keeps t < length: 2.5 keeps 0, 1, 2; 2.0 keeps 0, 1
            lengths = lengths.to(torch.int64).clamp(0, max_len)
            valid, prefix = None, True
        if isinstance(self.att_activation, type):
            activation = _MODULE_ACTIVATIONS.get(self.att_activation, "module")  # (other classes: composite)
        else:
            activation = _ACTIVATIONS[self.att_activation]
        if prefix and activation not in ("dice", "module") and not self.return_score:
            alphas = None
            if activation == "prelu":
                alphas = [act.weight for act in self.local_att.dnn.activation_layers]
            pooled = din_attention(query[:, 0], keys, lengths, self._weights(), form="concat",
                                   activation=activation,
                                   normalize="softmax" if self.weight_normalization else "none", alphas=alphas)
            return pooled[:, None, :]
        if valid is None:
            valid = valid_mask(lengths, max_len)
        return self._composite(query[:, 0], keys, valid)

    def _composite(self, query: Tensor, keys: Tensor, valid: Tensor) -> Tensor:
        """Autograd composite of the same algebra (z1 = u_b + k M_b), any mask, DeepCTR's modules for the
        activations (Dice included). query [B, E], keys [B, T, E], valid [B, T] bool."""
        dnn = self.local_att.dnn
        linear = dnn.linears[0]
        first = FirstLayer(linear.weight, linear.bias, self.embedding_dim, "concat", linear.weight.dtype)
        h = torch.baddbmm(first.u(query)[:, None, :], keys, first.m(query))  # [B, T, H1]
        h = dnn.activation_layers[0](h)
        for linear, act in zip(list(dnn.linears)[1:], list(dnn.activation_layers)[1:]):
            h = act(linear(h))
        scores = self.local_att.dense(h).squeeze(-1)  # [B, T]
        if self.weight_normalization:
            # finite fill: an all-padding row stays finite and is zeroed below (DeepCTR: uniform, see module doc)
            scores = torch.softmax(scores.masked_fill(~valid, torch.finfo(scores.dtype).min), dim=-1)
        weights = torch.where(valid, scores, torch.zeros_like(scores))[:, None, :]  # [B, 1, T]
        if self.return_score:
            return weights
        return torch.matmul(weights, keys)  # [B, 1, E]

    def extra_repr(self) -> str:
        return (f"att_activation={self.att_activation!r}, weight_normalization={self.weight_normalization}, "
                f"return_score={self.return_score}, supports_masking={self.supports_masking}, "
                f"embedding_dim={self.embedding_dim}")
