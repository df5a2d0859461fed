"""Dice: din_kernels against the eager reference and DeepCTR-Torch's Dice, training mode.

    .venv/bin/python -m pytest -q benchmarks/bench_dice.py --benchmark-columns=min,median,mean,rounds
    .venv/bin/python benchmarks/bench_dice.py --table [--repeats 15] [--threads 1]   # tables of RESULTS.md, section 3

Cases (fp32, seeded):
  attention         x [B*T, H] = [102400, 80]: the activations of the attention MLP's first hidden layer
                    (B=1024, T=100, H=80), every row valid
  attention_masked  x [B, T, H] = [1024, 100, 80] with lengths uniform in [1, T] (mask [B, T]): padding
                    kept out of the statistics. DeepCTR-Torch's Dice has no mask: it runs dim=3 on the same
                    tensor with the padding inside its statistics (the same work, not the same function)
  head              x [4096, 200]: the prediction head's first hidden layer (B=4096, H=200)
Providers, all with the same parameters (alpha, BatchNorm weight/bias, running statistics):
  din_kernels  ``din_kernels.Dice.from_deepctr(layer)`` (validation included): the torch composite path on
               CPU, the Triton kernels on CUDA
  reference    ``din_kernels.reference.dice`` in eager mode, autograd backward
  deepctr      ``deepctr_torch.layers.activation.Dice`` (BatchNorm1d + sigmoid + elementwise, autograd)
Modes: "forward" (training statistics and running-statistic update, under torch.no_grad) and
"forward+backward" (``torch.autograd.grad`` of the output with a random cotangent, for x, alpha, weight and
bias). The table interleaves the providers round-robin (background load hits all alike) and reports medians.
Memory: MB of tensors saved by autograd for the backward (``saved_tensors_hooks``; each storage once, the
input and the parameters left out): the activation memory a Dice layer holds between forward and backward.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import din_kernels as dk  # noqa: E402
from din_kernels import reference  # noqa: E402
from din_kernels.testing import interpreter_enabled  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (DEVICE, deepctr_available, describe_machine, import_deepctr, interleaved_samples,  # noqa: E402
                     ratio_row, ratio_table_header, synced, synchronize)

PROVIDERS = ("din_kernels", "reference", "deepctr")
MODES = ("forward", "forward+backward")
CASES = {
    "attention": ((102400, 80), False),
    "attention_masked": ((1024, 100, 80), True),
    "head": ((4096, 200), False),
}

if DEVICE.type == "cpu" and interpreter_enabled():
    # The interpreter (~26 ms per program instance) is a correctness tool: time what CPU users run.
    dk.set_backend("torch")


def available(provider: str) -> bool:
    if provider != "deepctr":
        return True
    return deepctr_available()


class Problem:
    """Input, mask, cotangent and one set of Dice parameters for a case."""

    def __init__(self, case: str, device: torch.device = DEVICE):
        shape, masked = CASES[case]
        generator = torch.Generator().manual_seed(0)
        channels = shape[-1]
        self.case, self.shape = case, shape
        self.x = (torch.randn(shape, generator=generator) * 2 + 0.5).to(device).requires_grad_()
        self.grad_out = torch.randn(shape, generator=generator).to(device)
        self.mask = None
        if masked:
            lengths = torch.randint(1, shape[1] + 1, (shape[0],), generator=generator)
            self.mask = (torch.arange(shape[1])[None, :] < lengths[:, None]).to(device)
        self.alpha = (torch.rand(channels, generator=generator) - 0.5).to(device)
        self.weight = (torch.rand(channels, generator=generator) + 0.5).to(device)
        self.bias = (torch.randn(channels, generator=generator) * 0.3).to(device)


def _deepctr_layer(problem: Problem):
    Dice = import_deepctr("deepctr_torch.layers.activation").Dice

    layer = Dice(problem.shape[-1], dim=len(problem.shape), device=str(DEVICE)).to(DEVICE)
    with torch.no_grad():
        layer.alpha.copy_(problem.alpha.reshape(layer.alpha.shape))
        layer.bn.weight.copy_(problem.weight)
        layer.bn.bias.copy_(problem.bias)
    return layer.train()


def _forward(provider: str, problem: Problem, params: List[torch.Tensor]) -> Callable[[], torch.Tensor]:
    """The forward of ``provider`` (training statistics); appends its parameters to ``params``."""
    p = problem
    deepctr = _deepctr_layer(p) if available("deepctr") else None
    if provider == "deepctr":
        params += [deepctr.alpha, deepctr.bn.weight, deepctr.bn.bias]
        return lambda: deepctr(p.x)
    if provider == "din_kernels":
        layer = dk.Dice.from_deepctr(deepctr) if deepctr is not None else _own_layer(p)
        params += [layer.alpha, layer.weight, layer.bias]
        return lambda: layer(p.x, p.mask)
    if provider == "reference":
        alpha, weight, bias = (t.clone().requires_grad_() for t in (p.alpha, p.weight, p.bias))
        running_mean = torch.zeros(p.shape[-1], device=DEVICE)
        running_var = torch.ones(p.shape[-1], device=DEVICE)
        params += [alpha, weight, bias]
        return lambda: reference.dice(p.x, alpha, running_mean, running_var, training=True, mask=p.mask,
                                      weight=weight, bias=bias)
    raise ValueError(f"unknown provider {provider!r}")


def make_step(provider: str, mode: str, problem: Problem) -> Callable[[], None]:
    """One call of ``provider`` in ``mode`` (training statistics), warmed up."""
    params = [problem.x]
    forward = _forward(provider, problem, params)
    if mode == "forward":
        def step():
            with torch.no_grad():
                forward()
    else:
        def step():
            torch.autograd.grad(forward(), params, problem.grad_out)
    for _ in range(2):
        step()
    return step


def _own_layer(problem: Problem) -> dk.Dice:
    layer = dk.Dice(problem.shape[-1], affine=True).to(DEVICE)
    with torch.no_grad():
        layer.alpha.copy_(problem.alpha)
        layer.weight.copy_(problem.weight)
        layer.bias.copy_(problem.bias)
    return layer


def saved_mb(problem: Problem, provider: str) -> float:
    """MB of tensors autograd keeps from the forward for the backward (activation memory), counting each
    storage once and leaving out the input x and the parameters, which are alive anyway."""
    layer_params = []
    saved: Dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    step_forward = _forward(provider, problem, layer_params)
    excluded = {t.untyped_storage().data_ptr() for t in [problem.x] + layer_params}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step_forward()
    return sum(saved.values()) / 2 ** 20


# --------------------------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # script mode needs no pytest
    pytest = None

if pytest is not None:
    _problems: Dict[str, Problem] = {}

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("provider", PROVIDERS)
    @pytest.mark.parametrize("case", list(CASES))
    def test_dice(benchmark, case, provider, mode):
        if not available(provider):
            pytest.skip("deepctr_torch is not installed")
        problem = _problems.setdefault(case, Problem(case))
        step = make_step(provider, mode, problem)
        benchmark.extra_info.update(provider=provider, mode=mode, device=str(DEVICE),
                                    threads=torch.get_num_threads(), backend=dk.get_backend())
        if mode == "forward+backward":
            benchmark.extra_info["saved_for_backward_mb"] = round(saved_mb(problem, provider), 2)
        benchmark.group = f"{case} {mode}"
        benchmark.pedantic(synced(step), setup=synchronize, rounds=7 if DEVICE.type == "cpu" else 50,
                           warmup_rounds=1, iterations=1)
        synchronize()


# --------------------------------------------------------------------------------------------------------
# script mode: the ratio table
# --------------------------------------------------------------------------------------------------------

def table(repeats: int, providers: List[str]) -> str:
    lines = [f"{describe_machine()}, fp32, affine, training mode, median of {repeats} interleaved rounds "
             "(min-max in brackets)", "", *ratio_table_header(providers)]
    memory = ["", "| case | " + " | ".join(f"{p} saved for backward MB" for p in providers) + " |",
              "|" + " --- |" * (len(providers) + 1)]
    for case in CASES:
        problem = Problem(case)
        for mode in MODES:
            steps = {p: make_step(p, mode, problem) for p in providers}
            lines.append(ratio_row(case, mode, interleaved_samples(steps, repeats), digits=2))
            print(lines[-1], flush=True)
            if mode == "forward+backward":
                memory.append(f"| {case} | " + " | ".join(f"{saved_mb(problem, p):.1f}" for p in providers) + " |")
            del steps
    return "\n".join(lines + memory)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", action="store_true", help="print the ratio table (markdown)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads first (1: immune to other processes' load on a shared machine)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.table:
        parser.error("use --table, or run through pytest for pytest-benchmark")
    providers = [p for p in args.providers.split(",") if available(p)]
    if "din_kernels" not in providers:
        parser.error("the providers must include din_kernels")
    print(table(args.repeats, providers))


if __name__ == "__main__":
    main()
