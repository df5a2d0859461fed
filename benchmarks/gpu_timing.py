"""The attention on a GPU, forward and backward timed apart, each next to the floors that bound it.

    python benchmarks/gpu_timing.py [--case 2048x200x64:full] [--precisions fp32,tf32,bf16] [--providers ...]

Providers: ``eager`` (``reference.din_attention``), ``compiled`` (``torch.compile`` of it, compiled and
warmed up outside the timing) and ``din_kernels`` (the public op: the Triton kernels on CUDA), in fp32 with
TF32 off (torch's default), fp32 with TF32 allowed (``torch.backends.cuda.matmul.allow_tf32``, for every
provider) and bf16 inputs. Forward: under ``torch.no_grad``; backward: ``torch.autograd.grad`` of one
retained forward, for query, keys and every weight. Timing: ``triton.testing.do_bench`` (CUDA events, the
L2 flushed between calls, median) on CUDA; on CPU a synchronised wall clock (a dry run of this script: the
floors are an H200's and mean nothing there). Floors: ``benchmarks/roofline.py`` (bytes over 4.3 TB/s,
FLOPs in the kernels' padded tiles over the precision's peak, the sigmoids over the SFUs; the backward's
adds the bytes its launcher's reductions move after the kernel, ``roofline.reduction_bytes``, as the timed
call runs them); "of floor" is the bounding floor over the measured time (1.0: at the floor). The issue's
GPU targets: forward+backward at least 5x eager and 2x ``torch.compile``, at least 50% of the floor.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import din_kernels as dk  # noqa: E402
from din_kernels import reference  # noqa: E402

import roofline  # noqa: E402
from bench_attention import HIDDEN, Case, Problem  # noqa: E402

PROVIDERS = ("eager", "compiled", "din_kernels")
PRECISIONS = ("fp32", "tf32", "bf16")


def bench_ms(step: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``step``: do_bench (CUDA events) on CUDA, a synchronised clock elsewhere."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median"))
    step()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


@contextlib.contextmanager
def tf32(allowed: bool):
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _cast(problem: Problem, dtype: torch.dtype) -> Problem:
    if dtype == torch.float32:
        return problem
    cast = Problem.__new__(Problem)
    cast.case, cast.lengths = problem.case, problem.lengths
    cast.query = problem.query.detach().to(dtype).requires_grad_()
    cast.keys = problem.keys.detach().to(dtype).requires_grad_()
    cast.weights = [w.detach().to(dtype).requires_grad_() for w in problem.weights]
    cast.grad_out = problem.grad_out.to(dtype)
    return cast


def steps(provider: str, p: Problem):
    """(forward step, backward step) of ``provider`` on problem ``p``, warmed up."""
    fn = {"eager": reference.din_attention, "din_kernels": dk.din_attention}.get(provider)
    if provider == "compiled":
        fn = torch.compile(reference.din_attention, dynamic=False)
    params = [p.query, p.keys] + p.weights

    def forward():
        with torch.no_grad():
            fn(p.query, p.keys, p.lengths, p.weights)

    out = fn(p.query, p.keys, p.lengths, p.weights)  # one retained graph for the backward's timing

    def backward():
        torch.autograd.grad(out, params, p.grad_out, retain_graph=True)

    for _ in range(2):
        forward()
        backward()
    return forward, backward


def measure(case: Case, precisions: Sequence[str], providers: Sequence[str],
            repeats: int) -> List[Dict[str, object]]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = Problem(case, device=device)
    fill = float(base.lengths.sum()) / (case.batch * case.seq_len)  # the valid share the floors count
    rows = []
    for precision in precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        problem = _cast(base, dtype)
        floors = {kind: roofline.estimate(case.batch, case.seq_len, case.dim, HIDDEN, fill, precision,
                                          backward=kind == "backward").floors_us()
                  for kind in ("forward", "backward")}
        # the backward's reductions after its kernel (memory-bound, run after it): their floor adds
        reductions_ms = roofline.reduction_bytes(case.batch, case.dim, HIDDEN)["now"] / roofline.BANDWIDTH * 1e3
        with tf32(precision == "tf32"):
            for provider in providers:
                forward, backward = steps(provider, problem)
                row = {"precision": precision, "provider": provider,
                       "forward_ms": bench_ms(forward, device, repeats),
                       "backward_ms": bench_ms(backward, device, repeats)}
                for kind in ("forward", "backward"):
                    bound = max(floors[kind].values()) / 1e3  # ms
                    bound += reductions_ms if kind == "backward" else 0.0
                    row[f"{kind}_floor_ms"] = bound
                    row[f"{kind}_of_floor"] = bound / row[f"{kind}_ms"]
                rows.append(row)
                print(f"  {precision} {provider}: forward {row['forward_ms']:.4f} ms, backward "
                      f"{row['backward_ms']:.4f} ms", file=sys.stderr, flush=True)
    return rows


def table(rows: List[Dict[str, object]]) -> List[str]:
    lines = ["| precision | provider | forward ms | of floor | backward ms | of floor | fwd+bwd ms | eager / it | "
             "compiled / it |", "|" + " --- |" * 9]
    for row in rows:
        same = {r["provider"]: r for r in rows if r["precision"] == row["precision"]}
        total = row["forward_ms"] + row["backward_ms"]
        ratio = {name: (same[name]["forward_ms"] + same[name]["backward_ms"]) / total if name in same else None
                 for name in ("eager", "compiled")}
        lines.append(f"| {row['precision']} | {row['provider']} | {row['forward_ms']:.4f} | "
                     f"{row['forward_of_floor']:.0%} | {row['backward_ms']:.4f} | {row['backward_of_floor']:.0%} | "
                     f"{total:.4f} | " + " | ".join("-" if v is None else f"{v:.2f}x" for v in ratio.values()) + " |")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="2048x200x64:full", help="BxTxD[:lengths] as bench_attention's cases")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--repeats", type=int, default=5, help="CPU dry run only (do_bench decides on CUDA)")
    args = parser.parse_args(argv)
    case = Case.parse(args.case)
    precisions = [p for p in args.precisions.split(",") if p]
    providers = [p for p in args.providers.split(",") if p]
    for name, chosen, allowed in (("precision", precisions, PRECISIONS), ("provider", providers, PROVIDERS)):
        unknown = [c for c in chosen if c not in allowed]
        if unknown or not chosen:
            parser.error(f"--{name}s must be a comma list of {', '.join(allowed)}; got {unknown or 'nothing'}")
    rows = measure(case, precisions, providers, args.repeats)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run: floors are an H200's)"
    print(f"{case.name}, hidden {HIDDEN}, {device}; floors: benchmarks/roofline.py over the valid positions\n")
    print("\n".join(table(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
