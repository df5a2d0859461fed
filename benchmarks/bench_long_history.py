"""Lifelong histories: time and peak memory of the local activation unit against the history length T (one
user, B=1, every history full), forward (serving) and forward + backward (training), on the default CPU path.

    python benchmarks/bench_long_history.py [--lengths 1000,10000,100000] [--threads N] [--backend cpp]

Each T runs in a fresh process, so that its peak resident memory (``ru_maxrss``) is its own: reported is the
growth of the peak over the process's peak once the model and the inputs exist (keys, and for training the
keys' gradient, are the inputs' share: listed beside it). Time: the median of 5 calls after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

ONE = r"""
import json, resource, statistics, sys, time
import torch
sys.path.insert(0, {root!r})
import din_kernels as dk
seq_len, train, threads, backend = {seq_len}, {train}, {threads}, {backend!r}
torch.set_num_threads(threads); dk.set_cpu_threads(threads); dk.set_backend(backend)
dim = 36
unit = dk.LocalActivationUnit(dim, (80, 40), normalize="softmax").requires_grad_(train)
query = torch.randn(1, dim, requires_grad=train)
keys = torch.randn(1, seq_len, dim, requires_grad=train)
lengths = torch.tensor([seq_len])
grad = torch.ones(1, dim)
if train:
    keys.grad = torch.zeros_like(keys)  # the keys' gradient is an input-sized tensor of the caller's
def step():
    with torch.set_grad_enabled(train):
        out = unit(query, keys, lengths)
        if train:
            out.backward(grad)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
step()
times = []
for _ in range(5):
    start = time.perf_counter(); step(); times.append(time.perf_counter() - start)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(ms=statistics.median(times) * 1e3, growth_mb=(after - before) / 1024,
                      inputs_mb=keys.numel() * 4 * (2 if train else 1) / 2 ** 20,
                      path=dk.explain(query.detach(), keys.detach(), lengths, unit.weights(),
                                      normalize="softmax").split(":")[0])))
"""


def measure(seq_len: int, train: bool, threads: int, backend: str) -> dict:
    code = ONE.format(root=str(Path(__file__).resolve().parents[1]), seq_len=seq_len, train=train,
                      threads=threads, backend=backend)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="1000,10000,100000")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="cpp", choices=("cpp", "torch"))
    args = parser.parse_args(argv)
    print(f"B=1, D=36, hidden (80, 40), softmax, backend {args.backend}, {args.threads} threads")
    print("| T | mode | path | ms | ms per 1000 positions | peak growth MB | inputs MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for seq_len in (int(t) for t in args.lengths.split(",")):
        for train in (False, True):
            r = measure(seq_len, train, args.threads, args.backend)
            mode = "forward+backward" if train else "forward"
            print(f"| {seq_len:,} | {mode} | {r['path']} | {r['ms']:.2f} | {r['ms'] / seq_len * 1e3:.3f} | "
                  f"{r['growth_mb']:.1f} | {r['inputs_mb']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
