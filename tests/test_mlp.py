"""``din_kernels.dice_mlp`` / ``DiceMLP`` (DIN's head: [Linear -> Dice] * L -> Linear) against
``reference.dice_mlp`` on every path (the C++ op, the composite chain on the torch path and on Dice's Triton
kernels under the interpreter): output, every gradient, running statistics, training and eval, odd shapes
and block boundaries (64 rows a block), thread-count independence; bad arguments refused naming the argument."""
import pytest
import torch

import din_kernels as dk
from din_kernels import reference


def head_problem(n=37, widths=(13, 7, 5, 2), dtype=torch.float64, scalar_alpha_at=(), seed=0):
    """x [n, widths[0]], weights of the layers widths[i] -> widths[i + 1], alphas and running statistics."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, widths[0], generator=g, dtype=dtype) * 2 + 0.5).requires_grad_()
    weights = []
    for a, b in zip(widths[:-1], widths[1:]):
        weights += [(torch.randn(b, a, generator=g, dtype=dtype) / a ** 0.5).requires_grad_(),
                    (torch.randn(b, generator=g, dtype=dtype) * 0.1).requires_grad_()]
    alphas = [torch.rand(1 if l in scalar_alpha_at else h, generator=g, dtype=dtype).requires_grad_()
              for l, h in enumerate(widths[1:-1])]
    means = [torch.randn(h, generator=g, dtype=dtype) * 0.1 for h in widths[1:-1]]
    variances = [torch.rand(h, generator=g, dtype=dtype) + 0.5 for h in widths[1:-1]]
    return x, weights, alphas, means, variances


def run_both(problem, training, momentum=0.1, eps=1e-8):
    """(ours, reference): output, gradients of (x, *weights, *alphas) and the running statistics after."""
    x, weights, alphas, means, variances = problem
    results = []
    for fn in (dk.dice_mlp, reference.dice_mlp):
        stats = [t.clone() for t in means], [t.clone() for t in variances]
        out = fn(x, weights, alphas, *stats, training=training, momentum=momentum, eps=eps)
        grad_out = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3))
        grads = torch.autograd.grad(out, [x, *weights, *alphas], grad_out) if out.numel() else ()
        results.append((out, grads, stats))
    return results


def assert_matches(ours, want, tol):
    (out, grads, stats), (out_ref, grads_ref, stats_ref) = ours, want
    torch.testing.assert_close(out, out_ref, rtol=tol, atol=tol)
    for i, (g, e) in enumerate(zip(grads, grads_ref)):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol, msg=lambda m: f"gradient {i}: {m}")
    for got, exp in zip(stats[0] + stats[1], stats_ref[0] + stats_ref[1]):
        torch.testing.assert_close(got, exp, rtol=tol, atol=tol)


SHAPES = {
    "N37-13.7.5.2": dict(n=37, widths=(13, 7, 5, 2)),
    "N1": dict(n=1, widths=(6, 4, 3, 1)),
    "N64-one-block": dict(n=64, widths=(9, 5, 1)),
    "N65-two-blocks": dict(n=65, widths=(9, 5, 1)),
    "N200-four-blocks-three-hidden": dict(n=200, widths=(11, 9, 7, 3, 1)),
    "N3-scalar-alpha": dict(n=3, widths=(5, 4, 3, 2), scalar_alpha_at=(1,)),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_reference_fp64(backend, shape, training):
    ours, want = run_both(head_problem(**shape), training)
    assert_matches(ours, want, 1e-10)


def graph_nodes(out):
    """The names of the autograd nodes behind ``out``."""
    names, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            todo += [next_node for next_node, _ in node.next_functions]
    return names


def test_runs_the_cpp_op_on_cpu_and_the_chain_elsewhere(backend):
    x, weights, alphas, means, variances = head_problem()
    out = dk.dice_mlp(x, weights, alphas, means, variances, training=True)
    assert ("DiceMLPFunctionBackward" in graph_nodes(out)) == (backend == "cpp")


def test_no_rows(backend):
    x, weights, alphas, means, variances = head_problem(n=0)
    before = [t.clone() for t in means + variances]
    out = dk.dice_mlp(x, weights, alphas, means, variances, training=True)
    assert out.shape == (0, 2)
    out.sum().backward()
    assert float(weights[0].grad.abs().sum()) == 0.0 and float(alphas[0].grad.abs().sum()) == 0.0
    for got, exp in zip(means + variances, before):  # no valid row: the running statistics stay
        assert torch.equal(got, exp)


def test_fp32_at_dins_widths_within_the_references_own_error():
    """fp32 against the fp64 reference: no worse than 3x the fp32 reference's own error (the C++ op's batch
    moments are merged in double)."""
    problem64 = head_problem(n=256, widths=(108, 200, 80, 1), seed=1)
    problem32 = tuple([t.detach().float().requires_grad_(t.requires_grad) for t in part] if isinstance(part, list)
                      else part.detach().float().requires_grad_() for part in problem64)
    exact = run_both(problem64, True)[1]
    ours, ref32 = run_both(problem32, True)
    for got, base, truth in zip([ours[0], *ours[1]], [ref32[0], *ref32[1]], [exact[0], *exact[1]]):
        got, base, truth = got.detach().double(), base.detach().double(), truth.detach()
        scale = float(truth.abs().max())
        err, base_err = float((got - truth).abs().max()), float((base - truth).abs().max())
        assert err <= 3 * base_err + 1e-7 * scale, (err, base_err)


def test_results_do_not_depend_on_the_thread_count():
    problem = head_problem(n=300, widths=(20, 16, 8, 1), dtype=torch.float32)
    previous = dk.get_cpu_threads()
    try:
        runs = []
        for threads in (1, 2, 3):
            dk.set_cpu_threads(threads)
            runs.append(run_both(problem, True)[0])
    finally:
        dk.set_cpu_threads(previous if previous != torch.get_num_threads() else 0)
    for out, grads, stats in runs[1:]:
        assert torch.equal(out, runs[0][0])
        assert all(torch.equal(g, e) for g, e in zip(grads, runs[0][1]))
        assert all(torch.equal(g, e) for g, e in zip(stats[0] + stats[1], runs[0][2][0] + runs[0][2][1]))


def test_gradcheck_fp64():
    x, weights, alphas, _, _ = head_problem(n=9, widths=(4, 3, 2, 1))

    def fn(x, *params):
        return dk.dice_mlp(x, list(params[:6]), list(params[6:]), None, None, training=True)

    assert torch.autograd.gradcheck(fn, (x, *weights, *alphas))


def test_module_equals_the_linear_and_dice_modules_and_loads_their_state():
    torch.manual_seed(1)
    module = dk.DiceMLP(10, (8, 4), out_features=2).double()
    x = torch.randn(50, 10, dtype=torch.float64)
    twin = dk.DiceMLP(10, (8, 4), out_features=2).double()
    twin.load_state_dict(module.state_dict())

    def chained(x):
        return twin.linears[2](twin.dices[1](twin.linears[1](twin.dices[0](twin.linears[0](x)))))

    torch.testing.assert_close(module(x), chained(x), rtol=1e-12, atol=1e-12)
    for a, b in zip(module.dices, twin.dices):  # both updated their running statistics alike
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-12, atol=1e-12)
    module.eval()
    twin.eval()
    torch.testing.assert_close(module(x), chained(x), rtol=1e-12, atol=1e-12)
    assert set(module.state_dict()) == {f"linears.{i}.{p}" for i in range(3) for p in ("weight", "bias")} | {
        f"dices.{i}.{p}" for i in range(2) for p in ("alpha", "running_mean", "running_var")}


@pytest.mark.parametrize("change,error,match", [
    (lambda x, w, a, m, v: (x[0], w, a, m, v), ValueError, "x must have 2 dimensions"),
    (lambda x, w, a, m, v: (x, w[:2], a, m, v), ValueError, "at least one hidden layer"),
    (lambda x, w, a, m, v: (x, w[:5], a, m, v), ValueError, "at least one hidden layer"),
    (lambda x, w, a, m, v: (x, [w[0][:, :3]] + w[1:], a, m, v), ValueError, r"weights\[0\] must be \[out, 13\]"),
    (lambda x, w, a, m, v: (x, w[:3] + [w[3][:2]] + w[4:], a, m, v), ValueError, r"weights\[3\] must have 5"),
    (lambda x, w, a, m, v: (x, w, a[:1], m, v), ValueError, "alphas must be a sequence of 2"),
    (lambda x, w, a, m, v: (x, w, [a[0][:3], a[1]], m, v), ValueError, r"alphas\[0\] must have 1 or 7"),
    (lambda x, w, a, m, v: (x, w, a, m, None), ValueError, "must be given together"),
    (lambda x, w, a, m, v: (x, w, a, [m[0], m[1][:2]], v), ValueError, r"running_means\[1\] must have 5"),
    (lambda x, w, a, m, v: (x.long(), w, a, m, v), TypeError, "x must be a floating tensor"),
])
def test_bad_arguments_are_refused(change, error, match):
    x, weights, alphas, means, variances = head_problem()
    args = change(x.detach(), weights, alphas, means, variances)
    with pytest.raises(error, match=match):
        dk.dice_mlp(*args, training=True)


def test_eval_needs_running_statistics_and_momentum_is_checked():
    x, weights, alphas, _, _ = head_problem()
    with pytest.raises(ValueError, match="required in eval mode"):
        dk.dice_mlp(x, weights, alphas, None, None, training=False)
    with pytest.raises(ValueError, match="momentum must lie in"):
        dk.dice_mlp(x, weights, alphas, None, None, training=True, momentum=2.0)
    with pytest.raises(ValueError, match="hidden_units must be a non-empty"):
        dk.DiceMLP(4, ())


def test_din_head_equals_its_modules_chain():
    """din's head runs the op; the same modules chained as before give the same logits and gradients."""
    from din.model import _Head

    torch.manual_seed(2)
    head = _Head(12, (10, 6), "dice").double()
    x = torch.randn(70, 12, dtype=torch.float64, requires_grad=True)
    state = {k: v.clone() for k, v in head.state_dict().items()}
    out = head(x)
    grads = torch.autograd.grad(out.sum(), [x, *head.parameters()])
    head.load_state_dict(state)
    chained = head.mlp(head.norm(x)).squeeze(-1)
    want = torch.autograd.grad(chained.sum(), [x, *head.parameters()])
    torch.testing.assert_close(out, chained, rtol=1e-10, atol=1e-10)
    for g, e in zip(grads, want):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    assert "DiceMLPFunctionBackward" in graph_nodes(out)


def test_tensors_on_two_devices_are_refused():
    x, weights, alphas, means, variances = head_problem()
    with pytest.raises(ValueError, match="one device"):
        dk.dice_mlp(x, weights, alphas, [means[0].to("meta"), means[1]], variances, training=True)


def test_bench_head_prints_its_table(capsys):
    """benchmarks/bench_head.py end to end at a tiny size (each provider in its own process)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_head.py"
    spec = importlib.util.spec_from_file_location("bench_head", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--rows", "8", "--repeats", "1", "--rounds", "2", "--calls", "1", "--threads", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| quiet | 1 |")]
    assert len(rows) == 1 and rows[0].count("x |") == 2  # modules and deepctr over din_kernels
