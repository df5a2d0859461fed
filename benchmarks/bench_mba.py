"""MBA regularisation: cost of one training step of an embedding table against its size N.

Batch: 1024 ids drawn from a Zipf distribution (numpy ``zipf(a=1.2) - 1``, mod N; seed 0), D = 64, fp32.
Methods (each is one full step of the table; ``G`` is a fixed upstream gradient [1024, D]):

    mba_sgd_       dk.mba_sgd_(W, ids, G, inv_freq, lr, lam): validate, coalesce, fused update
    mba_adagrad_   dk.mba_adagrad_ (row-wise state [N])
    fused_sgd      dk.MBAEmbedding(optimizer="sgd"): lookup + backward, the step inside backward
    sparse_sgd     dk.MBAEmbedding(optimizer=None): lookup + backward (sparse grad) + torch.optim.SGD.step
    dense_l2       DeepCTR-Torch / FuxiCTR style: F.embedding lookup, loss + lam * ||W||^2 over the whole
                   table, backward (dense [N, D] gradient), torch.optim.SGD.step over all rows, zero_grad
    dense_decay    the floor of any whole-table L2: only ``W *= 1 - 2 lr lam`` in place (one read and one
                   write of the table, no allocation, no lookup, no gradient)

One table of each size is allocated at a time and freed before the next (N = 1e7 is 2.56 GB; dense_l2 needs
about three more tables' worth of memory for its gradient and temporaries).

    .venv/bin/python benchmarks/bench_mba.py [--rows 1e4,1e5,1e6,1e7] [--repeats 5]   # printable table
    .venv/bin/python -m pytest -q benchmarks/bench_mba.py --benchmark-columns=min,median,mean,rounds

``DIN_BENCH_MBA_ROWS`` (e.g. ``1e4,1e5``) limits the sizes in pytest mode. Runs on CUDA when available (the
Triton kernels), on the CPU torch path otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import din_kernels as dk
from din_kernels.testing import use_triton

BATCH, DIM, LAM, LR = 1024, 64, 1e-4, 0.05
DEFAULT_ROWS = (10_000, 100_000, 1_000_000, 10_000_000)
METHODS = ("mba_sgd_", "mba_adagrad_", "fused_sgd", "sparse_sgd", "dense_l2", "dense_decay")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def zipf_ids(num_rows: int, batch: int = BATCH, seed: int = 0) -> torch.Tensor:
    draws = np.random.default_rng(seed).zipf(1.2, batch) - 1  # heavy-tailed: a few hot ids, a long tail
    return torch.from_numpy(draws % num_rows).to(DEVICE)


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


class Setup:
    """One table of ``num_rows`` rows and the step closures of every method on it."""

    def __init__(self, num_rows: int):
        self.num_rows = num_rows
        self.ids = zipf_ids(num_rows)
        generator = torch.Generator().manual_seed(0)
        self.grad = torch.randn(BATCH, DIM, generator=generator).to(DEVICE)
        counts = dk.row_frequencies(self.ids, num_rows) + 1  # every row occurs in "training" at least once
        self.module = dk.MBAEmbedding(num_rows, DIM, counts, LAM, optimizer=None, lr=LR, padding_idx=None,
                                      device=DEVICE)
        self.weight = self.module.weight
        with torch.no_grad():
            self.weight.mul_(1e-2)
        self.inv_freq = self.module.inv_freq
        self.state = torch.zeros(num_rows, device=DEVICE)
        self.sgd = torch.optim.SGD([self.weight], lr=LR)
        self.unique = int(torch.unique(self.ids).numel())

    def step(self, method: str) -> None:
        module, weight = self.module, self.weight
        if method == "mba_sgd_":
            dk.mba_sgd_(weight, self.ids, self.grad, self.inv_freq, LR, LAM)
        elif method == "mba_adagrad_":
            dk.mba_adagrad_(weight, self.state, self.ids, self.grad, self.inv_freq, LR, LAM)
        elif method == "fused_sgd":
            module.optimizer = "sgd"  # the same table with the step in backward (no second 2.56 GB table)
            try:
                module(self.ids).backward(self.grad)
            finally:
                module.optimizer = None
        elif method == "sparse_sgd":
            module(self.ids).backward(self.grad)
            self.sgd.step()
            self.sgd.zero_grad()
        elif method == "dense_l2":
            out = F.embedding(self.ids, weight)
            loss = (out * self.grad).sum() + LAM * weight.square().sum()
            loss.backward()
            self.sgd.step()  # same SGD, now with a dense [N, D] gradient
            self.sgd.zero_grad()
        elif method == "dense_decay":
            with torch.no_grad():
                weight.mul_(1.0 - 2.0 * LR * LAM)
        else:
            raise ValueError(method)
        _sync()

    def close(self) -> None:
        self.sgd.zero_grad()
        del self.module, self.weight, self.sgd, self.state, self.inv_freq
        gc.collect()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()


def _repeats(method: str, num_rows: int, repeats: int) -> int:
    if method.startswith("dense"):
        return max(3, repeats // 2) if num_rows >= 1_000_000 else repeats
    return repeats * 20  # cheap steps: more samples for a stable median


def measure(setup: Setup, methods, repeats: int) -> dict:
    """Samples per method, interleaved: round r runs every method's share of samples in turn, so that a burst
    of load from other processes on the shared machine hits all methods alike instead of one of them."""
    for method in methods:  # warm-up (allocator, first-call paths)
        for _ in range(2):
            setup.step(method)
    wanted = {m: _repeats(m, setup.num_rows, repeats) for m in methods}
    rounds = min(wanted.values())
    times = {m: [] for m in methods}
    for r in range(rounds):
        for method in methods:
            share = wanted[method] * (r + 1) // rounds - wanted[method] * r // rounds
            for _ in range(share):
                start = time.perf_counter()
                setup.step(method)
                times[method].append(time.perf_counter() - start)
    return times


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default=",".join(str(n) for n in DEFAULT_ROWS))
    parser.add_argument("--repeats", type=int, default=5, help="dense_l2 samples (x20 for the sparse steps)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [int(float(n)) for n in args.rows.split(",")]
    methods = args.methods.split(",")

    print(f"# MBA step vs table size: {datetime.date.today()}, {platform.node()}, {DEVICE} "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}, path "
          f"{'triton' if use_triton(torch.empty(0, device=DEVICE)) else 'torch'}")
    print(f"# batch {BATCH} Zipf(1.2) ids, D={DIM} fp32; median [p25, p75] of the samples; "
          f"load average {os.getloadavg()[0]:.1f} at start")
    results = {}
    for num_rows in rows:
        setup = Setup(num_rows)
        samples = measure(setup, methods, args.repeats)
        for method in methods:
            times = samples[method]
            q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
            results[num_rows, method] = statistics.median(times)
            print(f"N={num_rows:>10,} U={setup.unique:>4} {method:<13} {_fmt(results[num_rows, method]):>11} "
                  f"[{_fmt(q[0])}, {_fmt(q[2])}]  n={len(times)}", flush=True)
        setup.close()
        del setup

    print("\n| method | " + " | ".join(f"N={n:.0e}" for n in rows) + " | max/min over N |")
    print("|---|" + "---|" * (len(rows) + 1))
    for method in methods:
        cells = [results[n, method] for n in rows]
        print(f"| {method} | " + " | ".join(_fmt(c) for c in cells) + f" | {max(cells) / min(cells):.2f}x |")
    for dense in ("dense_l2", "dense_decay"):
        for n in rows:
            if (n, dense) in results:
                ratios = ", ".join(f"{m} {results[n, dense] / results[n, m]:,.0f}x" for m in methods
                                   if not m.startswith("dense"))
                print(f"{dense} / MBA at N={n:.0e}: {ratios}")


# ----------------------------------------------------------------------------------------------------------
# pytest-benchmark
# ----------------------------------------------------------------------------------------------------------

_ROWS = [int(float(n)) for n in os.environ.get("DIN_BENCH_MBA_ROWS", "").split(",") if n] or list(DEFAULT_ROWS)
_current = {}


@pytest.fixture(scope="module")
def tables():
    """At most one table alive: a new size frees the previous one."""
    def get(num_rows: int) -> Setup:
        if num_rows not in _current:
            for old in list(_current):
                _current.pop(old).close()
            _current[num_rows] = Setup(num_rows)
        return _current[num_rows]
    yield get
    for old in list(_current):
        _current.pop(old).close()


@pytest.mark.parametrize("num_rows,method", [(n, m) for n in _ROWS for m in METHODS],
                         ids=[f"N{n:.0e}-{m}" for n in _ROWS for m in METHODS])
def test_mba_step(benchmark, tables, num_rows, method):
    setup = tables(num_rows)
    benchmark.group = f"mba N={num_rows:.0e}"
    benchmark.extra_info.update(num_rows=num_rows, unique_ids=setup.unique, device=str(DEVICE))
    rounds = _repeats(method, num_rows, 5)
    benchmark.pedantic(setup.step, args=(method,), rounds=rounds, iterations=1, warmup_rounds=1)


if __name__ == "__main__":
    main()
