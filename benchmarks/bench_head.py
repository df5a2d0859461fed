"""DIN's head MLP with Dice, forward+backward in training mode: din_kernels' one op against the same layers as
modules and against DeepCTR-Torch's ``DNN(activation="dice")``, quiet and beside busy neighbours.

    .venv/bin/python benchmarks/bench_head.py [--rows 256] [--repeats 30] [--threads 1,2] [--busy 1]

The head of a DIN training step: x [rows, 108] (18+18-wide items: pooled, candidate, their product) ->
Linear 200 -> Dice -> Linear 80 -> Dice -> Linear 1, fp32; the gradient of the summed output for x and every
parameter. Providers, with the same widths:
  din_kernels  ``dk.DiceMLP`` (the C++ op ``csrc/mlp_cpu.cpp`` on CPU), at ``dk.set_cpu_threads(N)`` with
               torch's own ops at 1 thread, as ``din train --threads N`` runs it
  modules      ``nn.Linear`` and ``dk.Dice`` modules chained (din's head before the op), set up alike
  deepctr      ``deepctr_torch.layers.DNN(108, (200, 80), activation="dice", dice_dim=2)`` and an
               ``nn.Linear(80, 1)``, torch at N threads (its only knob)
Each provider is timed in rounds of ``--calls`` calls, round-robin (background load hits all alike); the table
gives medians (min-max) per call and the ratios over din_kernels'.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import din_kernels as dk  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import busy_neighbours, ratio_row, ratio_table_header, time_ms  # noqa: E402

WIDTHS = (108, 200, 80)
PROVIDERS = ("din_kernels", "modules", "deepctr")


def _deepctr_head() -> Optional[nn.Module]:
    try:
        from deepctr_torch.layers import DNN
    except ImportError:
        return None
    return nn.Sequential(DNN(WIDTHS[0], WIDTHS[1:], activation="dice", dice_dim=2), nn.Linear(WIDTHS[-1], 1))


def make_steps(rows: int, calls: int) -> Dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    ours = dk.DiceMLP(WIDTHS[0], WIDTHS[1:])
    chain = nn.Sequential(ours.linears[0], dk.Dice(WIDTHS[1]), ours.linears[1], dk.Dice(WIDTHS[2]), ours.linears[2])
    heads = {"din_kernels": ours, "modules": chain, "deepctr": _deepctr_head()}
    x = torch.randn(rows, WIDTHS[0], requires_grad=True)

    def step(head: nn.Module) -> Callable[[], None]:
        def run() -> None:
            for _ in range(calls):
                head(x).sum().backward()
        return run

    return {name: step(head) for name, head in heads.items() if head is not None}


def measure(rows: int, threads: int, repeats: int, calls: int) -> Dict[str, List[float]]:
    steps = make_steps(rows, calls)
    samples: Dict[str, List[float]] = {}
    for name, run in steps.items():  # warm-up, each under its own thread set-up
        _set_threads(name, threads)
        run()
    for _ in range(repeats):  # round-robin, each provider under its own thread set-up
        for name, run in steps.items():
            _set_threads(name, threads)
            samples.setdefault(name, []).append(time_ms(run) / calls)
    return samples


def _set_threads(provider: str, threads: int) -> None:
    if provider == "deepctr":
        torch.set_num_threads(threads)
    else:  # din train --threads N
        dk.set_cpu_threads(threads)
        torch.set_num_threads(1)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=256, help="batch rows (default 256, DIN's training batch)")
    parser.add_argument("--repeats", type=int, default=30, help="rounds per provider")
    parser.add_argument("--calls", type=int, default=10, help="forward+backward calls per round")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--busy", type=int, default=0, help="also time beside N neighbour processes")
    args = parser.parse_args(argv)
    if min(args.rows, args.repeats, args.calls) <= 0 or args.busy < 0:
        parser.error("--rows, --repeats and --calls must be positive, --busy >= 0")
    try:
        thread_counts = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--threads: expected integers like '1,2', got {args.threads!r}")
    if not thread_counts or min(thread_counts) <= 0:
        parser.error("--threads needs positive integers")
    providers = [p for p in PROVIDERS if p != "deepctr" or _deepctr_head() is not None]
    print(f"DIN's head [{args.rows}, {WIDTHS[0]}] -> {WIDTHS[1]} -> {WIDTHS[2]} -> 1 with Dice, fp32, training, "
          f"forward+backward per call, median of {args.repeats} round-robin rounds of {args.calls} calls "
          "(min-max)\n")
    print("\n".join(ratio_table_header(providers)).replace("| case | mode |", "| condition | threads |"))
    for condition, neighbours in (("quiet", 0), (f"{args.busy} busy neighbour(s)", args.busy)):
        if neighbours == 0 and condition != "quiet":
            continue
        with busy_neighbours(neighbours):
            for threads in thread_counts:
                print(ratio_row(condition, str(threads), measure(args.rows, threads, args.repeats, args.calls),
                                digits=3), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
