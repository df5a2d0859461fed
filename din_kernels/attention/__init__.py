"""DIN's local activation unit: ``out_b = sum_t w[b, t] * k[b, t]``, the weights ``w`` scored by a small MLP
over features of the candidate ``q_b`` and each behaviour ``k[b, t]`` (``reference.din_attention`` fixes the
semantics), on every path without the ``[B, T, 4D]`` feature tensor.

Where each idea lives (one file per piece, in the spirit of fla's ``ops/<op>/``):

    first_layer.py  the first-layer algebra ``z1[b, t] = u_b + k[b, t] @ M_b`` (forward and backward),
                    which every path uses
    fused.py        the Triton kernels (forward, backward) and their launchers, ``fused_supported``,
                    tile and warp choices (compiled for sm_90 / sm_80: ``benchmarks/gpu_compile_report.py``)
    fused_first_layer.py
                    the Triton paths' reduction of every row's first-layer gradient dM, in one read of it
    fused_dice_training.py
                    Dice attention in training mode on the Triton path: one launch per hidden layer (its
                    batch statistics over the valid positions), forward and backward through the statistics,
                    the layers below recomputed; one query row per history, ``fused.py``'s coverage (fp64 too)
    composite.py    the torch composite path: chunked rows sorted by length, hand-written backward
    small.py        its plain-autograd variant for small problems, and Dice attention in training mode
                    where neither the Triton kernels nor the C++ op run it (torch backend, several candidates,
                    shapes outside the kernels' coverage, and under ``torch.compile`` its traced variant)
    cpu.py          the C++ op's launchers (``csrc/attention_cpu.cpp``), Dice attention in training mode
                    (the op's own batch statistics) included
    plan.py         which path runs a call and why (``plan_attention``), decided once per call
    function.py     the custom op (``torch.compile``), ``DinAttentionFunction`` (eager), ``din_attention``,
                    ``explain``
    module.py       ``LocalActivationUnit``

The activations (their formulas, flags and kernel codes) are in ``din_kernels/activations.py``; argument
validation in ``din_kernels/_checks.py``; the backend rule shared with Dice and MBA in ``_backend.py``.
Every launcher honours one contract::

    forward(query [B, D], keys [B, T, D], lengths [B], weights, alphas, dice_eval, eps, *, form, activation,
            normalize, scale) -> (out [B, D], attn [B, T], lse [B] or empty)
    backward(grad_out, query, keys, lengths, weights, alphas, dice_eval, eps, out, attn, lse, *, form,
             activation, normalize, scale) -> (dquery, dkeys, dweights, dalphas)
"""
from .function import DinAttentionFunction, din_attention, explain
from .module import LocalActivationUnit
from .plan import AttentionPlan, plan_attention

__all__ = ["AttentionPlan", "DinAttentionFunction", "LocalActivationUnit", "din_attention", "explain",
           "plan_attention"]
