"""Dice in the attention MLP in training mode (``din_attention(activation="dice", training=True)``) on every
path against ``reference.din_attention``: the forward, every gradient (through the batch statistics) and the
running statistics. On the C++ op the statistics are the call's own, merged over blocks of rows, so the
problems here include calls of several blocks (more than ~768 valid positions), blocks without a valid
position, and thread counts 1, 2 and 3.
"""
import pytest
import torch

import din_kernels as dk
from din_kernels import reference
from problems import WEIRD_SHAPES, Case, build, cases

FP64 = dict(rtol=1e-10, atol=1e-10)


def problem(case: Case, seed: int = 0) -> dict:
    """The case's tensors (``problems.build``, Dice), leaves requiring gradients, and an output gradient."""
    p = build(case.replace(activation="dice"), seed=seed, requires_grad=True)
    g = torch.Generator().manual_seed(seed + 1)
    return dict(query=p.query, keys=p.keys, lengths=p.lengths, weights=p.weights, alphas=p.alphas,
                stats=p.dice_stats, grad_out=torch.randn(p.query.shape, generator=g).to(case.dtype))


def run(fn, p, *, with_stats=True, **options):
    """(out, {name: gradient}, running statistics after the call) of ``fn`` on a copy of ``p``'s statistics."""
    stats = [(m.clone(), v.clone()) for m, v in p["stats"]] if with_stats else None
    out = fn(p["query"], p["keys"], p["lengths"], p["weights"], activation="dice", training=True,
             alphas=p["alphas"], dice_stats=stats, **options)
    inputs = [p["query"], p["keys"], *p["weights"], *p["alphas"]]
    names = ["query", "keys", *[f"weight{i}" for i in range(len(p["weights"]))],
             *[f"alpha{i}" for i in range(len(p["alphas"]))]]
    grads = torch.autograd.grad(out, inputs, p["grad_out"], allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]  # (B = 0: no graph)
    return out, dict(zip(names, grads)), stats


def assert_matches_reference(p, tolerance, **options):
    out, grads, stats = run(dk.din_attention, p, **options)
    ref_out, ref_grads, ref_stats = run(reference.din_attention, p, **options)
    torch.testing.assert_close(out, ref_out, **tolerance)
    for name, ref_grad in ref_grads.items():
        torch.testing.assert_close(grads[name], ref_grad, **tolerance, msg=lambda m, n=name: f"d{n}: {m}")
    for (mean, var), (ref_mean, ref_var) in zip(stats, ref_stats):
        torch.testing.assert_close(mean, ref_mean, **tolerance)
        torch.testing.assert_close(var, ref_var, **tolerance)


CASES = [
    *[case.replace(dtype=torch.float64) for case in WEIRD_SHAPES],
    Case(6, 9, 5, (16, 8), dtype=torch.float64),
    Case(5, 13, 7, (7, 5, 3), lengths=(13, 0, 4, 0, 1), dtype=torch.float64),
    # several blocks of rows (~768+ positions each): the statistics and the sums merged over blocks
    Case(40, 61, 5, (12, 6), dtype=torch.float64),
    Case(48, 50, 3, (8, 4), lengths=(50,) * 40 + (0,) * 8, dtype=torch.float64),  # empty rows at the end
]


@pytest.mark.parametrize("case", cases(CASES))
@pytest.mark.parametrize("normalize", ["none", "softmax"])
@pytest.mark.parametrize("form", ["concat", "outer"])
def test_matches_reference_fp64(backend, case, normalize, form):
    p = problem(case.replace(form=form))
    assert_matches_reference(p, FP64, form=form, normalize=normalize,
                             scale=case.dim ** -0.5 if normalize == "softmax" else None, momentum=0.3)


def as_fp64(p):
    """The same problem in fp64 (the exact answer an fp32 run is measured against)."""
    def cast(t):
        return t.detach().double().requires_grad_(t.requires_grad)
    return dict(p, query=cast(p["query"]), keys=cast(p["keys"]), weights=[cast(w) for w in p["weights"]],
                alphas=[cast(a) for a in p["alphas"]], stats=[(m.double(), v.double()) for m, v in p["stats"]],
                grad_out=p["grad_out"].double())


@pytest.mark.parametrize("shared_alpha", [False, True], ids=["alpha-per-unit", "alpha-shared"])
def test_matches_reference_fp32_several_blocks(backend, shared_alpha):
    """fp32 at DIN's widths over several blocks, measured against the fp64 reference as the fp32 reference
    is: each output's error at most 3x the fp32 reference's own, plus 4e-6 of the output's largest magnitude
    and 1e-6 (the output bias's exact gradient under softmax is 0; the fp32 reference sometimes lands much
    closer than its rounding suggests). Measured: 0.3x-1.7x the reference's error on every path with a
    slope per unit; with one shared slope that slope's gradient 4x-7x (5.6e-7-9.8e-7 against 1.4e-7, about
    1e-6 of its magnitude)."""
    p = problem(Case(64, 37, 36, (80, 40), shared_alpha=shared_alpha), seed=3)
    options = dict(normalize="softmax", scale=36 ** -0.5)
    out, grads, stats = run(dk.din_attention, p, **options)
    fp32_out, fp32_grads, fp32_stats = run(reference.din_attention, p, **options)
    exact_out, exact_grads, exact_stats = run(reference.din_attention, as_fp64(p), **options)

    def flat(out, grads, stats):
        return {"out": out, **{f"d{n}": g for n, g in grads.items()},
                **{f"running {i}": t for i, t in enumerate(t for pair in stats for t in pair)}}

    ours, fp32, exact = (flat(*r) for r in ((out, grads, stats), (fp32_out, fp32_grads, fp32_stats),
                                            (exact_out, exact_grads, exact_stats)))
    for name, value in ours.items():
        value = value.detach()
        error = float((value.double() - exact[name].detach()).abs().max())
        bound = (3 * float((fp32[name].detach().double() - exact[name].detach()).abs().max())
                 + 4e-6 * float(exact[name].detach().abs().max()) + 1e-6)
        assert error <= bound, f"{name}: error {error:.3g}, bound {bound:.3g}"


def test_without_running_statistics(backend):
    p = problem(Case(7, 12, 5, (8, 4), dtype=torch.float64))
    out, grads, _ = run(dk.din_attention, p, with_stats=False, normalize="softmax")
    ref_out, ref_grads, _ = run(reference.din_attention, p, with_stats=False, normalize="softmax")
    torch.testing.assert_close(out, ref_out, **FP64)
    for name, ref_grad in ref_grads.items():
        torch.testing.assert_close(grads[name], ref_grad, **FP64)


def test_gradcheck_cpp():
    """fp64 gradcheck of the C++ path (every input, through the batch statistics)."""
    previous = dk.get_backend()
    dk.set_backend("cpp")
    try:
        p = problem(Case(4, 6, 3, (5, 4), lengths=(6, 0, 2, 5), dtype=torch.float64))
        assert dk.explain(p["query"], p["keys"], p["lengths"], p["weights"], activation="dice",
                          alphas=p["alphas"], training=True).startswith("cpp: ")

        def fn(query, keys, *rest):
            weights, alphas = list(rest[:len(p["weights"])]), list(rest[len(p["weights"]):])
            return dk.din_attention(query, keys, p["lengths"], weights, activation="dice", training=True,
                                    alphas=alphas, normalize="softmax")

        assert torch.autograd.gradcheck(fn, (p["query"], p["keys"], *p["weights"], *p["alphas"]))
    finally:
        dk.set_backend(previous)


def test_cpp_results_do_not_depend_on_the_thread_count():
    previous_backend, previous_threads = dk.get_backend(), dk.get_cpu_threads()
    dk.set_backend("cpp")
    try:
        p = problem(Case(96, 40, 36, (80, 40)), seed=5)  # several blocks
        results = []
        for threads in (1, 2, 3):
            dk.set_cpu_threads(threads)
            out, grads, stats = run(dk.din_attention, p, normalize="softmax")
            results.append([out, *grads.values(), *[t for pair in stats for t in pair]])
        for other in results[1:]:
            assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    finally:
        dk.set_backend(previous_backend)
        dk.set_cpu_threads(previous_threads)


def test_nan_and_inf_in_the_padding_reach_nothing(backend):
    p = problem(Case(5, 8, 4, (6, 3), lengths=(8, 3, 0, 5, 1), dtype=torch.float64))
    with torch.no_grad():
        keys = p["keys"].detach().clone()
        keys[1, 3:] = float("nan")
        keys[2] = float("inf")
        keys[4, 1:] = -float("inf")
    p["keys"] = keys.requires_grad_()
    out, grads, stats = run(dk.din_attention, p, normalize="softmax")
    assert bool(torch.isfinite(out).all())
    assert all(bool(torch.isfinite(g).all()) for g in grads.values())
    assert all(bool(torch.isfinite(t).all()) for pair in stats for t in pair)
    clean = dict(p, keys=p["keys"].detach().nan_to_num(0.0, 0.0, 0.0).requires_grad_())
    clean_out, clean_grads, _ = run(dk.din_attention, clean, normalize="softmax")
    torch.testing.assert_close(out, clean_out, **FP64)
    torch.testing.assert_close(grads["query"], clean_grads["query"], **FP64)


def test_no_valid_position_leaves_the_running_statistics(backend):
    p = problem(Case(3, 4, 5, (6,), lengths="empty", dtype=torch.float64))
    out, grads, stats = run(dk.din_attention, p, normalize="softmax")
    assert bool((out == 0).all()) and bool((grads["keys"] == 0).all())
    for (mean, var), (before_mean, before_var) in zip(stats, p["stats"]):
        assert torch.equal(mean, before_mean) and torch.equal(var, before_var)


def test_low_precision_inputs_compute_in_fp32(backend):
    p = problem(Case(6, 10, 8, (8, 4)), seed=2)
    half = dict(p, query=p["query"].detach().bfloat16().requires_grad_(),
                keys=p["keys"].detach().bfloat16().requires_grad_(), grad_out=p["grad_out"].bfloat16())
    exact = dict(p, query=half["query"].detach().float().requires_grad_(),
                 keys=half["keys"].detach().float().requires_grad_())
    out, grads, _ = run(dk.din_attention, half, normalize="softmax")
    ref_out, ref_grads, _ = run(reference.din_attention, dict(exact, grad_out=half["grad_out"].float()),
                                normalize="softmax")
    assert out.dtype == torch.bfloat16 and grads["keys"].dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref_out, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grads["keys"].float(), ref_grads["keys"], rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------------------------------------
# The Triton path's own kernels (fused_dice_training.py): routing, the kept statistics, bad arguments
# ----------------------------------------------------------------------------------------------------------

def _explain(p, **options):
    return dk.explain(p["query"], p["keys"], p["lengths"], p["weights"], activation="dice", alphas=p["alphas"],
                      training=True, **options)


@pytest.fixture
def triton_backend():
    previous = dk.get_backend()
    dk.set_backend("triton")
    yield
    dk.set_backend(previous)


def test_triton_plan_runs_the_kernels_where_they_cover_the_problem(triton_backend):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for hidden in ((6,), (6, 3)):
            assert _explain(problem(Case(3, 5, 4, hidden, dtype=dtype))).startswith("triton: "), (dtype, hidden)
    # three hidden layers, several candidates per history: the composite's autograd pass
    assert _explain(problem(Case(3, 5, 4, (6, 5, 3)))).startswith("composite-autograd: ")
    assert _explain(problem(Case(3, 5, 4, (6, 3), candidates=2))).startswith("composite-autograd: ")


def test_triton_path_never_calls_the_reference(triton_backend, monkeypatch):
    p = problem(Case(4, 9, 5, (6, 3), lengths=(9, 0, 3, 1), dtype=torch.float64))
    expected = run(dk.din_attention, p, normalize="softmax")

    def refuse(*args, **kwargs):
        raise AssertionError("the Triton path called reference.py")

    for name in ("din_attention", "dice"):
        monkeypatch.setattr(reference, name, refuse)
    got = run(dk.din_attention, p, normalize="softmax")
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)


def test_triton_backward_reads_the_kept_statistics_twice_and_recomputes_them_without(triton_backend):
    """``retain_graph=True``: the second backward reads the same kept statistics (same gradients, bit for
    bit); the launcher's backward without ``kept`` recomputes them (the same again); results deterministic."""
    from din_kernels.testing import attention_fused_dice_training as launchers

    p = problem(Case(5, 11, 6, (8, 4), lengths=(11, 0, 7, 2, 5), dtype=torch.float64))
    stats = [(m.clone(), v.clone()) for m, v in p["stats"]]
    out = dk.din_attention(p["query"], p["keys"], p["lengths"], p["weights"], activation="dice", training=True,
                           alphas=p["alphas"], dice_stats=stats, normalize="softmax")
    inputs = [p["query"], p["keys"], *p["weights"], *p["alphas"]]
    first = torch.autograd.grad(out, inputs, p["grad_out"], retain_graph=True)
    second = torch.autograd.grad(out, inputs, p["grad_out"])
    assert all(torch.equal(a, b) for a, b in zip(first, second))

    args = (p["query"].detach(), p["keys"].detach(), p["lengths"], [w.detach() for w in p["weights"]],
            [a.detach() for a in p["alphas"]], None, 1e-8)
    options = dict(form="concat", activation="dice", normalize="softmax", scale=None)
    kept = []
    out_l, attn, lse = launchers.attention_triton_dice_training_forward(*args, **options, momentum=0.1, kept=kept)
    assert torch.equal(out_l, out.detach())
    with_kept = launchers.attention_triton_dice_training_backward(p["grad_out"], *args, out_l, attn, lse, **options,
                                                                 kept=kept)
    without = launchers.attention_triton_dice_training_backward(p["grad_out"], *args, out_l, attn, lse, **options)
    flat = lambda r: [r[0], r[1], *r[2], *r[3]]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(flat(with_kept), flat(without)))
    assert all(torch.equal(a, b) for a, b in zip(flat(with_kept), first))


@pytest.mark.parametrize("case", cases([
    Case(6, 37, 36, (80, 40), lengths=(37, 0, 20, 1, 16, 33), dtype=torch.float64),  # DIN's widths, many tiles
    Case(5, 13, 7, (7, 5), lengths=(13, 0, 4, 0, 1), dtype=torch.float64),
    Case(6, 37, 36, (80, 40), lengths=(37, 0, 20, 1, 16, 33)),                       # fp32, run with TF32
]))
@pytest.mark.parametrize("normalize", ["none", "softmax"])
def test_triton_3_6_first_layer_in_two_parts(triton_backend, case, normalize):
    """Under Triton 3.6 on an A100 (``testing.launch_choices_as``) stage 2 runs in two launches, dM_b and du_b
    apart from dk (``_first_layer_parts``): for FMA products (fp64 here, as fp32 without TF32), whose fp32
    ``tl.dot`` wants K >= 16, and for TF32 below sm_90. Output, every gradient and the running statistics
    match the reference (fp64 exactly; TF32 fp32, which the interpreter multiplies in fp32, at fp32's
    tolerance)."""
    from din_kernels.testing import attention_fused_dice_training as launchers
    from din_kernels.testing import launch_choices_as

    tf32 = case.dtype == torch.float32
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        with launch_choices_as(triton_before_3_9=True, fp32_dot_min_k=16, arch=80):
            _, launches = launchers._stage_configs(case.dtype, case.seq_len, case.dim, case.hidden, arch=80)
            assert [(stage, part) for stage, part, *_ in launches if stage == 2] == [(2, 1), (2, 2)]
            tolerance = dict(rtol=1e-4, atol=1e-5) if tf32 else FP64
            assert_matches_reference(problem(case), tolerance, normalize=normalize,
                                     scale=case.dim ** -0.5 if normalize == "softmax" else None, momentum=0.3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32


def test_triton_launchers_refuse_what_they_do_not_run():
    from din_kernels.testing import attention_fused_dice_training as launchers

    p = problem(Case(2, 3, 4, (6, 3)))
    args = (p["query"].detach(), p["keys"].detach(), p["lengths"], p["weights"], p["alphas"], None, 1e-8)
    options = dict(form="concat", normalize="none", scale=None, momentum=0.1)
    forward = launchers.attention_triton_dice_training_forward
    with pytest.raises(ValueError, match="activation"):
        forward(*args, activation="sigmoid", **options)
    with pytest.raises(ValueError, match="query"):
        forward(p["query"].detach().repeat(2, 1), *args[1:], activation="dice", **options)
    with pytest.raises(ValueError, match="normalize"):
        forward(*args, activation="dice", **dict(options, normalize="sum"))
    deep = problem(Case(2, 3, 4, (6, 5, 3)))
    with pytest.raises(ValueError, match="coverage"):
        forward(*args[:3], deep["weights"], deep["alphas"], None, 1e-8, activation="dice", **options)
