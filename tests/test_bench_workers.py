"""benchmarks/_timing's worker protocol and the peer's quiet import: a benchmark's figures and tables survive a
library that prints to stdout (deepctr_torch's version check does, from a thread, when PyPI is unreachable:
the CI failure that bench_head's worker once died of)."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from _timing import RESULT_PREFIX, default_threads_env, run_worker  # noqa: E402


def _python(code: str):
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_the_figure_survives_output_before_and_after_it():
    code = f"""
        import sys
        sys.path.insert(0, {str(BENCHMARKS)!r})
        from _timing import print_result
        print("Please check the latest version manually")
        print_result(12.25)
        print("Please check the latest version manually on https://pypi.org/project/deepctr-torch/#history")
    """
    assert run_worker(_python(code), "noisy") == 12.25


def test_a_worker_without_a_figure_or_that_fails_is_named():
    with pytest.raises(RuntimeError, match=r"(?s)the silent run printed no 'result: ' line.*just chatter"):
        run_worker(_python("print('just chatter')"), "silent")
    with pytest.raises(RuntimeError, match=r"(?s)the broken run failed \(exit 3\).*went wrong"):
        run_worker(_python("import sys; sys.stderr.write('went wrong'); sys.exit(3)"), "broken")
    assert RESULT_PREFIX.endswith(": ")


def test_workers_start_at_torch_default_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    env = default_threads_env()
    assert "OMP_NUM_THREADS" not in env and "MKL_NUM_THREADS" not in env and env["PATH"]


def test_deepctr_version_check_makes_no_request_and_stays_off_stdout():
    """deepctr_torch's import-time check would ask PyPI (here a ``requests`` whose get hangs, as a network that
    drops packets would): the benchmarks' import makes no request, and the check's line goes to stderr while
    stdout carries only what the script printed."""
    pytest.importorskip("deepctr_torch")
    code = f"""
        import sys, time, types
        requests = types.ModuleType("requests")
        requests.codes = types.SimpleNamespace(ok=200)
        requests.ConnectionError = type("ConnectionError", (OSError,), {{}})
        def get(url):
            sys.stderr.write("REQUESTED " + url)
            time.sleep(60)
        requests.get = get
        sys.modules["requests"] = requests
        sys.path.insert(0, {str(BENCHMARKS)!r})
        from _timing import import_deepctr
        layer = import_deepctr("deepctr_torch.layers.sequence").AttentionSequencePoolingLayer
        print("table")
    """
    result = subprocess.run(_python(code), capture_output=True, text=True, timeout=50)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "table\n"
    assert "check the latest version manually" in result.stderr and "REQUESTED" not in result.stderr
