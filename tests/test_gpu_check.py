"""benchmarks/gpu_check.sh fits a device run: at most 8 result files, step timeouts within 8 minutes, and a
fast, clear stop where there is no CUDA (this machine)."""
import os
import subprocess
import sys
from pathlib import Path


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def test_plan_fits_a_device_run():
    plan = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, GPU_CHECK_PLAN="1"))
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    files = {name for line in steps for name in line.split("files:")[1].split()}
    seconds = sum(int(line.split()[2].rstrip("s")) for line in steps)
    assert len(files) <= 8, files
    assert seconds <= 480 and lines[-1] == f"total {seconds}s"


def test_without_cuda_it_stops_at_once(tmp_path):
    """No CUDA device visible (none here; hidden on a GPU machine): exit 2 at once, nothing written."""
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"),
                                     CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr
    assert not (tmp_path / "out").exists()
