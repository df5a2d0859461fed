"""benchmarks/gpu_timing.py (a step of gpu_check.sh) runs end to end as a CPU dry run: forward and backward
timed apart per provider and precision, each next to its roofline floor, and rejects unknown choices."""
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_timing.py"


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_dry_run_prints_both_directions_against_the_floors():
    result = _run("--case", "16x12x8:full", "--providers", "eager,din_kernels", "--precisions", "fp32,bf16",
                  "--repeats", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| fp32")
            or line.startswith("| bf16")]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("fp32", "eager"), ("fp32", "din_kernels"),
                                                            ("bf16", "eager"), ("bf16", "din_kernels")]
    for precision, provider, fwd, fwd_share, bwd, bwd_share, total, vs_eager, vs_compiled in rows:
        assert float(fwd) > 0 and float(bwd) > 0 and fwd_share.strip().endswith("%")
        assert abs(float(total) - float(fwd) - float(bwd)) < 1e-3
        assert vs_compiled.strip() == "-"  # not asked for
    assert rows[0][7].strip() == "1.00x"  # eager against itself
    assert "CPU (dry run" in result.stdout


def test_unknown_choices_are_refused():
    result = _run("--providers", "eager,deepctr")
    assert result.returncode == 2 and "--providers must be" in result.stderr
