"""End to end: training samples/s of ``din train``'s epoch loop against DeepCTR-Torch's ``DIN.fit``, same samples.

    python benchmarks/bench_train.py --data amazon-csv:../shared/data/amazon-tlsan-remap/Beauty --busy 1

Both sides train one epoch, from a fresh model, on the same ``--samples`` training samples (the first of
the training part, histories cut at ``--max-len``, batch ``--batch-size``, widths 18+18): ours is
``din.train.train`` with ``din train``'s default model (DIN, Dice head, softmax attention), its batch
assembly from the columnar data included; the peer is ``deepctr_torch.models.DIN`` with its defaults,
``fit(x, y, batch_size, epochs=1)`` on the padded arrays ``InteractionData.batch`` makes of the same
samples (its own DataLoader and array handling included). The two alternate ``--repeats`` times per
condition (so background load hits both alike), each run in a fresh process as users run them; the table gives the median samples/s of each and their
ratio, quiet and, with ``--busy N``, beside N neighbour processes doing torch work at torch's default
threads, at each of ``--threads`` (default 1 and 2): ours set up as ``din train --threads N`` (the C++
attention op at N threads, torch's own ops at 1), the peer with torch at N threads, its only knob. Both run
with ``din``'s malloc setting (``keep_freed_memory``).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import busy_neighbours, print_result, run_worker, thread_counts  # noqa: E402
from quality_peer import import_peer, peer_columns, peer_inputs  # noqa: E402

from din.cli import _model_config, build_parser, configure_threads, keep_freed_memory  # noqa: E402
from din.data import Split, load_data  # noqa: E402
from din.model import build_model  # noqa: E402
from din.train import TrainConfig, train  # noqa: E402


def _subset(split: Split, samples: int) -> Split:
    """The first ``samples`` training samples, and a token test part (the timing covers training only)."""
    train_part = split.train.subset(np.arange(min(samples, len(split.train))))
    return Split(train_part, split.test.subset(np.arange(min(8, len(split.test)))))


def ours_samples_per_second(split: Split, batch_size: int, max_len: int, seed: int) -> float:
    defaults = build_parser().parse_args(["train"])
    torch.manual_seed(seed)
    model = build_model(_model_config(defaults, "din", defaults.activation, split))
    config = TrainConfig(epochs=1, batch_size=batch_size, max_len=max_len, seed=seed, valid_fraction=0.0,
                         progress=False)
    history = train(model, split, config, log=lambda line: None)
    return history["epochs"][0]["samples_per_second"]


def peer_samples_per_second(split: Split, peer, batch_size: int, max_len: int, seed: int) -> float:
    DIN, SparseFeat, VarLenSparseFeat, _, _ = peer
    x, y, _ = peer_inputs(split.train, max_len)
    columns = peer_columns(SparseFeat, VarLenSparseFeat, split.num_goods, split.num_cates, 18, 18, max_len)
    torch.manual_seed(seed)
    model = DIN(columns, ["goods", "cate"], device="cpu", seed=seed)
    model.compile("adam", "binary_crossentropy")
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # fit prints "Train on N samples"
        model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0, shuffle=True)
    return len(y) / (time.perf_counter() - started)


def run_one(side: str, args, threads: int, repeat: int) -> float:
    """One timed epoch of ``side`` ("ours" or "peer") in a fresh process, as users run one training per
    process: run in one process one after the other, each side inherited the other's allocator state and
    thread pools (ours ran 23k samples/s on MovieLens after a peer run, 27-29k alone)."""
    return run_worker([sys.executable, str(Path(__file__).resolve()), "--worker", side, "--data", args.data,
                       "--samples", str(args.samples), "--max-len", str(args.max_len), "--batch-size",
                       str(args.batch_size), "--threads", str(threads), "--seed", str(repeat)], side)


def worker(args) -> int:
    """``--worker ours|peer``: one epoch in this process, its samples/s on stdout."""
    keep_freed_memory()  # as the din CLI does, for both sides
    split = _subset(load_data(args.data, max_len=args.max_len, seed=0), args.samples)
    threads = int(args.threads)
    if args.worker == "ours":
        configure_threads(threads)
        rate = ours_samples_per_second(split, args.batch_size, args.max_len, args.seed)
    else:
        torch.set_num_threads(threads)
        rate = peer_samples_per_second(split, import_peer(), args.batch_size, args.max_len, args.seed)
    print_result(rate)
    return 0


def measure(args, threads: int) -> Dict[str, List[float]]:
    """Ours with ``din train --threads N``'s set-up (``configure_threads``), the peer with torch at N threads
    (its only knob), alternating, each run in its own process."""
    runs: Dict[str, List[float]] = {"ours": [], "peer": []}
    for repeat in range(args.repeats):
        for side in ("ours", "peer"):
            runs[side].append(run_one(side, args, threads, repeat))
        print(f"  {threads} thread(s), repeat {repeat + 1}: ours {runs['ours'][-1]:,.0f}, "
              f"peer {runs['peer'][-1]:,.0f} samples/s", file=sys.stderr, flush=True)
    return runs


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="movielens", help="a data spec as for 'din train' (default movielens)")
    parser.add_argument("--samples", type=int, default=20_000, help="training samples per timed epoch")
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="1,2",
                        help="comma-separated thread counts N (default 1,2): ours as 'din train --threads N' "
                             "(the attention op at N, torch at 1), the peer with torch at N")
    parser.add_argument("--busy", type=int, default=0, help="also time beside N neighbour processes")
    parser.add_argument("--worker", choices=("ours", "peer"), help=argparse.SUPPRESS)  # one run (run_one)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    for name in ("samples", "max_len", "batch_size", "repeats"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    if args.busy < 0:
        parser.error("--busy must be >= 0")
    try:
        counts = thread_counts(args.threads)
    except ValueError as error:
        parser.error(str(error))
    try:
        import_peer()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    samples = len(_subset(load_data(args.data, max_len=args.max_len, seed=0), args.samples).train)
    results = {}
    for condition, neighbours in (("quiet", 0), (f"{args.busy} busy neighbour(s)", args.busy)):
        if condition != "quiet" and not args.busy:
            continue
        with busy_neighbours(neighbours):
            for threads in counts:
                print(f"{condition}:", file=sys.stderr)
                results[condition, threads] = measure(args, threads)
    print(f"{args.data}: {samples:,} training samples, batch {args.batch_size}, histories cut at "
          f"{args.max_len}; one epoch from a fresh model, each run in its own process; median of "
          f"{args.repeats} alternating runs\n")
    print("| condition | threads | din train samples/s | DeepCTR-Torch DIN.fit samples/s | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for (condition, threads), runs in results.items():
        ours, theirs = statistics.median(runs["ours"]), statistics.median(runs["peer"])
        print(f"| {condition} | {threads} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
