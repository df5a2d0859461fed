"""Which path runs a ``din_attention`` call, decided once per call (``plan_attention``) and kept for its
backward; ``explain`` and the DEBUG log print the plan.

Paths, in the order tried: the Triton kernels (``fused.py``; CUDA, or CPU tensors under the interpreter)
for problems they cover (``fused_supported``); on CPU the C++ op (``cpu.py``) where it is built; else the
torch composite path (``composite.py``), or, in eager mode, for small problems
(``small.SMALL_POSITIONS``) its autograd variant. Dice in training mode (one query row per history, in eager
mode) runs on the Triton kernels of ``fused_dice_training.py`` where the backend rule picks Triton and they
cover the problem (``dice_training_supported``), on the C++ op where it picks the C++ op (both compute the
batch statistics themselves), else one autograd pass of the small path through ``din_kernels.dice`` (also
with several candidates; under ``torch.compile`` its traced variant, masked statistics).
An activation without fused kernels (``ActivationSpec.fused``) runs on the composite paths. ``_backend.select_path`` holds the
backend rule shared with Dice and MBA.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .._backend import get_backend, select_path, use_cpu_extension
from ..activations import activation_spec
from .composite import attention_torch_backward, attention_torch_forward
from .cpu import (attention_cpu_backward, attention_cpu_dice_training_backward, attention_cpu_dice_training_forward,
                  attention_cpu_forward)
from .fused import attention_backward, attention_forward, fused_supported
from .fused_dice_training import (attention_triton_dice_training_backward, attention_triton_dice_training_forward,
                                  dice_training_supported)
from . import small

Tensor = torch.Tensor


def _launchers_and_reason(keys: Tensor, weights: Sequence[Tensor], activation: str = "sigmoid"):
    """(forward, backward, path, reason) for this problem; every path honours one contract. CPU problems the
    Triton kernels do not take (under the interpreter: shapes beyond ``fused_supported``) run the C++ op;
    an activation without fused kernels (``ActivationSpec.fused``) the composite path."""
    if not activation_spec(activation).fused:
        return (attention_torch_forward, attention_torch_backward, "composite",
                f"the torch composite path: activation {activation!r} has no fused kernels")
    path = select_path(keys, cpp=True)
    triton_wanted = path == "triton"
    if triton_wanted and fused_supported(keys, weights):
        where = "CUDA" if keys.is_cuda else "the Triton interpreter"
        return attention_forward, attention_backward, "triton", f"fused Triton kernels on {where}"
    outside = (" (outside the fused kernels' coverage: 1-2 hidden layers of width <= 256, D <= 256, "
               "fp32/fp16/bf16, resident tiles <= 20480 elements)" if triton_wanted else "")
    if path == "cpp" or (triton_wanted and use_cpu_extension(keys)):  # (Triton outside its coverage)
        return attention_cpu_forward, attention_cpu_backward, "cpp", "the C++ CPU op" + outside
    why = ("backend 'torch'" if get_backend() == "torch" else
           "CUDA tensors" + outside if keys.is_cuda else "the C++ CPU op is not available or switched off")
    return attention_torch_forward, attention_torch_backward, "composite", f"the torch composite path: {why}"


def _launchers(keys: Tensor, weights: Sequence[Tensor], activation: str = "sigmoid"):
    """(forward, backward) launchers for this problem (``_launchers_and_reason``)."""
    return _launchers_and_reason(keys, weights, activation)[:2]


@dataclass
class AttentionPlan:
    """How one call runs, decided once (``plan_attention``) and kept for its backward: the path ("triton",
    "cpp", "composite", "composite-small" or "composite-autograd"), why, the launchers, and their
    arguments."""
    path: str
    reason: str
    forward: Optional[Callable]
    backward: Optional[Callable]
    weights: List[Tensor]
    alphas: Optional[List[Tensor]]
    dice_eval: Optional[List[Tuple[Tensor, Tensor]]]
    activation: str
    # the launchers keep state from the forward for the backward (``kept=``): the composite and C++ paths, and
    # every Dice-training launcher (its batch statistics)
    keeps: bool = False

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def plan_attention(keys, weights, alphas, dice_means, dice_vars, activation, *, training: bool = False,
                   eager: bool = False, candidates: int = 1, momentum: float = 0.1) -> AttentionPlan:
    """The plan of one call (``candidates``: query rows per history). An MLP without a hidden layer (``weights = (w_out, b_out)``: a linear score)
    runs as one identity hidden layer of width 1 followed by ``1 * z + 0``, which is exact. ``eager``: the
    call runs outside ``torch.compile``, where small composite problems take ``attention_torch_small`` and
    Dice in training mode (one query row per history) the Triton kernels (``fused_dice_training.py``: Triton
    picked by the backend rule, a problem they cover) or the C++ op (backend "cpp"), else the composite's
    autograd pass through ``din_kernels.dice`` (under compilation: that pass with masked statistics, which
    traces as one graph)."""
    if activation_spec(activation).has_stats and training and len(weights) > 2:
        dice_pairs = list(zip(dice_means, dice_vars)) if dice_means else None
        path = select_path(keys, cpp=True)
        # Under torch.compile the traced composite runs instead: the custom op (``function.py``) has no training
        # mode, and one for it would have to mutate the running statistics in place and hand the batch
        # statistics to its backward op (a schema of its own); not written yet.
        if eager and candidates == 1 and path == "triton" and dice_training_supported(keys, weights):
            where = "CUDA" if keys.is_cuda else "the Triton interpreter"
            return AttentionPlan("triton", f"fused Triton kernels on {where}, Dice in training mode: batch "
                                 "statistics over the valid positions, one launch per hidden layer forward and "
                                 "backward (fused_dice_training.py)",
                                 functools.partial(attention_triton_dice_training_forward, momentum=momentum),
                                 attention_triton_dice_training_backward, list(weights), alphas or None, dice_pairs,
                                 activation, keeps=True)
        if eager and candidates == 1 and path == "cpp":
            return AttentionPlan("cpp", "the C++ CPU op, Dice in training mode: batch statistics over the valid "
                                 "positions, one pass of blocks per hidden layer",
                                 functools.partial(attention_cpu_dice_training_forward, momentum=momentum),
                                 attention_cpu_dice_training_backward, list(weights), alphas or None, dice_pairs,
                                 activation, keeps=True)
        reason = ("Dice in training mode: one autograd pass of the composite, batch statistics over the valid "
                  "positions (din_kernels.dice)" if eager else
                  "Dice in training mode under torch.compile: one traced pass of the composite, masked batch "
                  "statistics")
        return AttentionPlan("composite-autograd", reason, None, None, list(weights), alphas or None, dice_pairs,
                             activation)
    weights = list(weights)
    if len(weights) == 2:
        weights += [keys.new_ones(1, 1, dtype=weights[0].dtype), keys.new_zeros(1, dtype=weights[1].dtype)]
        activation, alphas, dice_means = "identity", [], []
    dice_eval = list(zip(dice_means, dice_vars)) if dice_means else None
    forward, backward, path, reason = _launchers_and_reason(keys, weights, activation)
    if eager and path == "composite" and keys.shape[0] * candidates * keys.shape[1] <= small.SMALL_POSITIONS:
        path, reason = "composite-small", reason + f"; B x C x T <= {small.SMALL_POSITIONS}: one autograd pass"
    return AttentionPlan(path, reason, forward, backward, weights, alphas or None, dice_eval, activation,
                         keeps=path in ("composite", "cpp"))


def _plan(keys, weights, alphas, dice_means, dice_vars, activation, candidates: int = 1):
    """(forward, backward, weights, alphas, dice_eval, activation) of ``plan_attention`` (the custom ops)."""
    p = plan_attention(keys, weights, alphas, dice_means, dice_vars, activation, candidates=candidates)
    return p.forward, p.backward, p.weights, p.alphas, p.dice_eval, p.activation
