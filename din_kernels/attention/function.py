"""The local activation unit as an op: the custom op ``torch.ops.din_kernels.din_attention`` (and its backward
op) for ``torch.compile``, ``DinAttentionFunction`` for eager autograd, the functional ``din_attention``
and ``explain``. Each call validates (``_checks``), plans (``plan.py``) and runs the plan's launchers.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import torch

from .._checks import check_attention_args, check_momentum_eps
from .._dtypes import accumulation_dtype
from ..activations import activation_spec
from .composite import candidates_per_history
from .plan import AttentionPlan, _plan, plan_attention
from .small import attention_torch_small

Tensor = torch.Tensor
_log = logging.getLogger("din_kernels")

__all__ = ["DinAttentionFunction", "din_attention", "explain"]


# Written out because infer_schema has no optional tensor lists. They are optional (an empty list or None
# stands for "none") because AOTInductor's proxy executor (torch 2.13) hands an empty Tensor[] argument to the
# op as None, which a plain Tensor[] refuses: a sigmoid unit's program would not run as an AOTInductor package.
_DIN_ATTENTION_SCHEMA = (
    "(Tensor query, Tensor keys, Tensor lengths, Tensor[] weights, Tensor[]? alphas, Tensor[]? dice_means, "
    "Tensor[]? dice_vars, float eps, str form, str activation, str normalize, float? scale) "
    "-> (Tensor, Tensor, Tensor)")


@torch.library.custom_op("din_kernels::din_attention", mutates_args=(), schema=_DIN_ATTENTION_SCHEMA)
def _din_attention_op(
    query: Tensor, keys: Tensor, lengths: Tensor, weights: List[Tensor], alphas: Optional[List[Tensor]],
    dice_means: Optional[List[Tensor]], dice_vars: Optional[List[Tensor]], eps: float, form: str, activation: str,
    normalize: str, scale: Optional[float],
) -> Tuple[Tensor, Tensor, Tensor]:
    # query [R, D], R = B * C
    alphas, dice_means, dice_vars = alphas or [], dice_means or [], dice_vars or []
    forward, _, weights, alphas, dice_eval, activation = _plan(keys, weights, alphas, dice_means, dice_vars,
                                                               activation, candidates_per_history(query, keys))
    return forward(query, keys, lengths, weights, alphas, dice_eval, eps, form=form, activation=activation,
                   normalize=normalize, scale=scale)


@_din_attention_op.register_fake
def _(query, keys, lengths, weights, alphas, dice_means, dice_vars, eps, form, activation, normalize, scale):
    rows, (_, seq_len, dim) = query.shape[0], keys.shape
    out = query.new_empty(rows, dim)
    attn = keys.new_empty(rows, seq_len, dtype=accumulation_dtype(keys.dtype))
    lse = keys.new_empty(rows if normalize == "softmax" else 0, dtype=accumulation_dtype(keys.dtype))
    return out, attn, lse


def _setup_context(ctx, inputs, output):
    query, keys, lengths, weights, alphas, dice_means, dice_vars, eps, form, activation, normalize, scale = inputs
    ctx.alphas_given = alphas is not None  # a None input takes a None gradient
    alphas, dice_means, dice_vars = alphas or [], dice_means or [], dice_vars or []
    out, attn, lse = output
    ctx.counts = (len(weights), len(alphas), len(dice_means))
    ctx.options = dict(form=form, activation=activation, normalize=normalize, scale=scale)
    ctx.eps = eps
    ctx.save_for_backward(query, keys, lengths, out, attn, lse, *weights, *alphas, *dice_means, *dice_vars)
    ctx.mark_non_differentiable(attn, lse)


def _attention_grads(grad_out, query, keys, lengths, weights, alphas, dice_means, dice_vars, out, attn, lse, eps,
                     form, activation, normalize, scale, kept: Optional[list] = None,
                     plan: Optional[AttentionPlan] = None) -> List[Tensor]:
    """``[dquery, dkeys, *dweights, *dalphas]`` from the forward's ``plan`` (the Function keeps it), or one
    made here (the custom op, which can carry only tensors). ``kept``: the activations the composite or C++
    forward kept (``attention_torch_forward(kept=)``), if any."""
    n_weights = len(weights)
    if plan is None:
        plan = plan_attention(keys, weights, alphas, dice_means, dice_vars, activation,
                              candidates=candidates_per_history(query, keys))
    backward, weights, alphas, dice_eval, activation = (plan.backward, plan.weights, plan.alphas, plan.dice_eval,
                                                        plan.activation)
    options = dict(form=form, activation=activation, normalize=normalize, scale=scale)
    if kept is not None:
        options["kept"] = kept
    dquery, dkeys, dweights, dalphas = backward(
        grad_out, query, keys, lengths, weights, alphas, dice_eval, eps, out, attn, lse, **options)
    return [dquery, dkeys, *dweights[:n_weights], *(dalphas or ())]


@torch.library.custom_op("din_kernels::din_attention_backward", mutates_args=())
def _din_attention_backward_op(
    grad_out: Tensor, query: Tensor, keys: Tensor, lengths: Tensor, weights: List[Tensor], alphas: List[Tensor],
    dice_means: List[Tensor], dice_vars: List[Tensor], out: Tensor, attn: Tensor, lse: Tensor, eps: float,
    form: str, activation: str, normalize: str, scale: Optional[float],
) -> List[Tensor]:
    """``[dquery, dkeys, *dweights, *dalphas]``. An op of its own so that AOTAutograd (torch.compile) traces
    the backward through ``register_fake`` instead of running a kernel launch on fake tensors."""
    return _attention_grads(grad_out, query, keys, lengths, weights, alphas, dice_means, dice_vars, out, attn,
                            lse, eps, form, activation, normalize, scale)


@_din_attention_backward_op.register_fake
def _(grad_out, query, keys, lengths, weights, alphas, dice_means, dice_vars, out, attn, lse, eps, form,
      activation, normalize, scale):
    return [torch.empty_like(t) for t in (query, keys, *weights, *alphas)]


def _backward(ctx, grad_out, grad_attn, grad_lse):
    query, keys, lengths, out, attn, lse, *rest = ctx.saved_tensors
    n_w, n_a, n_d = ctx.counts
    weights, alphas = rest[:n_w], rest[n_w:n_w + n_a]
    means, variances = rest[n_w + n_a:n_w + n_a + n_d], rest[n_w + n_a + n_d:]
    grads = _din_attention_backward_op(grad_out, query, keys, lengths, list(weights), list(alphas), list(means),
                                       list(variances), out, attn, lse, ctx.eps, **ctx.options)
    # the return mirrors the inputs' structure: a list per list input (running statistics get no gradient)
    return (grads[0], grads[1], None, grads[2:2 + n_w], grads[2 + n_w:] if ctx.alphas_given else None,
            [None] * n_d, [None] * n_d, None, None, None, None, None)


_din_attention_op.register_autograd(_backward, setup_context=_setup_context)


class DinAttentionFunction(torch.autograd.Function):
    """Eager autograd for the local activation unit: the launchers of the custom op above, without its Python
    dispatch (measured on the 2-core CPU: ~0.2 ms less per forward + backward, 8-12 % of a call at B=16-64,
    T=10-20), and, on the C++ and composite paths, with the forward's activations kept for the backward up
    to ``cpu.KEEP_FLOATS`` / ``composite.KEEP_FLOATS`` (a custom op can only pass tensors of
    fixed schema): the backward skips the recompute of those blocks (composite: 12-25 % faster forward +
    backward at B=64-256, T=20-50).
    ``din_attention`` uses it outside ``torch.compile``; under compilation it calls the custom op, which
    stays one graph node. The tensor lists travel flattened: ``*weights, *alphas, *dice_means, *dice_vars``.
    Returns ``(out [B, D], attn [B, T])``; ``attn`` carries no gradient.
    """

    @staticmethod
    def forward(ctx, query, keys, lengths, counts, eps, form, plan, normalize, scale, keep, *tensors):
        # ``plan``: ``din_attention``'s, made once for the forward and kept for the backward
        forward = plan.forward
        options = dict(form=form, activation=plan.activation, normalize=normalize, scale=scale)
        # attn never has a gradient: without this autograd would zero-fill a [B, T] cotangent for it before
        # every backward, a parallel fill that wakes torch's OpenMP workers, which then spin on the cores
        # the C++ op's helper threads need (measured: 9% of the CPU in a B=1024, T=100 forward + backward)
        ctx.set_materialize_grads(False)
        ctx.kept = None
        if keep and plan.keeps:  # (its launchers take ``kept``) a backward will follow
            ctx.kept = options["kept"] = []
        out, attn, lse = forward(query, keys, lengths, plan.weights, plan.alphas, plan.dice_eval, eps, **options)
        ctx.counts, ctx.plan = counts, plan
        ctx.options = dict(eps=eps, form=form, activation=plan.activation, normalize=normalize, scale=scale)
        ctx.save_for_backward(query, keys, lengths, out, attn, lse, *tensors)
        ctx.mark_non_differentiable(attn)
        return out, attn

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_attn):
        if grad_out is None:  # no gradient reached ``out`` (grads are not materialised: see forward)
            return (None,) * (10 + len(ctx.saved_tensors) - 6)
        query, keys, lengths, out, attn, lse, *tensors = ctx.saved_tensors
        n_w, n_a, n_d = ctx.counts
        o = ctx.options
        grads = _attention_grads(grad_out, query, keys, lengths, tensors[:n_w],
                                 tensors[n_w:n_w + n_a], tensors[n_w + n_a:n_w + n_a + n_d],
                                 tensors[n_w + n_a + n_d:], out, attn, lse, o["eps"], o["form"], o["activation"],
                                 o["normalize"], o["scale"], kept=ctx.kept, plan=ctx.plan)
        # query, keys, lengths, counts, eps, form, plan, normalize, scale, keep, *weights, *alphas, *stats
        return (grads[0], grads[1], None, None, None, None, None, None, None, None, *grads[2:],
                *([None] * (2 * n_d)))


# ----------------------------------------------------------------------------------------------------------
# Functional
# ----------------------------------------------------------------------------------------------------------

def _checked(query, keys, lengths, weights, form, activation, normalize, scale, alphas, dice_stats, training):
    """Validated arguments: (lengths [B] int64, weights, alphas, dice means, dice variances) as lists."""
    lengths, weights = check_attention_args(query, keys, lengths, weights, form, activation, normalize,
                                            scale, alphas, dice_stats)
    spec = activation_spec(activation)
    if not (spec.has_stats and training):
        for name, group in (("alphas", alphas or ()), ("dice_stats", [t for p in dice_stats or () for t in p])):
            if any(t.device != keys.device for t in group):
                raise ValueError(f"{name} must be on {keys.device} like keys")
        if spec.has_stats and dice_stats is None and len(weights) > 2:
            raise ValueError("activation='dice' in eval mode (training=False) needs dice_stats: one "
                             "(running_mean, running_var) pair per hidden layer")
    alpha_list = list(alphas) if spec.has_alpha and alphas is not None else []
    means = [s[0] for s in dice_stats] if spec.has_stats and dice_stats is not None else []
    variances = [s[1] for s in dice_stats] if spec.has_stats and dice_stats is not None else []
    return lengths.to(torch.int64).contiguous(), weights, alpha_list, means, variances


def explain(query: Tensor, keys: Tensor, lengths: Tensor, weights: Sequence[Tensor], *, form: str = "concat",
            activation: str = "sigmoid", normalize: str = "none", scale: Optional[float] = None,
            alphas: Optional[Sequence[Tensor]] = None,
            dice_stats: Optional[Sequence[Tuple[Tensor, Tensor]]] = None, training: bool = False) -> str:
    """Which path ``din_attention`` takes for these arguments in eager mode, and why: ``"path: reason"``
    (path: triton, cpp, composite, composite-small or composite-autograd). Validates like
    ``din_attention``; runs
    nothing. The same line is logged at DEBUG level by every call (logger ``din_kernels``)."""
    lengths, weights, alpha_list, means, variances = _checked(query, keys, lengths, weights, form, activation,
                                                              normalize, scale, alphas, dice_stats, training)
    candidates = query.shape[1] if query.dim() == 3 else 1
    return str(plan_attention(keys, weights, alpha_list, means, variances, activation, training=training,
                              eager=True, candidates=candidates))


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
    (and the [B, T] weights with ``return_scores=True``). Semantics: ``reference.din_attention``.
    Several candidates per history: query [B, C, D] -> [B, C, D] (weights [B, C, T]), each candidate
    scored against its row's history, which is never copied C times (the kernels and the composite path
    read it per candidate row; gradients to keys sum over the candidates).

    ``weights = (w1, b1, ..., w_out, b_out)`` in ``nn.Linear`` layout; ``alphas``: one [H] (or [1]) tensor
    per hidden layer for prelu / dice; ``dice_stats``: one (running_mean, running_var) pair per hidden layer
    (required for dice in eval mode). Gradients flow to query, keys, every weight and bias, and the alphas.

    Paths: the fused Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``) for 1 or 2 hidden layers of
    width <= 256 and D <= 256 (padded D x H1 and H1 x H2 tiles up to 128 x 128; ``fused_supported``) in
    fp32/fp16/bf16; on CPU the C++ op (``attention_cpu``) where it is built, else the torch composite path
    (same results). An MLP without hidden layer (``weights = (w_out, b_out)``) is supported too.
    ``activation="dice"`` with ``training=True`` (batch statistics over the valid positions, running
    statistics updated in place) runs, with one query row per history, on the Triton kernels of
    ``fused_dice_training.py`` where Triton runs and they cover the problem, or on the C++ op where it runs,
    else one autograd pass of the composite through ``din_kernels.dice``, and under ``torch.compile`` one
    traced pass of the composite with masked batch statistics (``small._dice_training_traced``: one graph);
    every other mode runs the launchers through
    ``DinAttentionFunction`` in eager mode and through the custom op ``torch.ops.din_kernels.din_attention``
    under ``torch.compile`` (``fullgraph=True`` keeps it as one node), except that small problems on the
    composite path (B x T <= ``small.SMALL_POSITIONS``) run ``attention_torch_small`` eagerly.
    The weights returned with ``return_scores=True`` carry no gradient (they are detached).
    """
    lengths, weights, alpha_list, means, variances = _checked(query, keys, lengths, weights, form, activation,
                                                              normalize, scale, alphas, dice_stats, training)
    momentum, eps = check_momentum_eps(momentum, eps)  # (Dice's; checked whatever the activation)
    batch, seq_len, dim = keys.shape
    candidates = query.shape[1] if query.dim() == 3 else 1
    rows = query.reshape(batch * candidates, dim)  # [R, D], R = B * C: the launchers' query (a view)
    scale = None if scale is None else float(scale)
    if torch.compiler.is_compiling():
        if activation_spec(activation).has_stats and training:
            plan = plan_attention(keys, weights, alpha_list, means, variances, activation, training=True,
                                  candidates=candidates)
        else:
            out, attn, _ = _din_attention_op(rows.contiguous(), keys.contiguous(), lengths, list(weights),
                                             alpha_list, means, variances, float(eps), form, activation,
                                             normalize, scale)
            return _shaped(query, out, attn, return_scores)
    else:
        plan = plan_attention(keys, weights, alpha_list, means, variances, activation, training=training,
                              eager=True, candidates=candidates, momentum=momentum)
    # (not while compiling: dynamo refuses a logger call inside a fullgraph compile, which Dice in training
    # reaches; the compiled graph logs nothing per call anyway)
    if not torch.compiler.is_compiling() and _log.isEnabledFor(logging.DEBUG):
        _log.debug("din_attention B=%d C=%d T=%d D=%d: %s", batch, candidates, seq_len, dim, plan)
    rows, keys = rows.contiguous(), keys.contiguous()
    if plan.path in ("composite-small", "composite-autograd"):
        out, attn = attention_torch_small(rows, keys, lengths, plan.weights, plan.alphas, plan.dice_eval,
                                          float(eps), form=form, activation=plan.activation, normalize=normalize,
                                          scale=scale,
                                          dice_training=momentum if plan.path == "composite-autograd" else None)
        attn = attn.detach()
    else:
        differentiable = [rows, keys, *weights, *alpha_list]
        keep = torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)
        out, attn = DinAttentionFunction.apply(
            rows, keys, lengths, (len(weights), len(alpha_list), len(means)), float(eps), form, plan, normalize,
            scale, keep, *weights, *alpha_list, *means, *variances)
    return _shaped(query, out, attn, return_scores)


def _shaped(query: Tensor, out: Tensor, attn: Tensor, return_scores: bool):
    """The launchers' out [R, D] and attn [R, T] in the query's layout: [B, D] / [B, T], or [B, C, D] /
    [B, C, T] for a query of C candidates per history."""
    if query.dim() == 3:
        out, attn = out.view(query.shape), attn.view(*query.shape[:2], attn.shape[-1])
    return (out, attn) if return_scores else out
