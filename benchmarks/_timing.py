"""What the benchmark scripts share: the device, a synchronised clock, and the interleaved ratio table.

The table interleaves the providers round-robin, so that background load on a shared machine hits all of
them alike, and reports each provider's median (min-max in brackets) and every baseline's time over
din_kernels' time, all from the same run.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def time_ms(step: Callable[[], object]) -> float:
    synchronize()
    start = time.perf_counter()
    step()
    synchronize()
    return (time.perf_counter() - start) * 1e3


def describe_machine() -> str:
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    return f"device {DEVICE} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads"


def ratio_table_header(providers: Sequence[str]) -> List[str]:
    """The two header lines of a table whose rows come from :func:`ratio_row`."""
    header = ("| case | mode | " + " | ".join(f"{p} ms" for p in providers) + " | "
              + " | ".join(f"{p} / din_kernels" for p in providers if p != "din_kernels") + " |")
    return [header, "|" + " --- |" * (header.count("|") - 1)]


def interleaved_samples(steps: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, List[float]]:
    """``repeats`` timings (ms) of every step, taken round-robin across the providers."""
    samples: Dict[str, List[float]] = {provider: [] for provider in steps}
    for _ in range(repeats):
        for provider, step in steps.items():
            samples[provider].append(time_ms(step))
    return samples


def ratio_row(case: str, mode: str, samples: Dict[str, List[float]], digits: int = 1) -> str:
    """One table row: median [min-max] per provider, then each baseline's median over din_kernels'."""
    median = {provider: statistics.median(times) for provider, times in samples.items()}
    cells = [f"{median[p]:.{digits}f} [{min(times):.{digits}f}-{max(times):.{digits}f}]"
             for p, times in samples.items()]
    ratios = [f"{median[p] / median['din_kernels']:.2f}x" for p in samples if p != "din_kernels"]
    return f"| {case} | {mode} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |"
