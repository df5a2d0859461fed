"""Local activation unit: both paths (Triton under the interpreter, torch composite) against the reference.

Every test compares the forward output, the returned [B, T] weights and EVERY gradient (query, keys, each
weight and bias, prelu/dice alphas) with ``reference.din_attention``. The full cross product of
form x activation x normalize x scale x depth runs on one tiny shape with the awkward sizes (prime T, odd D,
lengths 0 and T); the other tests vary one thing at a time so the interpreter keeps the file within minutes.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import din_kernels as dk
from din_kernels import reference
from din_kernels.testing import (ATTENTION_LAUNCHERS, attention_first_layer, attention_fused,
                                 attention_fused_first_layer, attention_launchers, force_position_splits,
                                 fused_supported, launch_choices_as)
from problems import WEIRD_SHAPES, Case, build, cases

attention_forward, attention_backward = ATTENTION_LAUNCHERS["triton"]
attention_torch_forward, attention_torch_backward = ATTENTION_LAUNCHERS["composite"]
attention_cpu_forward = ATTENTION_LAUNCHERS["cpp"][0]

FORMS = ["concat", "outer"]
ACTIVATIONS = ["sigmoid", "relu", "identity", "prelu", "dice"]
FP32_TOL = dict(atol=1e-5, rtol=1e-4)


def leaves(problem):
    """The differentiable inputs, in a fixed order, with readable names."""
    named = [("query", problem.query), ("keys", problem.keys)]
    named += [(f"weights[{i}]", w) for i, w in enumerate(problem.weights)]
    named += [(f"alphas[{i}]", a) for i, a in enumerate(problem.alphas or ())]
    return named


def run(fn, problem, grad_out, **options):
    """(out, attn, {name: grad}) of ``fn`` on fresh leaves of ``problem``."""
    leaf = lambda t: t.detach().clone().requires_grad_(True)  # noqa: E731
    fresh = problem.replace(query=leaf(problem.query), keys=leaf(problem.keys),
                            weights=[leaf(w) for w in problem.weights],
                            alphas=None if problem.alphas is None else [leaf(a) for a in problem.alphas])
    out, attn = fn(fresh.query, fresh.keys, fresh.lengths, fresh.weights, alphas=fresh.alphas,
                   dice_stats=fresh.dice_stats, return_scores=True, **options)
    names, tensors = zip(*leaves(fresh))
    grads = torch.autograd.grad(out, tensors, grad_out.to(out.dtype), allow_unused=True)
    return out, attn, dict(zip(names, grads))


def assert_matches_reference(problem, **options):
    grad_out = torch.randn(problem.query.shape)
    out, attn, grads = run(dk.din_attention, problem, grad_out, **options)
    ref_out, ref_attn, ref_grads = run(reference.din_attention, problem, grad_out, **options)
    torch.testing.assert_close(out, ref_out, **FP32_TOL, msg=lambda m: f"out: {m}")
    torch.testing.assert_close(attn, ref_attn.to(attn.dtype), **FP32_TOL, msg=lambda m: f"attn: {m}")
    for name, ref_grad in ref_grads.items():
        grad = grads[name]
        if ref_grad is None:  # e.g. nothing valid anywhere: the reference graph never reaches it
            ref_grad = torch.zeros_like(grad)
        assert grad is not None, name
        torch.testing.assert_close(grad, ref_grad, **FP32_TOL, msg=lambda m, n=name: f"d{n}: {m}")


def fused_path_runs(problem):
    """True when this problem runs on the Triton kernels (not silently on the composite path)."""
    forward, _ = attention_launchers(problem.keys, problem.weights)
    return forward is attention_forward


# --------------------------------------------------------------------------------------------------------
# forward and every gradient against the reference
# --------------------------------------------------------------------------------------------------------

# prime T, odd D, and one empty and one full history
@pytest.mark.parametrize("case", cases(
    Case(3, 13, 7, hidden, lengths=(0, 13, 6), form=form, activation=activation, normalize=normalize, scale=scale)
    for form in FORMS for activation in ACTIVATIONS for normalize in ["none", "softmax"] for scale in [None, 0.5]
    for hidden in [(16,), (20, 12)]))
def test_every_mode_matches_reference(backend, case):
    problem = build(case)
    assert fused_path_runs(problem) == (backend == "triton")
    assert_matches_reference(problem, **case.options())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch, dim, hidden", [(100, 5, 7), (1, 3, 16), (0, 4, 6), (33, 36, 80)])
def test_first_layer_reduction_kernel(batch, dim, hidden, dtype):
    """The Triton paths' one-read reduction of every row's dM (``fused_first_layer``) against torch's
    (``FirstLayer.m_sums``, in fp64): several chunks of rows with a part-filled last tile (B=100: 4 chunks of
    32 rows), one row, none, DIN's widths; fp32, and fp64 (Dice training's fp64 path)."""
    generator = torch.Generator().manual_seed(batch)
    q, dm, wd_t = (torch.randn(*shape, generator=generator, device="cpu", dtype=dtype).to(torch.get_default_device())
                   for shape in ((batch, dim), (batch, dim, hidden), (dim, hidden)))
    if batch == 100:
        assert attention_fused_first_layer._chunks(batch, dim, q.device) == (4, 32)
    got = attention_fused_first_layer.first_layer_m_grads(q, dm, wd_t)
    want = attention_first_layer.FirstLayer.m_sums(q.double(), dm.double(), wd_t.double())
    for name, g, w in zip(("sum dM", "sum q dM", "dq's M part"), got, want):
        assert g.dtype == dtype and g.shape == w.shape, name
        tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(g.double(), w, **tolerance, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("training", [False, True], ids=["eval", "dice-training"])
def test_launchers_reduce_dm_with_the_kernel(monkeypatch, training):
    """The Triton launchers (eval and Dice training) with the dM reduction kernel itself, which their other
    interpreter runs leave to torch for time (``fused_first_layer.INTERPRETER_USES_TORCH``), against the
    reference: an empty row, a partial one, two hidden layers, D=36."""
    calls = []
    kernel = attention_fused_first_layer.first_layer_m_grads

    def counted(*args):
        calls.append(args[1].shape)
        return kernel(*args)

    monkeypatch.setattr(attention_fused_first_layer, "INTERPRETER_USES_TORCH", False)
    monkeypatch.setattr(attention_fused_first_layer, "first_layer_m_grads", counted)
    previous = dk.get_backend()
    dk.set_backend("triton")
    try:
        problem = build(Case(3, 7, 36, (16, 8), activation="dice", lengths=(7, 0, 3)))
        options = dict(activation="dice", normalize="softmax")
        if training:
            grad_out = torch.randn(3, 36)
            options.update(training=True, momentum=0.3)
            ref_stats = [(m.clone(), v.clone()) for m, v in problem.dice_stats]
            out, attn, grads = run(dk.din_attention, problem, grad_out, **options)
            ref_out, _, ref_grads = run(reference.din_attention, problem.replace(dice_stats=ref_stats), grad_out,
                                        **options)
            torch.testing.assert_close(out, ref_out, **FP32_TOL)
            for name, ref_grad in ref_grads.items():
                torch.testing.assert_close(grads[name], ref_grad, **FP32_TOL, msg=lambda m, n=name: f"d{n}: {m}")
        else:
            assert_matches_reference(problem, **options)
    finally:
        dk.set_backend(previous)
    assert calls == [(3, 36, 16)]


# the shared odd shapes, and the kernels' own: DIN's widths, tiles, D a power of two, the widest layer
SHAPES = WEIRD_SHAPES + (
    Case(4, 13, 36, (80, 40), lengths=(0, 13, 5, 1)),
    Case(3, 50, 36, (80, 40), lengths=(50, 33, 17)),  # BLOCK_T = 32 here: two tiles, online softmax
    Case(2, 9, 64, (32, 16), lengths=(9, 4)),
    Case(2, 5, 16, (256,), lengths=(5, 3)),
)


@pytest.mark.parametrize("normalize", ["none", "softmax"])
@pytest.mark.parametrize("case", cases(SHAPES))
def test_shapes_match_reference(backend, case, normalize):
    problem = build(case)
    assert fused_path_runs(problem) == (backend == "triton")
    assert_matches_reference(problem, normalize=normalize, scale=case.dim ** -0.5)


@pytest.mark.parametrize("activation", ["prelu", "dice"])
@pytest.mark.parametrize("form", FORMS)
def test_din_widths_with_alphas(backend, form, activation):
    problem = build(Case(3, 13, 36 if form == "concat" else 9, (80, 40), form=form, activation=activation,
                         lengths=(13, 0, 7)))
    assert_matches_reference(problem, form=form, activation=activation, normalize="softmax", scale=0.5)


@pytest.mark.parametrize("activation", ["prelu", "dice"])
def test_shared_alpha(backend, activation):
    """An alpha with one entry is shared by all units of its layer; its gradient is the sum."""
    problem = build(Case(3, 7, 5, (16, 8), activation=activation, shared_alpha=True, lengths=(7, 3, 0)))
    assert_matches_reference(problem, activation=activation)


@pytest.mark.parametrize("hidden", [(16, 12, 8), (300,), (256, 256)], ids=["3layers", "width300", "tiles_too_big"])
def test_outside_fused_coverage_falls_back(backend, hidden):
    problem = build(Case(3, 6, 5, hidden, lengths=(6, 0, 2)))
    assert not fused_path_runs(problem)
    for normalize in ("none", "softmax"):
        assert_matches_reference(problem, normalize=normalize, scale=0.5)


@pytest.mark.parametrize("form", FORMS)
def test_no_hidden_layer(backend, form):
    """weights = (w_out, b_out): a linear score, run as an identity layer of width 1 (exact)."""
    problem = build(Case(3, 6, 5, (), form=form, lengths=(6, 0, 2)))
    for normalize in ("none", "softmax"):
        assert_matches_reference(problem, form=form, normalize=normalize, scale=0.5)


def test_fp64_runs_a_cpu_path(backend):
    """The kernels take no fp64: on CPU it runs the C++ op, or the composite path under backend "torch"."""
    problem = build(Case(2, 5, 4, (16,), lengths=(5, 2), dtype=torch.float64))
    forward, _ = attention_launchers(problem.keys, problem.weights)
    assert forward is (attention_torch_forward if backend == "torch" else attention_cpu_forward)
    assert_matches_reference(problem, normalize="softmax")


def test_padding_is_never_read(backend):
    """Whatever sits past lengths[b] (here NaN on the kernel path, huge values on both) changes nothing."""
    problem = build(Case(3, 9, 7, (16,), lengths=(9, 4, 0)))
    grad_out = torch.randn(3, 7)
    out, attn, grads = run(dk.din_attention, problem, grad_out, normalize="softmax")
    padded = problem.replace(keys=problem.keys.clone())
    mask = reference.valid_mask(problem.lengths, 9)
    padded.keys[~mask] = float("nan") if backend == "triton" else 1e4
    out2, attn2, grads2 = run(dk.din_attention, padded, grad_out, normalize="softmax")
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(attn2, attn)
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], msg=lambda m, n=name: f"d{n}: {m}")
    assert bool((grads["keys"][~mask] == 0).all())


@pytest.mark.parametrize("normalize", ["none", "softmax"])
def test_empty_rows_are_exact_zeros(backend, normalize):
    problem = build(Case(3, 5, 7, (16,), activation="dice", lengths=(0, 5, 0)))
    out, attn, grads = run(dk.din_attention, problem, torch.randn(3, 7), activation="dice", normalize=normalize)
    assert bool((out[[0, 2]] == 0).all()) and bool((attn[[0, 2]] == 0).all())
    assert bool((grads["keys"][[0, 2]] == 0).all()) and bool((grads["query"][[0, 2]] == 0).all())
    assert all(bool(torch.isfinite(g).all()) for g in grads.values())


# --------------------------------------------------------------------------------------------------------
# Dice in training mode: the reference runs (batch statistics), running statistics updated in place
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", ["none", "softmax"])
@pytest.mark.parametrize("lengths", [[6, 0, 3, 1], [6, 6, 5, 6]], ids=["packed", "padded"])  # (3/4 valid)
def test_dice_training_matches_reference(backend, normalize, lengths):
    problem = build(Case(4, 6, 5, (16, 8), activation="dice", lengths=lengths))
    ref_stats = [(m.clone(), v.clone()) for m, v in problem.dice_stats]
    grad_out = torch.randn(4, 5)
    options = dict(activation="dice", normalize=normalize, training=True, momentum=0.3)
    out, attn, grads = run(dk.din_attention, problem, grad_out, **options)
    ref_out, ref_attn, ref_grads = run(reference.din_attention, problem.replace(dice_stats=ref_stats), grad_out,
                                       **options)
    torch.testing.assert_close(out, ref_out, **FP32_TOL)
    torch.testing.assert_close(attn, ref_attn, **FP32_TOL)
    for name, ref_grad in ref_grads.items():
        torch.testing.assert_close(grads[name], ref_grad, **FP32_TOL, msg=lambda m, n=name: f"d{n}: {m}")
    before = build(problem.case).dice_stats  # the same draw, untouched
    for (mean, var), (ref_mean, ref_var) in zip(problem.dice_stats, ref_stats):
        torch.testing.assert_close(mean, ref_mean)
        torch.testing.assert_close(var, ref_var)
    assert not torch.equal(problem.dice_stats[0][0], before[0][0])  # they did move


# --------------------------------------------------------------------------------------------------------
# fp16 / bf16: the flash-attention rule, err(path vs fp32 ref) <= factor * err(same-dtype ref vs fp32 ref)
# + atol, factor 3 for fp16; 4 for bf16, whose kernels round every tl.dot operand to bf16 (M_b, the
# activations and their gradients: what bf16 MMAs take; the interpreter emulates it, ``_dot_operand``).
# Measured over 12 seeds x both cases x every output and gradient: the largest ratios 2.13 (fp16, a Dice
# slope's gradient) and 3.15 (bf16, the keys' gradient) on the Triton path, <= 1.0 on the others. The output
# bias's gradient under softmax is exactly 0 (the softmax is shift-invariant): what a path returns there is
# the rounding of the O(1) score gradients it sums, which the same-dtype reference may happen to cancel
# better; it is held to the dtype's eps instead (measured <= 0.4 eps). Several seeds, so that no bound holds
# by the luck of one draw.
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 2, 3])
@pytest.mark.parametrize("activation,normalize", [("sigmoid", "softmax"), ("dice", "none")])
@pytest.mark.parametrize("dtype,factor,atol", [(torch.float16, 3, 1e-5), (torch.bfloat16, 4, 1e-5)],
                         ids=["fp16", "bf16"])
def test_low_precision(backend, dtype, factor, atol, activation, normalize, seed):
    torch.manual_seed(seed)  # (grad_out below)
    problem = build(Case(3, 13, 36, (80, 40), activation=activation, lengths=(13, 7, 0), dtype=dtype), seed=seed)
    exact = problem.replace(query=problem.query.float(), keys=problem.keys.float(),
                            weights=[w.float() for w in problem.weights],
                            alphas=None if problem.alphas is None else [a.float() for a in problem.alphas])
    assert fused_path_runs(problem) == (backend == "triton")
    options = dict(activation=activation, normalize=normalize, scale=36 ** -0.5)
    grad_out = torch.randn(3, 36).to(dtype).float()
    results = run(dk.din_attention, problem, grad_out, **options)
    lowp = run(reference.din_attention, problem, grad_out, **options)
    exact_results = run(reference.din_attention, exact, grad_out, **options)
    pairs = [("out", 0, None), ("attn", 1, None)] + [(f"d{n}", 2, n) for n in exact_results[2]]
    for label, index, name in pairs:
        got, low, ref = (r[index] if name is None else r[index][name] for r in (results, lowp, exact_results))
        assert got.dtype == (torch.float32 if label == "attn" else dtype), label
        err = (got.float() - ref).abs().max().item()
        if name == "weights[5]" and normalize == "softmax":  # exactly 0: see above
            assert err <= torch.finfo(dtype).eps, f"{label}: err {err:.3g} for an exact 0"
            continue
        err_lowp = (low.float() - ref).abs().max().item()
        assert err <= factor * err_lowp + atol, f"{label}: err {err:.3g} vs same-dtype reference {err_lowp:.3g}"


# --------------------------------------------------------------------------------------------------------
# The launcher contract both paths implement (din_kernels/attention: fused.py, composite.py)
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", ["none", "softmax"])
@pytest.mark.parametrize("activation", ["sigmoid", "dice"])
def test_launchers_agree(activation, normalize):
    """Triton and composite launchers return the same (out, attn, lse) and the same gradients; lse is the
    log-sum-exp of the scaled scores over the valid positions, finite for an empty row."""
    problem = build(Case(3, 13, 7, (20, 12), activation=activation, lengths=(13, 0, 6)))
    args = problem.launcher_args()
    options = dict(form="concat", activation=activation, normalize=normalize, scale=0.5)
    fused = attention_forward(*args, **options)
    composite = attention_torch_forward(*args, **options)
    for name, a, b in zip(("out", "attn", "lse"), fused, composite):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, **FP32_TOL, msg=lambda m, n=name: f"{n}: {m}")
    if normalize == "softmax":
        _, scores = reference.din_attention(*problem.op_args(), alphas=problem.alphas,
                                            dice_stats=problem.dice_stats, return_scores=True,
                                            **dict(options, normalize="none"))
        valid = reference.valid_mask(problem.lengths, 13)
        expected = torch.logsumexp(scores.masked_fill(~valid, -math.inf), dim=1)
        torch.testing.assert_close(fused[2][[0, 2]], expected[[0, 2]], **FP32_TOL)
        assert bool(torch.isfinite(fused[2]).all())
    else:
        assert fused[2].numel() == 0
    grad_out = torch.randn(3, 7)
    grads_fused = attention_backward(grad_out, *args, *fused, **options)
    grads_composite = attention_torch_backward(grad_out, *args, *composite, **options)
    flat = lambda g: [g[0], g[1], *g[2], *(g[3] or ())]  # noqa: E731
    for index, (a, b) in enumerate(zip(flat(grads_fused), flat(grads_composite))):
        torch.testing.assert_close(a, b, **FP32_TOL, msg=lambda m, i=index: f"gradient {i}: {m}")


# --------------------------------------------------------------------------------------------------------
# rows x position splits (a GPU with too few rows to fill it; forced here: ``force_position_splits``)
# --------------------------------------------------------------------------------------------------------

SPLIT_CASES = (
    Case(3, 37, 7, (16,), lengths=(0, 37, 20)),                  # prime T, an empty row, a row's last split empty
    Case(2, 1, 5, (20, 12), lengths=(1, 0)),                     # T = 1: a single split through the merge
    Case(4, 67, 36, (80, 40), lengths=(67, 0, 33, 1)),           # DIN's widths, 3 splits (16-position tiles)
    Case(3, 37, 5, (8, 4), lengths=(37, 0, 3), candidates=3),    # several candidates per history
    Case(2, 37, 5, (8, 4), lengths=(0, 0)),                      # nothing valid anywhere
)


@pytest.fixture
def splits_taken(monkeypatch):
    """The (splits, positions per split) each launch of the fused kernels ran with."""
    taken = []
    choose = attention_fused._position_splits

    def spy(*args, **kwargs):
        taken.append(choose(*args, **kwargs))
        return taken[-1]

    monkeypatch.setattr(attention_fused, "_position_splits", spy)
    return taken


@pytest.mark.parametrize("normalize", ["none", "softmax"])
@pytest.mark.parametrize("activation", ["sigmoid", "dice"])  # (dice: alphas and running statistics)
@pytest.mark.parametrize("case", cases(SPLIT_CASES))
def test_position_splits_match_reference(case, activation, normalize, splits_taken):
    """The split forward (partials, then the merge kernel) and backward (per-split partials summed) match the
    reference: output, weights and every gradient."""
    previous = dk.get_backend()
    dk.set_backend("triton")
    try:
        problem = build(case.replace(activation=activation))
        assert fused_path_runs(problem)
        with force_position_splits(3):
            assert_matches_reference(problem, activation=activation, normalize=normalize, scale=0.5)
    finally:
        dk.set_backend(previous)
    assert splits_taken and all(taken is not None for taken in splits_taken)
    if case.seq_len > 16:
        assert all(splits > 1 for splits, _ in splits_taken), splits_taken


def test_position_split_heuristic(monkeypatch):
    """On a GPU (132 SMs) the launcher splits only rows too few to fill it, and only histories long enough;
    the splits are whole tiles; under the interpreter it never splits unless forced."""
    monkeypatch.setattr(attention_fused, "sm_count", lambda device: 132)
    choose, cuda = attention_fused._position_splits, torch.device("cuda")
    assert choose(256, 200, 16, cuda) == (3, 80)     # 256 rows, under 4 programs per SM
    assert choose(256, 50, 16, cuda) == (2, 32)      # a short history: two splits
    assert choose(64, 200, 32, cuda) == (4, 64)      # T=200 holds 6 splits of ~32, whole 32-position tiles: 4
    assert choose(528, 200, 16, cuda) is None        # 4 programs per SM already
    assert choose(2048, 200, 16, cuda) is None
    assert choose(256, 40, 16, cuda) is None         # too short to split
    assert choose(256, 200, 16, torch.device("cpu")) is None
    with force_position_splits(4):
        assert choose(2048, 200, 16, torch.device("cpu")) == (4, 64)
        assert choose(2048, 1, 16, torch.device("cpu")) == (1, 16)


# --------------------------------------------------------------------------------------------------------
# the launch choices of another compiler (Triton 3.6, as a stock CUDA image ships it: ``launch_choices_as``)
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tf32", [False, True], ids=["fp32", "tf32"])
@pytest.mark.parametrize("activation", ["sigmoid", "relu", "prelu", "dice"])
@pytest.mark.parametrize("arch", [90, 80])
def test_triton_3_6_launch_choices_match_reference(arch, activation, tf32):
    """Under Triton 3.6 the launchers choose their own passes and tiles (``_triton_before_3_9``,
    ``_fp32_dot_min_k``): two backward passes for Dice everywhere and for TF32 below sm_90, pass 2 of the fp32
    TF32-off backward at 16 positions (3.6 rejects K = 8), sigmoid's and relu's later-candidate pass 2 at 32
    on sm_80 (``_fma_pass_tile``). At DIN's widths with two candidates per history (the first candidate's
    launch and a later one's, ACCUMULATE), those choices give the reference's output, weights and
    gradients."""
    case = Case(3, 37, 36, (80, 40), lengths=(37, 0, 20), candidates=2, activation=activation, normalize="softmax")
    previous, previous_tf32 = dk.get_backend(), torch.backends.cuda.matmul.allow_tf32
    try:
        dk.set_backend("triton")
        torch.backends.cuda.matmul.allow_tf32 = tf32
        with launch_choices_as(triton_before_3_9=True, fp32_dot_min_k=16, arch=arch):
            dtype = torch.float32
            passes = attention_fused._backward_passes(dtype, (80, 40), activation=activation, arch=arch)
            assert passes == ((1, 2) if not tf32 or activation == "dice" or arch < 90 else (0,))
            if not tf32:
                later_pass_2 = attention_fused._block_sizes(37, 36, (80, 40), backward=True, dot_precision="ieee",
                                                            backward_pass=2, activation=activation,
                                                            accumulate=True, arch=arch)
                assert later_pass_2[0] == (32 if arch < 90 and activation in ("sigmoid", "relu") else 16)
            problem = build(case)
            assert fused_path_runs(problem)
            assert_matches_reference(problem, activation=activation, normalize="softmax", scale=0.5)
    finally:
        dk.set_backend(previous)
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32


# --------------------------------------------------------------------------------------------------------
# coverage of the fused path, and the kernels as a GPU compiles them (no GPU needed)
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim,hidden,fused", [
    (36, (80, 40), True), (64, (256,), True), (256, (64, 64), True), (64, (256, 16), True),
    (128, (128, 128), False), (128, (256,), False), (300, (16,), False), (8, (16, 8, 4), False), (8, (257,), False),
])
def test_fused_coverage(dim, hidden, fused):
    keys = torch.empty(1, 1, dim)
    weights = [torch.empty(h, 1) for h in hidden for _ in (0, 1)] + [torch.empty(1, 1), torch.empty(1)]
    assert fused_supported(keys, weights) == fused
    assert not fused_supported(keys.double(), weights)


COMPILE_FOR_HOPPER = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from din_kernels.testing import attention_fused as A

target = GPUTarget("cuda", 90, 32)  # H100 / H200
ints = {"C", "T", "D", "H1", "H2", "stride_kb", "stride_kt", "CHUNK", "SPLITS"}
for dtype, precision in (("fp32", "ieee"), ("bf16", "tf32")):
    for fn, backward in ((A._din_attention_fwd_kernel, False), (A._din_attention_bwd_kernel, True)):
        block_t, block_d, block_h1, block_h2, num_warps = A._block_sizes(100, 36, (80, 40), backward=backward,
                                                                         dot_precision=precision)
        consts = dict(**A._activation_constexprs("dice"), TWO_LAYERS=True, SOFTMAX=True,
                      DOT_PRECISION=precision, BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_H1=block_h1,
                      BLOCK_H2=block_h2, INTERPRETED=False, SPLIT=False)
        if backward:
            consts.update(PASS=0, ACCUMULATE=False)
        else:
            consts["C"] = 1  # one candidate per history: the JIT specializes an int equal to 1 as a constexpr
        signature = {}
        for name in fn.arg_names:
            signature[name] = ("constexpr" if name in consts else "fp32" if name == "scale" else
                               "i32" if name in ints else "*i64" if name == "LENGTHS" else
                               f"*{dtype}" if name in ("K", "DK", "OUT", "DOUT") else "*fp32")
        source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        kernel = triton.compile(source, target=target, options=dict(num_warps=num_warps))
        assert kernel.asm["cubin"], fn.__name__
        print(fn.__name__, dtype, "shared", kernel.metadata.shared)
        assert kernel.metadata.shared <= 227 * 1024, (fn.__name__, dtype, kernel.metadata.shared)
"""


def test_kernels_compile_for_hopper(tmp_path):
    """The interpreter accepts programs the GPU compiler rejects: compile both kernels for sm_90 with
    Triton's bundled ptxas (DIN's D=36, (80, 40), dice, softmax) and check the shared memory fits a block."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], cwd=root, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("shared") == 4
