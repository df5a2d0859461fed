"""Dice in the attention MLP while training (``din_attention(activation="dice", training=True)``, what
DeepCTR-Torch's DIN uses by default: ``att_activation="Dice"``): din_kernels against the eager reference and
DeepCTR-Torch's layer, forward+backward, medians of interleaved calls.

    python benchmarks/bench_dice_attention.py [--threads 1] [--repeats 7] [--cases 256x50x36:full,...]

Same work, different statistics: din_kernels and the reference take the Dice statistics over the valid
positions, DeepCTR's BatchNorm over every position, padding included. Cases and lengths as
``bench_attention.py``'s; ``--threads`` sets torch's threads and the C++ ops' alike.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import din_kernels as dk  # noqa: E402
from din_kernels import reference  # noqa: E402

from _timing import import_deepctr  # noqa: E402
from bench_attention import HIDDEN, Case, Problem  # noqa: E402


def steps(problem: Problem) -> Dict[str, Callable[[], None]]:
    AttentionSequencePoolingLayer = import_deepctr("deepctr_torch.layers.sequence").AttentionSequencePoolingLayer

    p, dim = problem, problem.case.dim
    ours = dk.LocalActivationUnit(dim, HIDDEN, activation="dice").train()
    theirs = AttentionSequencePoolingLayer(att_hidden_units=HIDDEN, att_activation="Dice",
                                           embedding_dim=dim).train()
    query, keys = p.query.detach().requires_grad_(), p.keys.detach().requires_grad_()

    def din_kernels():
        out = ours(query, keys, p.lengths)
        torch.autograd.grad(out, [query, keys, *ours.parameters()], p.grad_out)

    def eager_reference():
        stats = [(d.running_mean.clone(), d.running_var.clone()) for d in ours.dice]
        out = reference.din_attention(query, keys, p.lengths, ours.weights(), activation="dice",
                                      alphas=[d.alpha for d in ours.dice], dice_stats=stats, training=True)
        torch.autograd.grad(out, [query, keys, *ours.parameters()], p.grad_out, allow_unused=True)

    def deepctr():
        out = theirs(query[:, None], keys, p.lengths[:, None])[:, 0]
        torch.autograd.grad(out, [query, keys, *theirs.parameters()], p.grad_out)

    return {"din_kernels": din_kernels, "reference": eager_reference, "deepctr": deepctr}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cases", default="256x50x36:full,256x50x36,1024x100x36:full,1024x100x36")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    dk.set_cpu_threads(args.threads)
    print("| threads | case | din_kernels ms | reference ms | deepctr ms | reference / din_kernels | "
          "deepctr / din_kernels |\n|" + " --- |" * 7)
    for name in args.cases.split(","):
        case = Case.parse(name)
        calls = steps(Problem(case))
        for call in calls.values():  # warm caches and allocators
            call()
        samples = {provider: [] for provider in calls}
        for _ in range(args.repeats):
            for provider, call in calls.items():
                start = time.perf_counter()
                call()
                samples[provider].append((time.perf_counter() - start) * 1e3)
        ms = {provider: statistics.median(v) for provider, v in samples.items()}
        print(f"| {args.threads} | {case.name} | {ms['din_kernels']:.1f} | {ms['reference']:.1f} | "
              f"{ms['deepctr']:.1f} | {ms['reference'] / ms['din_kernels']:.2f}x | "
              f"{ms['deepctr'] / ms['din_kernels']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
