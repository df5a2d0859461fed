"""The C++ CPU op of the local activation unit (``din_kernels.attention_cpu``, ``csrc/attention_cpu.cpp``):
many blocks, kept activations for some blocks only, results independent of the thread count, checked
inputs, the buffer pool, and the build: cached, rebuilt for a new source, and the
fallback to the composite path where it cannot be built or is switched off. The reference comparisons on
every form, activation, normalization and edge shape are in test_attention_torch.py (paths "cpp" and
"cpp-kept"), and its fp64 gradcheck there too."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import din_kernels as dk
from din_kernels.testing import attention_cpu as ac
from din_kernels.testing import attention_plan
from din_kernels.testing import cpu_extension, use_cpu_extension
from problems import Case, build
from test_attention_torch import assert_matches, cpp

ROOT = Path(__file__).resolve().parents[1]


def test_the_op_is_built_in_ci():
    """make setup builds it; a CI without it would silently test the fallback only. (On a GPU image without
    a C++ compiler, DIN_TEST_DEVICE set by gpu_check.sh, the composite path must stand in on CPU tensors.)"""
    if os.environ.get("DIN_TEST_DEVICE") and not cpu_extension.available():
        assert not use_cpu_extension(torch.empty(0, device="cpu"))
        return
    assert cpu_extension.available()
    assert dk.get_backend() == os.environ.get("DIN_KERNELS_BACKEND", "cpp")


@pytest.mark.parametrize("kept", [None, "all", "some"])
@pytest.mark.parametrize("form,activation,normalize", [("concat", "sigmoid", "none"),
                                                        ("concat", "dice", "softmax"),
                                                        ("outer", "prelu", "softmax")])
def test_many_blocks_match_the_reference(monkeypatch, kept, form, activation, normalize):
    """~18k valid positions make 16 blocks of ~1.1k; with "some", the buffer holds the first few blocks only
    and the backward recomputes the rest."""
    if kept == "some":
        monkeypatch.setattr(ac, "KEEP_FLOATS", 4000 * 2 * 12)
    problem = build(Case(300, 120, 4, (8, 4), form=form, activation=activation, dtype=torch.float64))
    options = dict(form=form, activation=activation, normalize=normalize, scale=0.5)
    path = "cpp" if kept is None else "cpp-kept"
    assert_matches(problem, options, atol=1e-10, rtol=1e-8, path=path)


def test_kept_activations_change_nothing():
    problem = build(Case(200, 40, 6, (12, 6), activation="dice"))
    grad_out = torch.randn(200, 6)
    options = dict(form="concat", activation="dice", normalize="softmax", scale=None)
    plain = cpp(*problem, grad_out, **options)
    kept = cpp(*problem, grad_out, kept=[], **options)
    for a, b in zip([*plain[:3], *plain[3]], [*kept[:3], *kept[3]]):
        assert torch.equal(a, b)


def test_results_do_not_depend_on_the_thread_count():
    """Blocks are fixed by the lengths and the weight gradients summed in block order: bit for bit equal,
    whether the helpers are torch's OpenMP team (the op's threads following torch's, 0) or the library's own
    threads (more threads than torch runs)."""
    problem = build(Case(256, 50, 8, (16, 8)))
    grad_out = torch.randn(256, 8)
    options = dict(form="concat", activation="sigmoid", normalize="softmax", scale=None)
    before = torch.get_num_threads()
    results = []
    try:
        for torch_threads, op_threads in ((1, 0), (2, 0), (3, 0), (1, 2), (1, 3), (2, 3)):
            torch.set_num_threads(torch_threads)
            dk.set_cpu_threads(op_threads)
            out, attn, lse, grads = cpp(*problem, grad_out, **options)
            results.append([out, attn, lse, *grads])
    finally:
        torch.set_num_threads(before)
        dk.set_cpu_threads(0)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_the_threads_setting_is_restored():
    """The op runs each block single-threaded (OpenMP and MKL settings of the calling thread) and restores
    them: torch's own ops keep their threads."""
    problem = build(Case(64, 20, 4, (8,), lengths="full"))
    before = torch.get_num_threads()
    cpp(*problem, torch.randn(64, 4), form="concat", activation="sigmoid", normalize="none", scale=None)
    assert torch.get_num_threads() == before


def test_the_op_checks_its_inputs():
    """Lengths beyond T reach the op only through a caller that skipped validation: an error, not a read out
    of bounds."""
    query, keys, lengths, weights, _, _ = build(Case(2, 3, 4, (5,), lengths=(3, 1)))
    args = ac._Arguments(keys, weights, None, None, 1e-8, "concat", "sigmoid")
    ops = torch.ops.din_kernels_cpu
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[0, T\]"):
        ops.attention_fwd(query, keys, torch.tensor([4, 1]), *args.tensors, False, None, torch.empty(0), 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.attention_fwd(query, keys.transpose(0, 1).contiguous().transpose(0, 1), lengths, *args.tensors,
                          False, None, torch.empty(0), 0)


def test_the_public_op_runs_it_and_reuses_the_kept_buffer(monkeypatch):
    """Eager training goes through DinAttentionFunction with kept activations; the backward hands the buffer
    back and the next call takes the same one (its pages already faulted in)."""
    monkeypatch.setattr(ac, "_BUFFERS", ac._SavedBuffers())
    calls = []
    forward = ac.attention_cpu_forward

    def spy(*args, kept=None, **options):
        calls.append(kept)
        return forward(*args, kept=kept, **options)

    monkeypatch.setattr(attention_plan, "attention_cpu_forward", spy)
    unit = dk.LocalActivationUnit(6, (8, 4))
    query, keys, lengths = torch.randn(50, 6), torch.randn(50, 100, 6), torch.randint(0, 101, (50,))
    pointers = []
    for _ in range(2):
        out = unit(query, keys, lengths)
        pointers.append(calls[-1][0][0].data_ptr())  # (buffer, arguments)
        out.sum().backward()
        assert calls[-1] == []  # the backward took it
        assert len(ac._BUFFERS.free) == 1
    assert pointers[0] == pointers[1]
    with torch.no_grad():
        unit(query, keys, lengths)
    assert calls[-1] is None  # nothing kept without a backward to come


def _run(code: str, **env) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHONPATH=str(ROOT), DIN_KERNELS_BACKEND="auto", **env)
    environment.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                          timeout=600)


CHECK = """
import torch, din_kernels as dk
from din_kernels import reference
from din_kernels.testing import ATTENTION_LAUNCHERS, attention_launchers
q, k, l = torch.randn(8, 4, requires_grad=True), torch.randn(8, 70, 4), torch.randint(0, 71, (8,))
unit = dk.LocalActivationUnit(4, (6,))
out = unit(q, k, l)
torch.testing.assert_close(out, reference.din_attention(q, k, l, unit.weights()))
out.sum().backward()
print(attention_launchers(k, unit.weights())[0] is ATTENTION_LAUNCHERS["composite"][0])
"""


def test_switched_off_it_falls_back_to_the_composite_path():
    result = _run(CHECK, DIN_KERNELS_CPU_EXTENSION="0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "True"
    refused = _run("import din_kernels as dk; dk.set_backend('cpp')", DIN_KERNELS_CPU_EXTENSION="0")
    assert refused.returncode != 0 and "backend 'cpp' requested" in refused.stderr


def test_without_a_compiler_it_warns_once_and_falls_back(tmp_path):
    result = _run(CHECK, CXX=str(tmp_path / "no-such-compiler"), DIN_KERNELS_CACHE=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "True"
    assert result.stderr.count("the C++ CPU op is unavailable") == 1
    assert "no C++ compiler" in result.stderr


def test_built_once_into_the_cache_then_loaded(tmp_path):
    """A fresh cache builds (saying so on stderr), the next process loads the same file silently, and the
    build leaves no temporary file behind."""
    env = dict(DIN_KERNELS_CACHE=str(tmp_path))
    first = _run("from din_kernels.testing import cpu_extension as c; print(c.available(), c.library_path())", **env)
    assert first.returncode == 0, first.stderr
    assert "building the C++ CPU op" in first.stderr
    available, path = first.stdout.split()
    assert available == "True" and Path(path).is_file()
    second = _run("from din_kernels.testing import cpu_extension as c; print(c.available(), c.library_path())", **env)
    assert second.returncode == 0 and "building" not in second.stderr
    assert second.stdout.split() == first.stdout.split()
    assert [p.name for p in tmp_path.iterdir()] == [Path(path).name]


EXIT_RIGHT_AFTER = """
import torch, din_kernels as dk
torch.set_num_threads(2)
unit = dk.LocalActivationUnit(8, (16, 8), normalize="softmax")
q, k, l = torch.randn(256, 8, requires_grad=True), torch.randn(256, 50, 8), torch.randint(0, 51, (256,))
for _ in range(100):
    unit(q, k, l).sum().backward()
print("ok")
"""


def test_the_process_exits_cleanly_with_helpers_about():
    """Helpers may still be finishing when the interpreter shuts down: it must exit 0 (torch's inter-op pool,
    whose tasks hold Python state, aborted here about one run in 13)."""
    for _ in range(3):
        result = _run(EXIT_RIGHT_AFTER)
        assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


FORKED = """
import multiprocessing as mp, torch, din_kernels as dk
from din_kernels import reference
torch.set_num_threads(2)
unit = dk.LocalActivationUnit(8, (16,))
q, k, l = torch.randn(300, 8), torch.randn(300, 40, 8), torch.randint(0, 41, (300,))
unit(q, k, l)  # helpers started in the parent (torch's OpenMP team: torch and the op run at 2 threads)
want = reference.din_attention(q, k, l, unit.weights())

def child(queue):
    # (torch's own parallel ops would hang here: GNU OpenMP's team does not survive a fork, which is why
    # DataLoader workers run torch at 1 thread; the op at 2 threads makes its own helpers instead)
    torch.set_num_threads(2)
    out = unit(q, k, l)
    queue.put(bool(torch.allclose(out, want, atol=1e-5)))

queue = mp.get_context("fork").Queue()
process = mp.get_context("fork").Process(target=child, args=(queue,))
process.start()
print(queue.get(timeout=60))
process.join(60)
print(process.exitcode)
"""


def test_a_forked_child_runs_the_op():
    """A fork (DataLoader workers) has no helper threads behind the parent's pool or OpenMP team: it makes
    its own."""
    result = _run(FORKED)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "0"]
