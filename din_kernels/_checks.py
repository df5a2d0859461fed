"""Argument validation shared by all ops.

Every public op validates here before any kernel runs: a Triton kernel handed a bad index or a wrong
shape does not fail, it silently reads or writes someone else's memory. Errors name the argument and
the problem (TypeError for kinds, ValueError for values and shapes, IndexError for ids out of range).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .activations import ACTIVATIONS, activation_spec

Tensor = torch.Tensor

FORMS = ("concat", "outer")
NORMALIZATIONS = ("none", "softmax")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_tensor(name: str, value, *, ndim: Optional[int] = None, floating: bool = False,
                 integer: bool = False) -> Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16, bf16, fp32, fp64), got {value.dtype}")
    if integer and value.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    return value


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_same_device(**tensors: Optional[Tensor]) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on one device; got {listing}")


def check_nonnegative_finite(name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


#: How ``lengths`` are checked against [0, T] (``set_length_check``): "host" reads their range (one device
#: sync per call on CUDA), "device" asserts on the device without a sync (``torch._assert_async``: a CUDA
#: training step then makes no host sync and can be captured in a CUDA graph; a bad length is reported by a
#: later CUDA call and leaves the CUDA context unusable, as every device-side assert does). Either way the
#: kernels clamp each length to [0, T], so a bad value never touches memory outside its row.
LENGTH_CHECKS = ("host", "device")
_length_check = "host"


def set_length_check(mode: str) -> None:
    """``"host"`` (default: a clear ValueError before any kernel runs) or ``"device"`` (no host sync)."""
    global _length_check
    _length_check = check_choice("length check", mode, LENGTH_CHECKS)


def get_length_check() -> str:
    return _length_check


def check_momentum_eps(momentum, eps) -> Tuple[float, float]:
    """Batch statistics' momentum (a number in [0, 1]) and eps (finite, >= 0), as floats."""
    eps = check_nonnegative_finite("eps", eps)
    momentum = check_nonnegative_finite("momentum", momentum)
    if momentum > 1:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    return momentum, eps


def check_lengths(lengths: Tensor, batch: int, max_len: int, device: torch.device) -> Tensor:
    check_tensor("lengths", lengths, integer=True)
    if lengths.dim() == 2 and lengths.shape[1] == 1:  # DeepCTR-style [B, 1]
        lengths = lengths[:, 0]
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"lengths must have shape [B]=[{batch}], got {tuple(lengths.shape)}")
    if lengths.device != device:
        raise ValueError(f"lengths must be on {device} like keys, got {lengths.device}")
    # Reading values syncs and breaks torch.compile graphs: skipped while compiling, where the kernels
    # clamp each length to [0, T] so that a bad value can still never touch memory outside its row.
    if lengths.numel() > 0 and not torch.compiler.is_compiling():
        if _length_check == "device":
            torch._assert_async(((lengths >= 0) & (lengths <= max_len)).all())
            return lengths
        low, high = (int(v) for v in torch.aminmax(lengths))  # one read of the range (one sync)
        if low < 0 or high > max_len:
            raise ValueError(f"lengths must lie in [0, T]=[0, {max_len}], got values in [{low}, {high}]")
    return lengths


def check_attention_args(query, keys, lengths, weights, form, activation, normalize, scale,
                         alphas, dice_stats):
    """Validate ``din_attention``'s arguments; returns (lengths as [B], weights as a tuple)."""
    check_tensor("query", query, floating=True)
    if query.dim() not in (2, 3):
        raise ValueError(f"query must be [B, D] (one candidate per history) or [B, C, D] (C candidates), got "
                         f"shape {tuple(query.shape)}")
    check_tensor("keys", keys, ndim=3, floating=True)
    check_choice("form", form, FORMS)
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("normalize", normalize, NORMALIZATIONS)
    batch, max_len, dim = keys.shape
    if query.shape[0] != batch or query.shape[-1] != dim:
        form_ = "[B, D]" if query.dim() == 2 else "[B, C, D]"
        raise ValueError(f"query must have shape {form_} with B={batch}, D={dim} to match keys "
                         f"{tuple(keys.shape)}, got {tuple(query.shape)}")
    if query.dtype != keys.dtype:
        raise TypeError(f"query and keys must share a dtype, got {query.dtype} and {keys.dtype}")
    check_same_device(query=query, keys=keys)
    lengths = check_lengths(lengths, batch, max_len, keys.device)
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number or None, got {scale!r}")

    if weights is None or isinstance(weights, (str, bytes, Tensor)) or not hasattr(weights, "__iter__"):
        raise TypeError(f"weights must be a sequence of tensors (w1, b1, ..., w_out, b_out), got "
                        f"{type(weights).__name__}")
    weights = tuple(weights)
    if len(weights) < 2 or len(weights) % 2:
        raise ValueError("weights must be (w1, b1, ..., w_out, b_out): an even number >= 2 of tensors, "
                         f"got {len(weights)}")
    in_features = 4 * dim if form == "concat" else 2 * dim + dim * dim
    for index in range(0, len(weights), 2):
        w, b = weights[index], weights[index + 1]
        layer = index // 2
        check_tensor(f"weights[{index}]", w, ndim=2, floating=True)
        check_tensor(f"weights[{index + 1}]", b, ndim=1, floating=True)
        if w.shape[1] != in_features:
            raise ValueError(f"weights[{index}] (layer {layer}) must have {in_features} input features "
                             f"(form={form!r}, D={dim}), got shape {tuple(w.shape)}")
        if b.shape[0] != w.shape[0]:
            raise ValueError(f"weights[{index + 1}] (bias of layer {layer}) must have {w.shape[0]} entries, "
                             f"got {b.shape[0]}")
        if w.device != keys.device or b.device != keys.device:
            raise ValueError(f"weights of layer {layer} must be on {keys.device} like keys")
        in_features = w.shape[0]
    if weights[-2].shape[0] != 1:
        raise ValueError(f"the output layer weights[{len(weights) - 2}] must have 1 output, "
                         f"got shape {tuple(weights[-2].shape)}")

    hidden_widths = [weights[i].shape[0] for i in range(0, len(weights) - 2, 2)]
    spec = activation_spec(activation)
    if spec.has_alpha:
        if alphas is None or len(alphas) != len(hidden_widths):
            raise ValueError(f"activation={activation!r} needs alphas: one [H] tensor per hidden layer "
                             f"({len(hidden_widths)}), got {None if alphas is None else len(alphas)}")
        for layer, (alpha, width) in enumerate(zip(alphas, hidden_widths)):
            check_tensor(f"alphas[{layer}]", alpha, floating=True)
            if alpha.numel() not in (1, width):
                raise ValueError(f"alphas[{layer}] must have 1 or {width} entries, got {alpha.numel()}")
    if spec.has_stats and dice_stats is not None:
        if len(dice_stats) != len(hidden_widths):
            raise ValueError(f"dice_stats must hold one (running_mean, running_var) per hidden layer "
                             f"({len(hidden_widths)}), got {len(dice_stats)}")
        for layer, (stats, width) in enumerate(zip(dice_stats, hidden_widths)):
            for part, tensor in zip(("running_mean", "running_var"), stats):
                check_tensor(f"dice_stats[{layer}].{part}", tensor, ndim=1, floating=True)
                if tensor.shape[0] != width:
                    raise ValueError(f"dice_stats[{layer}].{part} must have {width} entries, got {tensor.shape[0]}")
    return lengths, weights


def check_writable(name: str, tensor: Tensor) -> None:
    """A tensor an op updates in place must not be an expanded view: its elements would alias, and the
    kernels would write each of them several times (a ValueError before anything is written)."""
    if any(stride == 0 and size > 1 for stride, size in zip(tensor.stride(), tensor.shape)):
        raise ValueError(f"{name} is updated in place and must not be an expanded (stride 0) view; "
                         f"pass a tensor that owns its elements (e.g. .clone())")


def check_dice_args(x, alpha, running_mean, running_var, training, momentum, eps, mask, weight, bias):
    check_tensor("x", x, floating=True)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [N, C] or [B, T, C], got shape {tuple(x.shape)}")
    channels = x.shape[-1]
    check_tensor("alpha", alpha, floating=True)
    # two comparisons, not `not in (1, channels)`: under torch.compile with a dynamic channel count that
    # membership test came out true for 24 against C=24 (torch 2.13) and broke the graph with this error
    if alpha.numel() != 1 and alpha.numel() != channels:
        raise ValueError(f"alpha must have 1 or C={channels} entries, got {alpha.numel()}")
    for name, stat in (("running_mean", running_mean), ("running_var", running_var)):
        if stat is None:
            if not training:
                raise ValueError(f"{name} is required in eval mode (training=False)")
            continue
        check_tensor(name, stat, ndim=1, floating=True)
        if stat.shape[0] != channels:
            raise ValueError(f"{name} must have C={channels} entries, got {stat.shape[0]}")
        if training:
            check_writable(name, stat)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if (weight is None) != (bias is None):
        raise ValueError("weight and bias (the affine map inside the sigmoid) must be given together")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None:
            check_tensor(name, param, ndim=1, floating=True)
            if param.shape[0] != channels:
                raise ValueError(f"{name} must have C={channels} entries, got {param.shape[0]}")
    check_momentum_eps(momentum, eps)
    if mask is not None:
        check_tensor("mask", mask)
        if x.dim() != 3:
            raise ValueError("mask is only accepted with a 3-D x of shape [B, T, C]")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if mask.shape != x.shape[:2]:
            raise ValueError(f"mask must have shape [B, T]={list(x.shape[:2])}, got {list(mask.shape)}")
    check_same_device(x=x, alpha=alpha, running_mean=running_mean, running_var=running_var,
                      mask=mask, weight=weight, bias=bias)


def check_ids(ids, num_rows: int, name: str = "ids") -> Tensor:
    """Integer ids within [0, num_rows): an IndexError names the first bad id."""
    check_tensor(name, ids, integer=True)
    if ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= num_rows:
            bad = low if low < 0 else high
            raise IndexError(f"{name} contains {bad}, outside the table's rows [0, {num_rows})")
    return ids


def check_table(weight, name: str = "weight") -> Tensor:
    check_tensor(name, weight, ndim=2, floating=True)
    return weight


def check_inv_freq(inv_freq, weight: Tensor, ids: Tensor) -> Tensor:
    check_tensor("inv_freq", inv_freq, ndim=1, floating=True)
    if inv_freq.shape[0] != weight.shape[0]:
        raise ValueError(f"inv_freq must have one entry per table row ({weight.shape[0]}), got {inv_freq.shape[0]}")
    if ids.numel():
        used = inv_freq[ids.reshape(-1).long()]
        if not bool(torch.isfinite(used).all()) or bool((used < 0).any()):
            raise ValueError("inv_freq must be finite and >= 0 at every id in the batch "
                             "(a row that never occurs in training has no frequency: count it first)")
    return inv_freq


def check_mba_step_args(weight, ids, grad_rows, inv_freq, lr, lam, state=None):
    check_table(weight)
    check_writable("weight", weight)
    check_ids(ids, weight.shape[0])
    check_tensor("grad_rows", grad_rows, floating=True)
    if grad_rows.dim() != 2 or grad_rows.shape != (ids.numel(), weight.shape[1]):
        raise ValueError(f"grad_rows must have shape [K, D]=[{ids.numel()}, {weight.shape[1]}] "
                         f"(one row per id), got {tuple(grad_rows.shape)}")
    check_inv_freq(inv_freq, weight, ids)
    lr = check_nonnegative_finite("lr", lr)
    lam = check_nonnegative_finite("lam", lam)
    if state is not None:
        check_tensor("state", state, ndim=1, floating=True)
        check_writable("state", state)
        if state.shape[0] != weight.shape[0]:
            raise ValueError(f"state must have one entry per table row ({weight.shape[0]}), got {state.shape[0]}")
    check_same_device(weight=weight, ids=ids, grad_rows=grad_rows, inv_freq=inv_freq, state=state)
    return lr, lam
