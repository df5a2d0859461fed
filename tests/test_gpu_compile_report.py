"""benchmarks/gpu_compile_report.py compiles the attention kernels for sm_90 and sm_80 without a GPU and
reads the compiler's counts (Triton's own ptxas run: the cubin a launch loads): every specialisation of the quick
set (sigmoid and Dice, the position-split kernels and their merge) must compile and report registers and
shared memory; 16-bit inputs must reach 16-bit MMAs (BF16 / F16, not TF32) and TF32 its own; nothing may
spill, the fp32-without-TF32 backward (FMA products, two passes) included: the report runs with ``--check``
(issue 12's gate), which fails on any spill, shared-memory overflow or missing tensor-core path. The Dice
and MBA kernels are compiled too, and the Dice-training attention kernels (``fused_dice_training.py``)."""
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_compile_report.py"


def test_quick_report_compiles_every_specialisation(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--check"], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines()
            if line.startswith("| fwd") or line.startswith("| bwd")]
    # fwd and bwd x sm_90, sm_80 x fp32, fp32-tf32, bf16, fp16; fp32's backward in two passes: sigmoid (18),
    # dice (21: its TF32 / 16-bit backward in two passes on sm_80), the position-split forward and backward
    # (18) and the merge kernel (2)
    kernels = [row[0].strip() for row in rows]
    assert len(rows) == 59
    assert kernels.count("fwd_merge") == 2 and sum(" split" in kernel for kernel in kernels) == 18
    assert sum(kernel.endswith(" dice") for kernel in kernels) == 21
    for kernel, arch, precision, *_, warps, registers, spilled, shared, blocks, tensor_core in rows:
        kernel, precision = kernel.strip(), precision.strip()
        assert 0 < int(registers) <= 255 and int(shared) > 0 and int(blocks) >= 1, (kernel, arch, precision)
        count, types = tensor_core.split()
        if kernel == "fwd_merge":
            assert int(count) == 0 and int(spilled) == 0, (kernel, arch)
            continue
        base = kernel.replace(" split", "").replace(" dice", "")
        if precision == "fp32":
            assert int(count) == 0
            assert base in ("fwd", "bwd pass 1", "bwd pass 2"), kernel
        else:
            assert base in ("fwd", "bwd", "bwd pass 1", "bwd pass 2"), (kernel, arch, precision)
        assert int(spilled) == 0, (kernel, arch, precision, spilled)
        if precision != "fp32":
            want = {"fp32-tf32": "TF32", "bf16": "BF16", "fp16": "F16"}[precision]
            assert int(count) > 0 and types == want, (kernel, arch, precision, types)
    # the attention backward's dM reduction (D=36, H1=80), the Dice (statistics with and without a mask, merge,
    # forward, two backward kernels) and MBA kernels (lookup, update in three modes) at their production sizes,
    # for both architectures: none may spill
    others = [line.split("|")[1:-1] for line in result.stdout.splitlines()
              if line.startswith(("| first_layer_m_grads ", "| dice_", "| mba_"))]
    assert len(others) == 2 * (1 + 6 + 4)
    for kernel, arch, dtype, problem, warps, registers, spilled, shared, blocks, tensor_core in others:
        assert 0 < int(registers) <= 255 and int(blocks) >= 1, (kernel, arch, problem)
        assert int(spilled) == 0, (kernel, arch, problem, spilled)
    # Dice attention in training (fused_dice_training.py): every stage the launchers run, for fp32 (TF32 off and
    # on) and bf16 on both architectures: forward stages 0-2, backward stages 0-2 (fp32 without TF32: stage 1
    # in two parts); none may spill, and TF32 / bf16 must reach their own MMAs
    training = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| train-")]
    assert len(training) == 2 * (7 + 6 + 6)
    for kernel, arch, precision, *_, warps, registers, spilled, shared, blocks, tensor_core in training:
        kernel, precision = kernel.strip(), precision.strip()
        assert 0 < int(registers) <= 255 and int(shared) > 0 and int(blocks) >= 1, (kernel, arch, precision)
        assert int(spilled) == 0, (kernel, arch, precision, spilled)
        count, types = tensor_core.split()
        if precision == "fp32":
            assert int(count) == 0, (kernel, arch)
        else:
            want = {"fp32-tf32": "TF32", "bf16": "BF16"}[precision]
            assert int(count) > 0 and types == want, (kernel, arch, precision, types)
    assert "119 specialisations" in result.stdout


def test_bad_architectures_and_jobs_are_refused():
    for args, message in ((["--arch", "70"], "--arch: expected distinct SM versions among 90,80, got '70'"),
                          (["--arch", "90,90"], "--arch: expected distinct SM versions"),
                          (["--jobs", "-1"], "--jobs must be >= 0")):
        result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr[-2000:])
