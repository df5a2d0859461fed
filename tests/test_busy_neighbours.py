"""benchmarks/_timing.busy_neighbours: neighbour processes start, work, and are always stopped."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _timing import busy_neighbours  # noqa: E402


def test_neighbours_run_inside_the_block_and_stop_after_it(monkeypatch):
    import subprocess

    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        started.append(proc)
        return proc

    monkeypatch.setattr(subprocess, "Popen", popen)
    with busy_neighbours(2, seconds=60):
        assert len(started) == 2 and all(proc.poll() is None for proc in started)  # alive, working
    assert all(proc.poll() is not None for proc in started)  # stopped at the end


def test_neighbours_stop_when_the_block_raises():
    with pytest.raises(RuntimeError):
        with busy_neighbours(1, seconds=60):
            raise RuntimeError("the timing failed")


def test_no_neighbours_and_bad_counts():
    with busy_neighbours(0):
        pass
    with pytest.raises(ValueError, match="count"):
        with busy_neighbours(-1):
            pass
