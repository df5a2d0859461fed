"""Many candidates per history: ``din_attention(query [B, C, D], keys [B, T, D])`` against what a user does
without it, scoring a repeated batch (each history copied C times, ``query [B * C, D]``), same results.

    python benchmarks/bench_candidates.py [--threads N] [--repeats 7] [--batch 1] [--train] [--busy N]

Serving (default): one request, B=1 user, C candidates, no gradient: the C++ op's forward takes the
candidates on CPU. ``--train`` times forward + backward instead (several candidates per history with a
backward run the composite path on CPU; the repeated batch the C++ op, its keys gradient summed back over
the copies by autograd). Reports medians of interleaved calls, the ratio (repeated / ours, > 1: ours faster),
candidates per second, and the bytes of the C-fold history copy the repeated batch allocates.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import din_kernels as dk  # noqa: E402

from _timing import (DEVICE, busy_neighbours, describe_machine, interleaved_samples, ratio_row,  # noqa: E402
                     ratio_table_header)

DIM, HIDDEN = 36, (80, 40)


def steps(batch: int, candidates: int, seq_len: int, train: bool):
    unit = dk.LocalActivationUnit(DIM, HIDDEN, normalize="softmax").to(DEVICE).requires_grad_(train)
    query = torch.randn(batch, candidates, DIM, device=DEVICE, requires_grad=train)
    keys = torch.randn(batch, seq_len, DIM, device=DEVICE, requires_grad=train)
    lengths = torch.full((batch,), seq_len, device=DEVICE)
    grad = torch.randn(batch, candidates, DIM, device=DEVICE)

    def ours():
        out = unit(query, keys, lengths)
        if train:
            torch.autograd.grad(out, [query, keys, *unit.parameters()], grad)

    def repeated():
        flat_keys = keys.repeat_interleave(candidates, 0)  # [B * C, T, D]: the copy users make today
        out = unit(query.reshape(-1, DIM), flat_keys, lengths.repeat_interleave(candidates))
        if train:
            torch.autograd.grad(out, [query, keys, *unit.parameters()], grad.reshape(-1, DIM))

    def run(step):
        def call():
            with torch.set_grad_enabled(train):
                step()
        return call

    with torch.no_grad():  # the two agree before anything is timed
        torch.testing.assert_close(unit(query, keys, lengths).reshape(-1, DIM),
                                   unit(query.reshape(-1, DIM), keys.repeat_interleave(candidates, 0),
                                        lengths.repeat_interleave(candidates)), atol=1e-5, rtol=1e-4)
    return {"din_kernels": run(ours), "repeated": run(repeated)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=1, help="users per call (default 1: one request)")
    parser.add_argument("--candidates", default="10,100,1000")
    parser.add_argument("--lengths", default="50,500", help="history lengths T (every history full)")
    parser.add_argument("--train", action="store_true", help="forward + backward instead of serving")
    parser.add_argument("--busy", type=int, default=0,
                        help="neighbour processes doing torch work beside the timings (default 0: quiet)")
    args = parser.parse_args(argv)
    if min(args.threads, args.repeats, args.batch) < 1:
        parser.error("--threads, --repeats and --batch must be >= 1")
    torch.set_num_threads(args.threads)
    dk.set_cpu_threads(args.threads)
    mode = "forward+backward" if args.train else "forward (no grad)"
    print(describe_machine() + f", {mode}, B={args.batch}, D={DIM}, hidden {HIDDEN}, {args.busy} busy neighbours")
    with busy_neighbours(args.busy):
        _table(args, mode)
    return 0


def _table(args, mode: str) -> None:
    print(*ratio_table_header(["din_kernels", "repeated"]), sep="\n")
    extra = []
    for seq_len in (int(t) for t in args.lengths.split(",")):
        for candidates in (int(c) for c in args.candidates.split(",")):
            case = f"T={seq_len} C={candidates}"
            samples = interleaved_samples(steps(args.batch, candidates, seq_len, args.train), args.repeats)
            print(ratio_row(case, mode, samples, digits=2))
            median = sorted(samples["din_kernels"])[len(samples["din_kernels"]) // 2]
            copy_mb = args.batch * candidates * seq_len * DIM * 4 / 2 ** 20
            extra.append(f"{case}: {args.batch * candidates / median * 1e3:,.0f} candidates/s; the repeated "
                         f"batch copies {copy_mb:.1f} MB of history")
    print("\n".join(extra))


if __name__ == "__main__":
    sys.exit(main())
