"""Serving latency of one request (one user, C candidates, a history of T behaviours) on CPU: p50 and p99.

    python benchmarks/bench_serving.py [--threads 1,2] [--lengths 100,1000] [--candidates 100,1000]
                                       [--seconds 2] [--min-samples 30] [--no-aoti]

The default DIN of ``din train`` (goods and category tables of 100,001 and 1,001 rows, 18 + 18 wide; softmax
attention with scale D**-0.5, unit (80, 40) sigmoid; head 200-80 with Dice, BatchNorm on its input; random
weights: the time does not depend on their values), every history full. Timed, interleaved round-robin
within each case so that background load hits them alike:

* ``Scorer.score``: the eager ``din.Scorer`` as a user calls it (inputs checked against the tables, then
  ``DIN.score_candidates`` under inference mode);
* ``Scorer.check``: that check alone (included in the row above);
* ``export``: the ``torch.export`` program of ``din export`` (``.module()``) on ready tensors, inference mode;
* ``aoti``: the same program compiled by AOTInductor (``din export --aoti``) on ready tensors.

Threads as ``din score --threads N`` sets them: the C++ ops (attention, Dice) at N, torch's own ops at 1
(AOTInductor's generated kernels run on torch's OpenMP threads, so at 1). Each case runs until every method has
``--min-samples`` calls and ``--seconds`` have passed (at most 400 calls); p99 of fewer than 100 samples is
close to their maximum. The load average is printed before and after: quote figures from a quiet machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import din_kernels as dk  # noqa: E402
from din.cli import configure_threads  # noqa: E402
from din.model import ModelConfig, build_model  # noqa: E402
from din.serve import Scorer, export_program, load_program, save_aoti_package  # noqa: E402

GOODS, CATES = 100_001, 1_001
MAX_SAMPLES = 400


def machine() -> str:
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, C++ op {dk.cpu_op_available()}"


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def request(seq_len: int, count: int, generator: torch.Generator):
    items = torch.randint(1, GOODS, (seq_len,), generator=generator)
    cates = torch.randint(1, CATES, (seq_len,), generator=generator)
    pairs = torch.stack([torch.randint(1, GOODS, (count,), generator=generator),
                         torch.randint(1, CATES, (count,), generator=generator)], dim=1)
    return items, cates, pairs


def program_inputs(items, cates, pairs):
    """A request as the program's six tensors (B = 1), contiguous."""
    return (items[None].contiguous(), cates[None].contiguous(), torch.tensor([items.shape[0]]),
            pairs[:, 0][None].contiguous(), pairs[:, 1][None].contiguous(), torch.zeros(1, dtype=torch.long))


def timed_rounds(methods: Dict[str, Callable[[], object]], seconds: float, min_samples: int) -> Dict[str, List[float]]:
    """Round-robin calls (ms) until ``min_samples`` rounds and ``seconds`` have passed, at most MAX_SAMPLES."""
    for method in methods.values():  # warm-up: first-call allocations, the C++ op's helper threads
        for _ in range(3):
            method()
    samples: Dict[str, List[float]] = {name: [] for name in methods}
    start = time.perf_counter()
    rounds = 0
    while rounds < MAX_SAMPLES and (rounds < min_samples or time.perf_counter() - start < seconds):
        for name, method in methods.items():
            begin = time.perf_counter()
            method()
            samples[name].append((time.perf_counter() - begin) * 1e3)
        rounds += 1
    return samples


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2", help="C++ op threads to time, comma-separated")
    parser.add_argument("--lengths", default="100,1000", help="history lengths T")
    parser.add_argument("--candidates", default="100,1000", help="candidates per request C")
    parser.add_argument("--seconds", type=float, default=2.0, help="least time per case")
    parser.add_argument("--min-samples", type=int, default=30, help="least calls per method and case")
    parser.add_argument("--no-aoti", action="store_true", help="leave the AOTInductor package out")
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    lengths = [int(t) for t in args.lengths.split(",")]
    counts = [int(c) for c in args.candidates.split(",")]
    if min(threads + lengths + counts + [args.min_samples]) < 1:
        parser.error("--threads, --lengths, --candidates and --min-samples must be >= 1")

    began = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"{machine()}; load average {load()} at {began}")
    torch.manual_seed(0)
    config = ModelConfig(num_goods=GOODS, num_cates=CATES, attention_normalize="softmax",
                         attention_scale=36 ** -0.5)
    model = build_model(config).eval()
    scorer = Scorer(model)  # no max_len: every behaviour of the request is read
    start = time.perf_counter()
    program = export_program(model)
    exported = program.module()
    print(f"torch.export: {time.perf_counter() - start:.1f} s")
    package = None
    folder = tempfile.TemporaryDirectory(prefix="bench_serving-")  # the package file, removed at exit
    if not args.no_aoti:
        start = time.perf_counter()
        package = load_program(save_aoti_package(program, Path(folder.name) / "package.pt2"))
        print(f"AOTInductor compile and package: {time.perf_counter() - start:.1f} s")

    print("\n| threads | T | C | method | p50 ms | p99 ms | calls |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    generator = torch.Generator().manual_seed(1)
    for thread_count in threads:
        configure_threads(thread_count)
        for seq_len in lengths:
            for count in counts:
                items, cates, pairs = request(seq_len, count, generator)
                inputs = program_inputs(items, cates, pairs)
                methods = {"Scorer.score": lambda: scorer.score(items, cates, pairs),
                           "Scorer.check": lambda: scorer.check(items, cates, pairs)}

                def run(fn):
                    def call():
                        with torch.inference_mode():
                            return fn(*inputs)
                    return call

                methods["export"] = run(exported)
                if package is not None:
                    methods["aoti"] = run(package)
                expected = methods["Scorer.score"]()
                for name in ("export", "aoti"):  # the same scores before anything is timed
                    if name in methods:
                        torch.testing.assert_close(methods[name]()[0], expected, atol=1e-5, rtol=0)
                samples = timed_rounds(methods, args.seconds, args.min_samples)
                for name, times in samples.items():
                    p50, p99 = np.percentile(times, [50, 99])
                    print(f"| {thread_count} | {seq_len} | {count} | {name} | {p50:.2f} | {p99:.2f} | {len(times)} |",
                          flush=True)
    print(f"\nload average {load()} at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    folder.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
