"""C++ path of the local activation unit on the CPU: launchers around ``torch.ops.din_kernels_cpu``.

The op (``csrc/attention_cpu.cpp``, built by ``cpu_extension``) runs a whole forward, or a whole backward, as
one queue of row blocks that the caller and helper threads drain (``csrc/cpu_runtime.h``), with direct BLAS
calls inside and no barrier waiting for a descheduled thread: beside a busy neighbour process it slows down
like the eager reference or less at large calls, where the Python composite path (one OpenMP region per
torch op) collapsed. Same algebra and the same launcher contract as the composite path (``composite.py``)
and the Triton launchers; the first-layer split and the activation parameters come from
``first_layer.FirstLayer`` and ``composite._Activation``, so each lives once:

    attention_cpu_forward(query, keys, lengths, weights, alphas, dice_eval, eps, *, form, activation,
                          normalize, scale) -> (out [B, D], attn [B, T], lse [B] or empty)
    attention_cpu_backward(grad_out, query, keys, lengths, weights, alphas, dice_eval, eps, out, attn, lse,
                           *, form, activation, normalize, scale) -> (dquery, dkeys, dweights, dalphas)

fp16/bf16 inputs are computed in fp32, fp64 in fp64, as on the composite path. Results do not depend on the
thread count (weight gradients are summed per block, then over blocks in a fixed order). With ``kept=`` (a
list; ``DinAttentionFunction`` passes one in eager training) the forward keeps its leading blocks'
activations, up to ``KEEP_FLOATS``, for the backward, which then skips their recompute.
"""
from __future__ import annotations

import threading
from typing import List, Optional, Sequence, Tuple

import torch

from .. import cpu_extension
from .._dtypes import accumulation_dtype
from ..activations import activation_spec
from ..dice import _update_running
from .composite import _Activation, _check_launcher_args, candidates_per_history
from .first_layer import FirstLayer

Tensor = torch.Tensor

__all__ = ["attention_cpu_forward", "attention_cpu_backward", "attention_cpu_dice_training_forward",
           "attention_cpu_dice_training_backward"]

# Activations the forward may keep for the backward, in floats per call (``kept=``): 64 MB in fp32, which
# holds a whole DIN training call (B=256, T=50: 1.5 M floats with hidden (80, 40)) and B=1024, T=100 with
# every history full (12.3 M); larger calls keep their first blocks and recompute the rest. Skipping the
# recompute made forward + backward 1.3x faster there (2-core CPU). Bounded whatever B and T.
KEEP_FLOATS = 16 * 2 ** 20


class _SavedBuffers:
    """Buffers for the activations kept from a forward to its backward, reused across calls: a fresh
    multi-MB tensor per call costs its page faults again (measured here: a new 48 MB buffer 19 ms to fill, a
    reused one 1.4 ms). A backward hands its buffer back; at most ``limit`` wait for the next forward."""

    def __init__(self, limit: int = 2):
        self.limit = limit
        self.free: List[Tensor] = []
        self.lock = threading.Lock()

    def take(self, numel: int, dtype: torch.dtype) -> Tensor:
        with self.lock:
            fits = [i for i, b in enumerate(self.free) if b.dtype == dtype and b.numel() >= numel]
            if fits:  # (by index: == on tensors compares elements)
                return self.free.pop(min(fits, key=lambda i: self.free[i].numel()))
        # room for somewhat larger calls (batches differ in their lengths) within the bound
        return torch.empty(min(max(numel, numel * 5 // 4), max(numel, KEEP_FLOATS)), dtype=dtype)

    def give(self, buffer: Tensor) -> None:
        if buffer.numel() == 0:
            return
        with self.lock:
            self.free.append(buffer)
            if len(self.free) > self.limit:
                self.free.pop(min(range(len(self.free)), key=lambda i: self.free[i].numel()))


_BUFFERS = _SavedBuffers()


_NOTHING_KEPT = {dtype: torch.empty(0, dtype=dtype) for dtype in (torch.float32, torch.float64)}


class _Arguments:
    """The op's network arguments, in the compute dtype: the first layer split as ``FirstLayer`` does.
    ``dice_eval=None`` with Dice: training mode (``training_tensors``), the statistics are the call's."""

    def __init__(self, keys: Tensor, weights: Sequence[Tensor], alphas, dice_eval, eps: float, form: str,
                 activation: str):
        dim = keys.shape[2]
        self.dtype = dtype = accumulation_dtype(keys.dtype)
        self.first = FirstLayer(weights[0], weights[1], dim, form, dtype)
        widths = [weights[i].shape[0] for i in range(0, len(weights) - 2, 2)]
        self.act = _Activation(activation, alphas, dice_eval, eps, widths, dtype, keys.device)
        if not self.act.spec.fused:  # (the plan sends it to the composite path)
            raise ValueError(f"activation={activation!r} has no C++ kernel (activations.ACTIVATION_SPECS)")
        mq = self.first.wd_t if form == "concat" else self.first.wo_p
        self.tensors = [self.first.w_u.contiguous(), self.first.b1.contiguous(), self.first.m_base.contiguous(),
                        mq.contiguous(), form == "outer",
                        [weights[i].to(dtype).contiguous() for i in range(2, len(weights) - 2, 2)],
                        [weights[i + 1].to(dtype).contiguous() for i in range(2, len(weights) - 2, 2)],
                        weights[-2].to(dtype).reshape(-1).contiguous(), weights[-1].to(dtype).reshape(1),
                        self.act.spec.code,
                        [a.contiguous() for a in self.act.alphas] if self.act.spec.has_alpha else [],
                        [m.contiguous() for m, _ in self.act.dice] if dice_eval is not None else [],
                        [r.contiguous() for _, r in self.act.dice] if dice_eval is not None else []]
        self.widths = widths

    @property
    def training_tensors(self) -> list:
        """The arguments of the Dice-training ops: ``tensors`` without the activation code (the ops are Dice's)
        and the running statistics (the ops compute the call's own): the network's nine, then the alphas."""
        network, alphas = self.tensors[:9], self.tensors[10]
        return network + [alphas]


def _no_rows_forward(query: Tensor, keys: Tensor, normalize: str) -> Tuple[Tensor, Tensor, Tensor]:
    """The forward's outputs for a query of no rows: out [0, D], attn [0, T], lse [0]."""
    dtype = accumulation_dtype(keys.dtype)
    return (query.new_zeros(0, keys.shape[2]), keys.new_zeros(0, keys.shape[1], dtype=dtype),
            keys.new_zeros(0, dtype=dtype))


def _row_lengths(lengths: Tensor, candidates: int) -> Tensor:
    """The op's lengths: one per query row, [B * C] int64 contiguous."""
    lengths = lengths.to(torch.int64)
    return (lengths if candidates == 1 else lengths.repeat_interleave(candidates)).contiguous()


def attention_cpu_forward(
    query: Tensor, keys: Tensor, lengths: Tensor, weights: Sequence[Tensor],
    alphas: Optional[Sequence[Tensor]], dice_eval: Optional[Sequence[Tuple[Tensor, Tensor]]], eps: float,
    *, form: str, activation: str, normalize: str, scale: Optional[float], kept: Optional[list] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Local activation unit, forward (contract: ``composite.attention_torch_forward``). ``kept``: a
    list to append the buffer of kept activations and the op's arguments to, for
    ``attention_cpu_backward(..., kept=)`` (which then builds neither again)."""
    _check_launcher_args(weights, alphas, dice_eval, form, activation, normalize)
    if query.shape[0] == 0 < keys.shape[0]:  # no candidate for any history (C = 0)
        return _no_rows_forward(query, keys, normalize)
    ops = cpu_extension.ops()
    args = _Arguments(keys, weights, alphas, dice_eval, eps, form, activation)
    q = query.to(args.dtype).contiguous()
    k = keys.to(args.dtype).contiguous()
    candidates = candidates_per_history(query, keys)
    lengths = _row_lengths(lengths, candidates)
    saved = _NOTHING_KEPT[args.dtype]
    if kept is not None:
        needed = ops.attention_saved_floats(lengths, keys.shape[2], form == "outer", args.widths,
                                            args.act.spec.code, candidates)
        wanted = min(needed, KEEP_FLOATS)
        saved = _BUFFERS.take(wanted, args.dtype) if wanted else saved
        # the arguments too: rebuilding them costs the backward ~45 us (a DIN step's call: ~1%); the weights
        # they derive from cannot change in between (autograd checks the saved weights' versions)
        kept.append((saved, args))
    out, attn, lse = ops.attention_fwd(q, k, lengths, *args.tensors, normalize == "softmax", scale, saved,
                                       cpu_extension.threads())
    return out.to(query.dtype), attn, lse


def attention_cpu_backward(
    grad_out: Tensor, query: Tensor, keys: Tensor, lengths: Tensor, weights: Sequence[Tensor],
    alphas: Optional[Sequence[Tensor]], dice_eval: Optional[Sequence[Tuple[Tensor, Tensor]]], eps: float,
    out: Tensor, attn: Tensor, lse: Tensor,
    *, form: str, activation: str, normalize: str, scale: Optional[float], kept: Optional[list] = None,
):
    """Local activation unit, backward (contract: ``composite.attention_torch_backward``); recomputes
    the MLP block by block inside the op, except for the blocks whose activations the forward kept
    (``kept``, handed back to the buffer pool here). ``out`` and ``lse`` are part of the shared contract,
    unused here."""
    _check_launcher_args(weights, alphas, dice_eval, form, activation, normalize)
    if query.shape[0] == 0 < keys.shape[0]:  # no candidate for any history: every gradient is zero
        d_alphas = tuple(torch.zeros_like(a) for a in alphas) if alphas is not None and \
            activation_spec(activation).has_alpha else None
        return torch.zeros_like(query), torch.zeros_like(keys), tuple(torch.zeros_like(w) for w in weights), d_alphas
    ops = cpu_extension.ops()
    if kept:
        saved, args = kept.pop()
    else:
        args = _Arguments(keys, weights, alphas, dice_eval, eps, form, activation)
        saved = _NOTHING_KEPT[args.dtype]
    dtype = args.dtype
    d_query, d_keys, grads = ops.attention_bwd(
        grad_out.to(dtype).contiguous(), query.to(dtype).contiguous(), keys.to(dtype).contiguous(),
        _row_lengths(lengths, candidates_per_history(query, keys)), attn.to(dtype).contiguous(), *args.tensors,
        normalize == "softmax", scale, saved, cpu_extension.threads())
    _BUFFERS.give(saved)
    return (d_query.to(query.dtype), d_keys.to(keys.dtype)) + _weight_grads(args, weights, alphas, grads, form)


def _weight_grads(args: _Arguments, weights: Sequence[Tensor], alphas, grads: List[Tensor], form: str):
    """(d_weights, d_alphas) from the op's flat gradient list (``GradLayout`` in csrc/attention_cpu.cpp), in
    the weights' shapes and dtypes."""
    first, layers = args.first, len(args.widths)
    first.d_wu = grads[0].view(first.hidden, first.dim)
    first.d_b1 = grads[1]
    if form == "concat":
        first.d_wk = torch.cat([grads[2], grads[3]]).view(2 * first.dim, first.hidden)
    else:
        first.d_mbase = grads[2].view(first.dim, first.hidden)
        first.d_wo_p = grads[3].view(first.dim, first.dim * first.hidden)
    d_weights = list(first.weight_grads(weights[0], weights[1]))
    for index in range(1, layers):
        w, b = weights[2 * index], weights[2 * index + 1]
        d_weights += [grads[2 + 2 * index].view(w.shape).to(w.dtype), grads[3 + 2 * index].view(b.shape).to(b.dtype)]
    slot = 2 + 2 * layers
    d_weights += [grads[slot].view_as(weights[-2]).to(weights[-2].dtype),
                  grads[slot + 1].view_as(weights[-1]).to(weights[-1].dtype)]
    d_alphas = None
    if alphas is not None and args.act.spec.has_alpha:
        args.act.alpha_grads = list(grads[slot + 2:slot + 2 + layers])
        d_alphas = args.act.alpha_grads_like(alphas)
    return tuple(d_weights), d_alphas


# ----------------------------------------------------------------------------------------------------------
# Dice in training mode (``din_attention(activation="dice", training=True)``): the C++ op computes each hidden
# layer's batch statistics over the call's valid positions itself (one queue of blocks per layer, see
# "Dice in training mode" in csrc/attention_cpu.cpp) and keeps z and the Dice gate p of every valid position
# ([P, H_l] each: what the composite autograd pass keeps, without its [B, T, H] padding and intermediates)
# for its backward, which goes through the statistics. One query row per history: several candidates take
# the composite path (the plan), whose statistics span every candidate row.
# ----------------------------------------------------------------------------------------------------------

# The kept activations (~1 KB per valid position at DIN's widths: 98 MB at B=1024, T=100) and the backward's
# scratch, reused across calls as the eval path's buffers are (fresh pages of that size are faulted in again
# every call: 8% of a B=1024, T=100 training call's CPU samples went to page faults before).
_DICE_BUFFERS = _SavedBuffers(limit=3)


class _KeptDice:
    """What a Dice-training forward keeps for its backward. Its buffer returns to the pool when autograd frees
    the graph holding this object (its last reference), so a backward run twice (``retain_graph=True``)
    reads it twice."""

    def __init__(self, buffer: Tensor, means: List[Tensor], variances: List[Tensor], args: _Arguments):
        self.buffer, self.means, self.variances, self.args = buffer, means, variances, args

    def __del__(self):
        pool = globals().get("_DICE_BUFFERS")  # (None once the interpreter tears the module down)
        if pool is not None:
            pool.give(self.buffer)


def attention_cpu_dice_training_forward(
    query: Tensor, keys: Tensor, lengths: Tensor, weights: Sequence[Tensor],
    alphas: Optional[Sequence[Tensor]], dice_eval: Optional[Sequence[Tuple[Tensor, Tensor]]], eps: float,
    *, form: str, activation: str, normalize: str, scale: Optional[float], momentum: float,
    kept: Optional[list] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Dice attention in training mode, forward (contract: ``composite.attention_torch_forward``, query
    [B, D]): batch statistics per hidden layer over the valid positions; ``dice_eval``'s running statistics
    (if given) updated in place with ``momentum`` as ``nn.BatchNorm1d`` does (nothing when no position is
    valid). ``kept``: a list that gets what ``attention_cpu_dice_training_backward`` needs."""
    if activation != "dice":
        raise ValueError(f"the Dice-training op runs activation='dice', got {activation!r}")
    _check_launcher_args(weights, alphas, [(None, None)] * (len(weights) // 2 - 1), form, activation, normalize)
    if candidates_per_history(query, keys) != 1:
        raise ValueError("the Dice-training op takes one query row per history (query [B, D])")
    ops = cpu_extension.ops()
    args = _Arguments(keys, weights, alphas, None, eps, form, activation)
    lengths = lengths.to(torch.int64).contiguous()
    kept_floats, _ = ops.attention_dice_train_floats(lengths, args.widths, args.dtype == torch.float64)
    buffer = _DICE_BUFFERS.take(kept_floats, args.dtype)
    out, attn, lse, means, variances = ops.attention_dice_train_fwd(
        query.to(args.dtype).contiguous(), keys.to(args.dtype).contiguous(), lengths, *args.training_tensors,
        normalize == "softmax", scale, float(eps), buffer, cpu_extension.threads())
    if dice_eval is not None:
        count = int(lengths.sum())  # (valid positions: lengths lie in [0, T], checked by the op)
        for (running_mean, running_var), mean, var in zip(dice_eval, means, variances):
            _update_running(running_mean, running_var, mean, var, count, momentum)
    state = _KeptDice(buffer, list(means), list(variances), args)
    if kept is not None:
        kept.append(state)
    return out.to(query.dtype), attn, lse


def attention_cpu_dice_training_backward(
    grad_out: Tensor, query: Tensor, keys: Tensor, lengths: Tensor, weights: Sequence[Tensor],
    alphas: Optional[Sequence[Tensor]], dice_eval: Optional[Sequence[Tuple[Tensor, Tensor]]], eps: float,
    out: Tensor, attn: Tensor, lse: Tensor,
    *, form: str, activation: str, normalize: str, scale: Optional[float], kept: Optional[list] = None,
):
    """Dice attention in training mode, backward (contract: ``composite.attention_torch_backward``), through
    the batch statistics; needs the ``kept`` list its forward filled (it has no recompute: the statistics
    are the forward's)."""
    if not kept:
        raise RuntimeError("the Dice-training backward needs what its forward kept (kept=[...])")
    state = kept[-1]  # (read, not popped: a graph kept with retain_graph=True runs this backward again)
    args, dtype = state.args, state.args.dtype
    ops = cpu_extension.ops()
    lengths = lengths.to(torch.int64).contiguous()
    _, scratch_floats = ops.attention_dice_train_floats(lengths, args.widths, dtype == torch.float64)
    scratch = _DICE_BUFFERS.take(scratch_floats, dtype)
    d_query, d_keys, grads = ops.attention_dice_train_bwd(
        grad_out.to(dtype).contiguous(), query.to(dtype).contiguous(), keys.to(dtype).contiguous(), lengths,
        attn.to(dtype).contiguous(), *args.training_tensors, state.means, state.variances, state.buffer, scratch,
        normalize == "softmax", scale, float(eps), cpu_extension.threads())
    _DICE_BUFFERS.give(scratch)
    return (d_query.to(query.dtype), d_keys.to(keys.dtype)) + _weight_grads(args, weights, alphas, grads, form)
