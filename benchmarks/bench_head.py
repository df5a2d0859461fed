"""DIN's head MLP with Dice, forward+backward in training mode: din_kernels' one op against the same layers as
modules and against DeepCTR-Torch's ``DNN(activation="dice")``, quiet and beside busy neighbours.

    .venv/bin/python benchmarks/bench_head.py [--rows 256] [--repeats 5] [--threads 1,2] [--busy 1]

The head of a DIN training step: x [rows, 108] (18+18-wide items: pooled, candidate, their product) ->
Linear 200 -> Dice -> Linear 80 -> Dice -> Linear 1, fp32; the gradient of the summed output for x and every
parameter. Providers, with the same widths:
  din_kernels  ``dk.DiceMLP`` (the C++ op ``csrc/mlp_cpu.cpp`` on CPU), at ``dk.set_cpu_threads(N)`` with
               torch's own ops at 1 thread, as ``din train --threads N`` runs it
  modules      ``nn.Linear`` and ``dk.Dice`` modules chained (din's head before the op), set up alike
  deepctr      ``deepctr_torch.layers.DNN(108, (200, 80), activation="dice", dice_dim=2)`` and an
               ``nn.Linear(80, 1)``, torch at N threads (its only knob)
Each provider runs in a process of its own (as users run one training per process; in one process the peer's
torch threads, still spinning after its calls, took the core from ours), ``--repeats`` processes per provider,
alternating (background load hits all alike); each times ``--rounds`` rounds of ``--calls`` calls and reports
its median per call; the table gives the median (min-max) over the processes and the ratios over din_kernels'.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import din_kernels as dk  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (busy_neighbours, import_deepctr, print_result, ratio_row, ratio_table_header,  # noqa: E402
                     run_worker, thread_counts, time_ms)

WIDTHS = (108, 200, 80)
PROVIDERS = ("din_kernels", "modules", "deepctr")


def _deepctr_head() -> Optional[nn.Module]:
    try:
        DNN = import_deepctr("deepctr_torch.layers").DNN
    except ImportError:
        return None
    return nn.Sequential(DNN(WIDTHS[0], WIDTHS[1:], activation="dice", dice_dim=2), nn.Linear(WIDTHS[-1], 1))


def make_step(provider: str, rows: int, calls: int) -> Callable[[], None]:
    torch.manual_seed(0)
    ours = dk.DiceMLP(WIDTHS[0], WIDTHS[1:])
    if provider == "din_kernels":
        head = ours
    elif provider == "modules":
        head = nn.Sequential(ours.linears[0], dk.Dice(WIDTHS[1]), ours.linears[1], dk.Dice(WIDTHS[2]),
                             ours.linears[2])
    else:
        head = _deepctr_head()
    x = torch.randn(rows, WIDTHS[0], requires_grad=True)

    def run() -> None:
        for _ in range(calls):
            head(x).sum().backward()
    return run


def worker(args) -> int:
    """``--worker PROVIDER``: the median ms per call over ``--rounds`` rounds, in this process, on stdout."""
    if args.worker == "deepctr":
        torch.set_num_threads(args.threads)
    else:  # as din train --threads N
        dk.set_cpu_threads(args.threads)
        torch.set_num_threads(1)
    run = make_step(args.worker, args.rows, args.calls)
    run()
    print_result(statistics.median(time_ms(run) / args.calls for _ in range(args.rounds)))
    return 0


def run_provider(provider: str, args, threads: int) -> float:
    """One ``--worker`` process of ``provider`` at ``threads``: its median ms per call."""
    return run_worker([sys.executable, str(Path(__file__).resolve()), "--worker", provider, "--threads",
                       str(threads), "--rows", str(args.rows), "--rounds", str(args.rounds), "--calls",
                       str(args.calls)], provider)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=256, help="batch rows (default 256, DIN's training batch)")
    parser.add_argument("--repeats", type=int, default=5, help="processes per provider and condition")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds in each process")
    parser.add_argument("--calls", type=int, default=10, help="forward+backward calls per round")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--busy", type=int, default=0, help="also time beside N neighbour processes")
    parser.add_argument("--worker", choices=PROVIDERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.threads = int(args.threads)
        return worker(args)
    if min(args.rows, args.repeats, args.rounds, args.calls) <= 0 or args.busy < 0:
        parser.error("--rows, --repeats, --rounds and --calls must be positive, --busy >= 0")
    try:
        counts = thread_counts(args.threads)
    except ValueError as error:
        parser.error(str(error))
    providers = [p for p in PROVIDERS if p != "deepctr" or _deepctr_head() is not None]
    print(f"DIN's head [{args.rows}, {WIDTHS[0]}] -> {WIDTHS[1]} -> {WIDTHS[2]} -> 1 with Dice, fp32, training, "
          f"forward+backward per call; each provider in its own process ({args.repeats} alternating processes, "
          f"each the median of {args.rounds} rounds of {args.calls} calls); medians (min-max) over the processes\n")
    print("\n".join(ratio_table_header(providers)).replace("| case | mode |", "| condition | threads |"))
    for condition, neighbours in (("quiet", 0), (f"{args.busy} busy neighbour(s)", args.busy)):
        if neighbours == 0 and condition != "quiet":
            continue
        with busy_neighbours(neighbours):
            for threads in counts:
                samples: Dict[str, List[float]] = {p: [] for p in providers}
                for _ in range(args.repeats):
                    for provider in providers:
                        samples[provider].append(run_provider(provider, args, threads))
                print(ratio_row(condition, str(threads), samples, digits=3), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
