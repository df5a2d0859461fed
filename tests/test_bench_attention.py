"""benchmarks/bench_attention.py's loaded table over several rounds (``--rounds``): each round a quiet and a
loaded phase, summarised per case and mode (slowdown medians and ranges, the slowdowns of the rounds' samples
pooled, the rounds where din_kernels slowed no more than a baseline, the loaded speed ratios), and its
arguments checked."""
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"


@pytest.fixture(scope="module")
def bench_attention():
    spec = importlib.util.spec_from_file_location("bench_attention", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_attention"] = module  # (its dataclasses look their module up there)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_attention", None)


def test_rounds_summarise_quiet_and_loaded_phases(bench_attention, monkeypatch, capsys):
    monkeypatch.setenv("DIN_BENCH_CASES", "8x5x4")
    bench_attention.main(["--table", "--busy", "1", "--rounds", "2", "--repeats", "1",
                          "--providers", "din_kernels,reference"])
    captured = capsys.readouterr()
    assert captured.err.count("round ") == 2
    rows = [line.split("|")[1:-1] for line in captured.out.splitlines() if line.startswith("| 1 ") or
            line.startswith("| 2 ")]
    assert len(rows) == 4  # threads 1 and 2 x forward, forward+backward
    for threads, case, mode, ours, theirs, ours_pooled, theirs_pooled, no_worse, loaded_ratio in rows:
        assert case.strip() == "B8-T5-D4-random" and mode.strip() in ("forward", "forward+backward")
        for cell in (ours, theirs, loaded_ratio):
            median, spread = cell.split("x [")
            low, high = (float(v) for v in spread.rstrip("] ").split("-"))
            assert 0 < low <= float(median) <= high
        for cell in (ours_pooled, theirs_pooled):
            assert float(cell.strip().rstrip("x")) > 0
        assert no_worse.strip() in ("0 of 2", "1 of 2", "2 of 2")


@pytest.mark.parametrize("argv,message", [
    (["--table", "--rounds", "2"], "--rounds needs --busy"),
    (["--table", "--busy", "1", "--rounds", "0"], "--rounds must be >= 1"),
    (["--table", "--repeats", "0"], "--repeats must be >= 1"),
])
def test_bad_arguments_are_refused(bench_attention, argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_attention.main(argv + ["--providers", "din_kernels,reference"])
    assert message in capsys.readouterr().err


def test_pooled_slowdown_is_the_median_of_every_rounds_samples(bench_attention, monkeypatch):
    # two rounds of fixed samples: din_kernels quiet [1, 1, 1] / [1, 1, 3], loaded [2, 2, 9] / [3, 3, 3]
    # -> pooled 3 / 1 = 3.00x (the per-round medians' ratios are 2.00x and 3.00x); reference 2.00x throughout
    key = (2, "B8-T5-D4-random", "forward")
    rounds = iter([
        ({key: {"din_kernels": [1.0, 1.0, 1.0], "reference": [2.0, 2.0, 2.0]}},
         {key: {"din_kernels": [2.0, 2.0, 9.0], "reference": [4.0, 4.0, 4.0]}}),
        ({key: {"din_kernels": [1.0, 1.0, 3.0], "reference": [2.0, 2.0, 2.0]}},
         {key: {"din_kernels": [3.0, 3.0, 3.0], "reference": [4.0, 4.0, 4.0]}}),
    ])
    monkeypatch.setattr(bench_attention, "_busy_round", lambda repeats, providers, busy: next(rounds))
    table = bench_attention.busy_table(3, ["din_kernels", "reference"], 1, rounds=2)
    row = [cell.strip() for cell in table.splitlines()[-1].split("|")[1:-1]]
    assert row[3:] == ["2.50x [2.00-3.00]", "2.00x [2.00-2.00]", "3.00x", "2.00x", "1 of 2", "1.67x [1.33-2.00]"]
