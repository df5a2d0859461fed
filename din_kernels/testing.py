"""What the test suite and the benchmarks use of din_kernels' internals, in one documented place.

Users need none of this (the public API is ``din_kernels``' ``__all__``); tests and benchmarks that check
one path or one piece directly import it from here, so that moving an internal touches this file, not
every test.

Local activation unit (``din_kernels.attention``), one launcher contract on every path::

    forward(query, keys, lengths, weights, alphas, dice_eval, eps, *, form, activation, normalize, scale)
        -> (out, attn, lse)
    backward(grad_out, query, keys, lengths, weights, alphas, dice_eval, eps, out, attn, lse, *, form,
             activation, normalize, scale) -> (dquery, dkeys, dweights, dalphas)

- ``ATTENTION_LAUNCHERS``: ``{"triton": ..., "cpp": ..., "composite": ...}``, (forward, backward) each;
  ``attention_small``: the small-problem autograd path (returns ``(out, attn)``);
  ``attention_launchers(keys, weights, activation)``: the (forward, backward) a call's plan picks;
  ``fused_supported(keys, weights)``: whether the Triton kernels cover a problem.
- The modules, for tests of one piece's internals (chunk planning, workspaces, kept-activation buffers,
  tile and warp choices, the kernels themselves): ``attention_composite``, ``attention_small_module``,
  ``attention_cpu``, ``attention_fused``, ``attention_fused_dice_training`` (Dice in training mode on the
  Triton path), ``attention_fused_first_layer`` (the Triton paths' reduction of dM),
  ``attention_first_layer``, ``attention_plan`` and ``attention_function`` (the op, Function and
  functional: where a test spies on what a call runs).
- ``force_position_splits(n)``: a context in which the fused kernels run split over positions (rows x
  splits programs and a merge), which the launcher otherwise picks only on a GPU with too few rows.
- ``launch_choices_as(triton_before_3_9=, fp32_dot_min_k=, arch=)``: a context in which the fused attention
  launchers (eval and Dice-training) choose passes, parts, tiles and launch options as they would under
  another Triton on a GPU of that compute capability (Triton 3.6 on an A100: ``True, 16, 80``).

Dice (``din_kernels.dice``) and MBA (``din_kernels.mba``): ``dice_module`` and ``mba_module``, whose
kernels and mode constants the GPU compile report reads.

Backends: ``select_path(tensor, cpp=)`` (the rule every op follows), ``use_triton``,
``use_cpu_extension``, ``interpreter_enabled``; ``cpu_extension``, the C++ ops' build and loader (its
cache, threads and fallbacks are tested directly).
"""
from __future__ import annotations

import contextlib
import importlib

from . import cpu_extension
from ._backend import interpreter_enabled, select_path, use_cpu_extension, use_triton
from .attention import composite as attention_composite
from .attention import cpu as attention_cpu
from .attention import first_layer as attention_first_layer
from .attention import function as attention_function
from .attention import fused as attention_fused
from .attention import fused_dice_training as attention_fused_dice_training
from .attention import fused_first_layer as attention_fused_first_layer
from .attention import plan as attention_plan
from .attention import small as attention_small_module

dice_module = importlib.import_module("din_kernels.dice")  # (the package re-exports the function ``dice``)
mba_module = importlib.import_module("din_kernels.mba")

ATTENTION_LAUNCHERS = {
    "triton": (attention_fused.attention_forward, attention_fused.attention_backward),
    "cpp": (attention_cpu.attention_cpu_forward, attention_cpu.attention_cpu_backward),
    "composite": (attention_composite.attention_torch_forward, attention_composite.attention_torch_backward),
}
attention_small = attention_small_module.attention_torch_small
fused_supported = attention_fused.fused_supported


def attention_launchers(keys, weights, activation: str = "sigmoid"):
    """(forward, backward) of the path a call with these keys, weights and activation takes."""
    return attention_plan._launchers(keys, weights, activation)


__all__ = ["ATTENTION_LAUNCHERS", "attention_composite", "attention_cpu", "attention_first_layer",
           "attention_function", "attention_fused", "attention_fused_dice_training",
           "attention_fused_first_layer", "attention_launchers",
           "attention_plan", "attention_small", "attention_small_module", "cpu_extension", "dice_module",
           "force_position_splits", "fused_supported", "interpreter_enabled", "launch_choices_as", "mba_module",
           "select_path", "use_cpu_extension", "use_triton"]


@contextlib.contextmanager
def force_position_splits(splits: int):
    """Run the fused attention kernels split over positions (rows x ``splits`` programs, then a merge;
    ``attention_fused._position_splits``) whatever the problem, on CUDA or under the interpreter, where
    the launcher's heuristic never splits (it splits only when the rows are too few to fill the GPU).
    ``splits`` is what is asked for: whole tiles decide how many there are (one at least, e.g. T=1)."""
    before = attention_fused._forced_splits
    attention_fused._forced_splits = int(splits)
    try:
        yield
    finally:
        attention_fused._forced_splits = before


@contextlib.contextmanager
def launch_choices_as(triton_before_3_9: bool, fp32_dot_min_k: int, arch: int):
    """Let the fused attention launchers (``attention_fused``, ``attention_fused_dice_training``) choose as they
    would under another compiler and GPU: ``triton_before_3_9`` for ``_triton_before_3_9``, the smallest K of
    an fp32 ``tl.dot`` for ``_fp32_dot_min_k``, the compute capability for ``_device_arch`` (e.g. Triton 3.6 on
    an A100: ``True, 16, 80``). The interpreter then runs those choices: the passes, stage-2 parts and tiles
    change what the kernels compute in which order (the warps, stages and register caps do not matter there),
    so their results can be checked against the reference whatever Triton is installed."""
    replacements = dict(_triton_before_3_9=lambda: triton_before_3_9, _fp32_dot_min_k=lambda: fp32_dot_min_k,
                        _device_arch=lambda device: arch)
    modules = (attention_fused, attention_fused_dice_training)
    before = [(module, name, getattr(module, name)) for module in modules for name in replacements]
    for module, name, _ in before:
        setattr(module, name, replacements[name])
    try:
        yield
    finally:
        for module, name, original in before:
            setattr(module, name, original)
