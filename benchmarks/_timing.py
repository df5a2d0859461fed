"""What the benchmark scripts share: the device, a synchronised clock, the interleaved ratio table, busy
neighbour processes for timings on a loaded machine, worker processes that report one figure, and the peer's
quiet import.

The table interleaves the providers round-robin, so that background load on a shared machine hits all of
them alike, and reports each provider's median (min-max in brackets) and every baseline's time over
din_kernels' time, all from the same run.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import statistics
import subprocess
import sys
import threading
import time
import unittest.mock
from types import ModuleType
from typing import Callable, Dict, Iterator, List, Sequence

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def synced(step: Callable[[], object]) -> Callable[[], None]:
    """``step`` followed by a device synchronize: pytest-benchmark stops its clock when the call returns, which
    on CUDA is before the kernels have run."""
    def call() -> None:
        step()
        synchronize()
    return call


def time_ms(step: Callable[[], object]) -> float:
    synchronize()
    start = time.perf_counter()
    step()
    synchronize()
    return (time.perf_counter() - start) * 1e3


def thread_counts(text: str) -> List[int]:
    """``--threads`` of the benchmarks that time several thread counts: "1,2" -> [1, 2]; ValueError (its message
    for ``parser.error``) on anything but positive integers."""
    try:
        counts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--threads: expected integers like '1,2', got {text!r}") from None
    if not counts or min(counts) <= 0:
        raise ValueError("--threads needs positive integers")
    return counts


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


# A neighbour: torch matmuls at torch's default threads, as a data-loader worker or another job would run.
_NEIGHBOUR = """
import time, torch
a = torch.randn(768, 768)
end = time.monotonic() + {seconds}
while time.monotonic() < end:
    a = torch.tanh(a @ a)
"""


@contextlib.contextmanager
def busy_neighbours(count: int, seconds: float = 1800.0) -> Iterator[None]:
    """``count`` neighbour processes doing torch work beside the block; each stops by itself after
    ``seconds`` (a bound, in case this process dies) and all are stopped when the block ends."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    procs = [subprocess.Popen([sys.executable, "-c", _NEIGHBOUR.format(seconds=float(seconds))],
                              env=default_threads_env())
             for _ in range(count)]
    try:
        time.sleep(3.0 if count else 0.0)  # let them import torch and start working
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def default_threads_env() -> Dict[str, str]:
    """This process's environment without the thread-count variables, so that a child process starts at
    torch's default threads (as a user's job or neighbour would) unless it sets its own."""
    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


# A worker's figure goes on a line of its own with this prefix: a library the worker imports may print to
# stdout too, even after the figure (deepctr_torch's version check prints from a thread).
RESULT_PREFIX = "result: "


def print_result(value: float) -> None:
    """A worker process's one figure, for :func:`run_worker`."""
    print(f"{RESULT_PREFIX}{value!r}", flush=True)


def run_worker(command: Sequence[str], what: str) -> float:
    """Runs ``command`` (a worker process at torch's default threads) and returns the figure it printed with
    :func:`print_result`; RuntimeError with the end of its stderr (or stdout) if it failed or printed none."""
    result = subprocess.run(list(command), capture_output=True, text=True, env=default_threads_env())
    if result.returncode != 0:
        raise RuntimeError(f"the {what} run failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    figures = [line[len(RESULT_PREFIX):] for line in result.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if not figures:
        raise RuntimeError(f"the {what} run printed no {RESULT_PREFIX!r} line; its stdout ended:\n"
                           f"{result.stdout[-2000:]}")
    return float(figures[-1])


def import_deepctr(module: str = "deepctr_torch") -> ModuleType:
    """``importlib.import_module(module)`` for a deepctr_torch module, without its import-time version check's
    network request or stdout line.

    deepctr_torch 0.3.0 starts a thread at import that asks PyPI (``requests.get``, no timeout) for a newer
    release and, when it cannot reach it (offline, or a CI machine that reaches only the package index
    through pip), prints a line to stdout, possibly after the caller's own table or figure, and a request in
    flight beside a timing is noise. The first import runs with ``requests.get`` failing at once and stdout
    sent to stderr, and the check's thread is joined inside. ImportError propagates.
    """
    if "deepctr_torch" in sys.modules:
        return importlib.import_module(module)
    import requests  # deepctr_torch's own dependency (ImportError as for deepctr_torch itself)

    def no_request(url, *args, **kwargs):
        raise requests.ConnectionError(f"din-kernels' benchmarks skip deepctr_torch's version check ({url})")

    before = set(threading.enumerate())
    with contextlib.redirect_stdout(sys.stderr), unittest.mock.patch.object(requests, "get", no_request):
        try:
            imported = importlib.import_module(module)
        finally:
            for thread in set(threading.enumerate()) - before:
                thread.join(timeout=5.0)
    return imported


def deepctr_available() -> bool:
    try:
        import_deepctr()
    except ImportError:
        return False
    return True
