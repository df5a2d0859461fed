"""Local activation unit: din_kernels against the eager reference, torch.compile(reference) and DeepCTR-Torch.

    .venv/bin/python -m pytest -q benchmarks/bench_attention.py          # pytest-benchmark, all providers
    .venv/bin/python benchmarks/bench_attention.py --table [--repeats 7]  # the ratio table of RESULTS.md, section 1
    .venv/bin/python benchmarks/bench_attention.py --table --busy 1 [--rounds 5]  # quiet against loaded (section 8)

Problem: hidden (80, 40) sigmoid, form "concat", normalize "none" (DeepCTR's default), fp32, lengths uniform
in [1, T] ("random": din_kernels skips padding), all T ("full", its worst case), or "skewed": 1 + an
exponential draw of mean T/4, cut at T (at T=50 the distribution has mean 12.8, median 9, like Amazon
Beauty's histories cut at 50: mean 12.2, median 8). B=256, T=50 is a DIN training call (``din train``
defaults).
Providers, all computing the same function from the same weights:
  din_kernels  the public ``din_kernels.din_attention`` (validation included): the C++ op on CPU (where
               it is built), the Triton kernels on CUDA
  composite    the same under ``set_backend("torch")``: the Python composite path (the CPU fallback)
  reference    ``din_kernels.reference.din_attention`` in eager mode (the [B, T, 4D] formulation)
  compiled     ``torch.compile(reference.din_attention)``; compiled and warmed up outside the timed region
  deepctr      ``deepctr_torch.layers.sequence.AttentionSequencePoolingLayer`` with the same weights
Modes: "forward" (under torch.no_grad) and "forward+backward" (``torch.autograd.grad`` of the output with a
random cotangent, for query, keys and every weight).

Peak extra memory (``extra_info['peak_extra_mb']``): bytes allocated above what was live before one call,
at its highest point, outputs and gradients included. CUDA: ``torch.cuda.max_memory_allocated``. CPU: the
profiler's allocator events (``profile_memory=True``): every torch tensor allocation and free in order,
their running sum, its maximum. It counts tensors only (not MKL/oneDNN scratch, not Python objects), the
same way for every provider.

Cases: on CPU a subset that runs in a few minutes; with CUDA the grid B in {256, 1024, 4096} x T in {20,
100, 500} x D in {36, 64}. ``DIN_BENCH_CASES="2048x200x64,1024x100x36:full"`` overrides either.
On CUDA the forward's bandwidth bound (bytes of keys + query + output over the measured device-to-device
copy bandwidth) is printed and stored in ``extra_info``.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import din_kernels as dk  # noqa: E402
from din_kernels import reference  # noqa: E402
from din_kernels.testing import cpu_extension, interpreter_enabled  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (DEVICE, busy_neighbours, deepctr_available, describe_machine, import_deepctr,  # noqa: E402
                     interleaved_samples, ratio_row, ratio_table_header, synced, synchronize, time_ms)

HIDDEN = (80, 40)
PROVIDERS = ("din_kernels", "composite", "reference", "compiled", "deepctr")
MODES = ("forward", "forward+backward")
CPU_CASES = ["1024x100x36", "1024x100x36:full", "256x500x36", "4096x20x64", "256x50x36:skewed", "256x50x36:full"]
GPU_CASES = [f"{b}x{t}x{d}" for b, t, d in itertools.product((256, 1024, 4096), (20, 100, 500), (36, 64))]

if DEVICE.type == "cpu" and interpreter_enabled():
    # The Triton interpreter (set by tests/conftest.py when tests are collected too) is a correctness tool,
    # ~26 ms per program instance: benchmark what CPU users run, the C++ op (the composite path without it).
    dk.set_backend("cpp" if cpu_extension.available() else "torch")


@dataclass(frozen=True)
class Case:
    batch: int
    seq_len: int
    dim: int
    lengths: str = "random"

    @classmethod
    def parse(cls, text: str) -> "Case":
        shape, _, lengths = text.partition(":")
        batch, seq_len, dim = (int(x) for x in shape.split("x"))
        return cls(batch, seq_len, dim, lengths or "random")

    @property
    def name(self) -> str:
        return f"B{self.batch}-T{self.seq_len}-D{self.dim}-{self.lengths}"


def cases() -> List[Case]:
    text = os.environ.get("DIN_BENCH_CASES")
    names = text.split(",") if text else (GPU_CASES if DEVICE.type == "cuda" else CPU_CASES)
    return [Case.parse(name.strip()) for name in names if name.strip()]


class Problem:
    """Inputs, weights (nn.Linear initialisation, seeded) and a cotangent for one case."""

    def __init__(self, case: Case, device: torch.device = DEVICE):
        generator = torch.Generator().manual_seed(0)
        batch, seq_len, dim = case.batch, case.seq_len, case.dim
        self.case = case
        self.query = torch.randn(batch, dim, generator=generator).to(device).requires_grad_()
        self.keys = torch.randn(batch, seq_len, dim, generator=generator).to(device).requires_grad_()
        if case.lengths == "full":
            lengths = torch.full((batch,), seq_len)
        elif case.lengths == "skewed":
            draws = torch.empty(batch).exponential_(4.0 / seq_len, generator=generator)  # mean T/4
            lengths = (1 + draws.floor().long()).clamp(max=seq_len)
        elif case.lengths == "random":
            lengths = torch.randint(1, seq_len + 1, (batch,), generator=generator)
        else:
            raise ValueError(f"lengths must be random, full or skewed, got {case.lengths!r}")
        self.lengths = lengths.to(device)
        widths = (4 * dim,) + HIDDEN + (1,)
        weights = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            bound = 1.0 / math.sqrt(fan_in)
            weights.append((torch.rand(fan_out, fan_in, generator=generator) * 2 - 1) * bound)
            weights.append((torch.rand(fan_out, generator=generator) * 2 - 1) * bound)
        self.weights = [w.to(device).requires_grad_() for w in weights]
        self.grad_out = torch.randn(batch, dim, generator=generator).to(device)


def _deepctr_layer(problem: Problem):
    AttentionSequencePoolingLayer = import_deepctr("deepctr_torch.layers.sequence").AttentionSequencePoolingLayer

    layer = AttentionSequencePoolingLayer(att_hidden_units=HIDDEN, att_activation="sigmoid",
                                          embedding_dim=problem.case.dim).to(problem.query.device)
    linears = list(layer.local_att.dnn.linears) + [layer.local_att.dense]
    with torch.no_grad():
        for index, linear in enumerate(linears):
            linear.weight.copy_(problem.weights[2 * index])
            linear.bias.copy_(problem.weights[2 * index + 1])
    return layer


def _on_backend(name: str, fn: Callable) -> Callable:
    """``fn`` run with ``dk.set_backend(name)``, the previous backend restored after each call."""
    def call(*args, **kwargs):
        previous = dk.get_backend()
        dk.set_backend(name)
        try:
            return fn(*args, **kwargs)
        finally:
            dk.set_backend(previous)
    return call


def make_step(provider: str, mode: str, problem: Problem) -> Callable[[], None]:
    """One call of ``provider`` in ``mode``, ready to time (compiled and warmed up already)."""
    p = problem
    if provider == "deepctr":
        layer = _deepctr_layer(p)
        query, lengths = p.query[:, None, :], p.lengths[:, None]
        params = [p.query, p.keys] + list(layer.parameters())

        def forward():
            return layer(query, p.keys, lengths)[:, 0]
    else:
        params = [p.query, p.keys] + p.weights
        if provider == "din_kernels":
            fn = dk.din_attention
        elif provider == "composite":
            fn = dk.din_attention  # the whole step runs on backend "torch" (below)
        elif provider == "reference":
            fn = reference.din_attention
        elif provider == "compiled":
            fn = torch.compile(reference.din_attention, dynamic=False)
        else:
            raise ValueError(f"unknown provider {provider!r}")

        def forward():
            return fn(p.query, p.keys, p.lengths, p.weights)

    if mode == "forward":
        def step():
            with torch.no_grad():
                forward()
    else:
        def step():
            torch.autograd.grad(forward(), params, p.grad_out)
    if provider == "composite":  # forward and backward alike (the backward picks its launchers when it runs)
        step = _on_backend("torch", step)
    for _ in range(2):  # compile (for "compiled"), warm caches and allocators
        step()
    return step


def peak_extra_mb(step: Callable[[], None]) -> float:
    """Peak bytes allocated above the live set before the call (see the module docstring), in MB."""
    if DEVICE.type == "cuda":
        synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # The chrome trace keeps every allocation and free as its own "[memory]" event, in order (the
    # FunctionEvent list folds them into the ops that made them).
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as handle:
            trace = json.load(handle)["traceEvents"]
    events = [e for e in trace if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    events.sort(key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
    running = peak = 0
    for event in events:
        running += event["args"]["Bytes"]
        peak = max(peak, running)
    return peak / 2 ** 20


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), from a 1 GiB copy."""
    src = torch.empty(2 ** 28, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = [time_ms(lambda: dst.copy_(src)) for _ in range(10)]
    return 2 * src.numel() * 4 / (statistics.median(times) / 1e3) / 1e9


def forward_bytes(problem: "Problem") -> int:
    """What the forward must move at least: the valid keys (padding is never read) and the query read, the
    output written (fp32)."""
    case = problem.case
    return 4 * (int(problem.lengths.sum()) * case.dim + 2 * case.batch * case.dim)


def available(provider: str) -> bool:
    if provider == "composite":
        return DEVICE.type == "cpu"  # the CPU fallback; on CUDA the kernels run
    if provider != "deepctr":
        return True
    return deepctr_available()


# --------------------------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # script mode needs no pytest
    pytest = None

if pytest is not None:
    _problems: Dict[Case, Problem] = {}

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("provider", PROVIDERS)
    @pytest.mark.parametrize("case", cases(), ids=lambda c: c.name)
    def test_attention(benchmark, case, provider, mode):
        if not available(provider):
            pytest.skip("deepctr_torch is not installed")
        problem = _problems.setdefault(case, Problem(case))
        start = time.perf_counter()
        step = make_step(provider, mode, problem)
        benchmark.extra_info.update(
            provider=provider, mode=mode, device=str(DEVICE), threads=torch.get_num_threads(),
            setup_s=round(time.perf_counter() - start, 2), peak_extra_mb=round(peak_extra_mb(step), 2))
        if DEVICE.type == "cuda" and provider == "din_kernels" and mode == "forward":
            bandwidth = copy_bandwidth_gbs()
            bound_ms = forward_bytes(problem) / (bandwidth * 1e9) * 1e3
            benchmark.extra_info.update(copy_bandwidth_gbs=round(bandwidth, 1), bandwidth_bound_ms=bound_ms)
            print(f"\n{case.name}: forward bandwidth bound {bound_ms:.4f} ms at {bandwidth:.0f} GB/s copy")
        benchmark.group = f"{case.name} {mode}"
        benchmark.pedantic(synced(step), setup=synchronize, rounds=5 if DEVICE.type == "cpu" else 50,
                           warmup_rounds=1, iterations=1)
        synchronize()


# --------------------------------------------------------------------------------------------------------
# script mode: the ratio table
# --------------------------------------------------------------------------------------------------------

def table(repeats: int, providers: List[str]) -> str:
    """Median times (providers interleaved round-robin, so background load hits all alike) and ratios."""
    lines = [f"{describe_machine()}, hidden {HIDDEN} sigmoid, fp32, median of {repeats} (min-max in brackets)",
             "", *ratio_table_header(providers)]
    memory_lines = ["", "| case | " + " | ".join(f"{p} peak MB" for p in providers) +
                    " | din_kernels / reference |", "|" + " --- |" * (len(providers) + 2)]
    bandwidth = copy_bandwidth_gbs() if DEVICE.type == "cuda" else None
    for case in cases():
        problem = Problem(case)
        for mode in MODES:
            steps = {p: make_step(p, mode, problem) for p in providers}
            samples = interleaved_samples(steps, repeats)
            lines.append(ratio_row(case.name, mode, samples))
            if mode == "forward+backward":
                peaks = {p: peak_extra_mb(steps[p]) for p in providers}
                ratio = peaks["din_kernels"] / peaks["reference"] if "reference" in peaks else float("nan")
                memory_lines.append(f"| {case.name} | " + " | ".join(f"{peaks[p]:.1f}" for p in providers) +
                                    f" | {ratio:.2f} |")
            if mode == "forward" and bandwidth is not None:
                bound = forward_bytes(problem) / (bandwidth * 1e9) * 1e3
                lines.append(f"|   | bandwidth bound | {bound:.4f} ms at {bandwidth:.0f} GB/s copy: din_kernels at "
                             f"{bound / statistics.median(samples['din_kernels']) * 100:.0f}% |")
            print(lines[-1], flush=True)
            del steps
    return "\n".join(lines + memory_lines)


def _busy_round(repeats: int, providers: List[str], busy: int) -> Tuple[Dict, Dict]:
    """One quiet phase, then one beside ``busy`` neighbour processes, at 1 and 2 threads of ours: the
    samples of each (threads, case, mode) as ``{provider: [ms, ...]}``, quiet and loaded."""
    threads_before = torch.get_num_threads()
    quiet: Dict = {}
    loaded: Dict = {}
    try:
        for phase, store in (("quiet", quiet), ("loaded", loaded)):
            with busy_neighbours(busy if phase == "loaded" else 0):
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    for case in cases():
                        problem = Problem(case)
                        for mode in MODES:
                            steps = {p: make_step(p, mode, problem) for p in providers}
                            store[threads, case.name, mode] = interleaved_samples(steps, repeats)
                            print(f"{phase} {threads} thread(s) {case.name} {mode}", file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(threads_before)
    return quiet, loaded


def busy_table(repeats: int, providers: List[str], busy: int, rounds: int = 1) -> str:
    """Quiet against loaded (``busy`` neighbour processes doing torch work at its default threads), at 1 and 2
    threads of ours: each provider's median, its slowdown under load, and each baseline over din_kernels.
    ``rounds`` > 1 repeats the quiet and the loaded phase that many times and summarises the rounds instead:
    how a neighbour's work lines up with the timed calls changes from one loaded phase to the next (on 2
    cores a 3 ms call's slowdown ranged 1.5-5.5x over five phases), so one phase cannot say whether one
    provider slows more than another. Per provider: the slowdown's median and range over the rounds, and the
    slowdown of all rounds' samples pooled (median loaded over median quiet)."""
    results = []
    for index in range(rounds):
        if rounds > 1:
            print(f"round {index + 1} of {rounds}", file=sys.stderr, flush=True)
        results.append(_busy_round(repeats, providers, busy))
    header = (f"{describe_machine()}; {busy} neighbour process(es) running torch matmuls at torch's default threads "
              f"in the loaded columns; hidden {HIDDEN} sigmoid, fp32, median of {repeats}")
    if rounds == 1:
        quiet, loaded = results[0]
        lines = [header, "",
                 "| threads | case | mode | " + " | ".join(f"{p} ms quiet / loaded (slowdown)" for p in providers) +
                 " | " + " | ".join(f"{p} / din_kernels quiet / loaded" for p in providers if p != "din_kernels") +
                 " |"]
        lines.append("|" + " --- |" * (lines[-1].count("|") - 1))
        for (threads, name, mode), samples in quiet.items():
            q = {p: statistics.median(t) for p, t in samples.items()}
            l = {p: statistics.median(t) for p, t in loaded[threads, name, mode].items()}
            cells = [f"{q[p]:.1f} / {l[p]:.1f} ({l[p] / q[p]:.2f}x)" for p in providers]
            ratios = [f"{q[p] / q['din_kernels']:.2f}x / {l[p] / l['din_kernels']:.2f}x" for p in providers
                      if p != "din_kernels"]
            lines.append(f"| {threads} | {name} | {mode} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
        return "\n".join(lines)
    baselines = [p for p in providers if p != "din_kernels"]
    lines = [header + f", {rounds} rounds of a quiet and a loaded phase", "",
             "| threads | case | mode | " + " | ".join(f"{p} slowdown, median of rounds [min-max]" for p in providers) +
             " | " + " | ".join(f"{p} slowdown, all rounds pooled" for p in providers) +
             " | " + " | ".join(f"din_kernels slowing no more than {p}" for p in baselines) +
             " | " + " | ".join(f"{p} / din_kernels loaded, median [min-max]" for p in baselines) + " |"]
    lines.append("|" + " --- |" * (lines[-1].count("|") - 1))
    def spread(values: List[float]) -> str:
        return f"{statistics.median(values):.2f}x [{min(values):.2f}-{max(values):.2f}]"

    for key in results[0][0]:
        slowdowns = {p: [] for p in providers}
        loaded_ratio = {p: [] for p in baselines}
        for quiet, loaded in results:
            q = {p: statistics.median(t) for p, t in quiet[key].items()}
            l = {p: statistics.median(t) for p, t in loaded[key].items()}
            for p in providers:
                slowdowns[p].append(l[p] / q[p])
            for p in baselines:
                loaded_ratio[p].append(l[p] / l["din_kernels"])
        no_worse = [f"{sum(ours <= theirs for ours, theirs in zip(slowdowns['din_kernels'], slowdowns[p]))} of "
                    f"{rounds}" for p in baselines]
        # every round's samples in one median per phase: a phase holds few samples of a bimodal (stalled or
        # not) call time, so the per-round ratios swing; pooled swings less, but where most of a few rounds'
        # loaded samples stalled it reads the stalled mode (RESULTS.md section 8): hence both columns
        pooled = {p: statistics.median(t for _, loaded in results for t in loaded[key][p]) /
                  statistics.median(t for quiet, _ in results for t in quiet[key][p]) for p in providers}
        threads, name, mode = key
        lines.append(f"| {threads} | {name} | {mode} | " + " | ".join(spread(slowdowns[p]) for p in providers) +
                     " | " + " | ".join(f"{pooled[p]:.2f}x" for p in providers) +
                     " | " + " | ".join(no_worse) + " | " + " | ".join(spread(loaded_ratio[p]) for p in baselines) +
                     " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", action="store_true", help="print the ratio table (markdown)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--busy", type=int, default=0,
                        help="also time beside N neighbour processes doing torch work (stopped at the end), "
                             "at 1 and 2 threads, and print quiet and loaded columns in one table")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --busy: repeat the quiet and the loaded phase N times and summarise the "
                             "slowdowns over the rounds (median, range, all samples pooled, rounds where din_kernels "
                             "slowed no more)")
    args = parser.parse_args(argv)
    if not args.table:
        parser.error("use --table, or run through pytest for pytest-benchmark")
    providers = [p for p in args.providers.split(",") if available(p)]
    if "din_kernels" not in providers:
        parser.error("the providers must include din_kernels")
    if args.busy < 0:
        parser.error("--busy must be >= 0")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.rounds > 1 and not args.busy:
        parser.error("--rounds needs --busy N (it repeats the quiet and the loaded phases)")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    print(busy_table(args.repeats, providers, args.busy, args.rounds) if args.busy else
          table(args.repeats, providers))


if __name__ == "__main__":
    main()
