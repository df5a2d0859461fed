"""Several candidates per history: ``din_attention(query [B, C, D], keys [B, T, D], lengths [B])`` against the
reference applied per candidate (forward, weights, every gradient), on every path (Triton under the
interpreter, the C++ op, the composite path), the launchers' [R, D] contract directly, Dice in training mode,
and bad shapes."""
import pytest
import torch

import din_kernels as dk
from din_kernels import reference
from din_kernels.testing import ATTENTION_LAUNCHERS

from conftest import BACKENDS
from problems import Case, build, cases, unit_kwargs


def grads_of(out, inputs, grad):
    return torch.autograd.grad(out, inputs, grad, allow_unused=True)


def assert_matches_reference(unit, options, query, keys, lengths, atol=1e-5, rtol=1e-4):
    out, attn = unit(query, keys, lengths, return_scores=True)
    params = list(unit.weights()) + list(options.get("alphas", []))
    grad = torch.randn_like(out)
    got = grads_of(out, [query, keys, *params], grad)
    q_ref, k_ref = query.detach().clone().requires_grad_(), keys.detach().clone().requires_grad_()
    want_out, want_attn = reference.din_attention(q_ref, k_ref, lengths, unit.weights(), return_scores=True,
                                                  **options)
    want = grads_of(want_out, [q_ref, k_ref, *params], grad)
    assert out.shape == query.shape and attn.shape == (*query.shape[:2], keys.shape[1])
    torch.testing.assert_close(out, want_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(attn, want_attn.detach(), atol=atol, rtol=rtol)
    for index, (a, b) in enumerate(zip(got, want)):
        a = torch.zeros_like(b) if a is None and b is not None else a
        b = torch.zeros_like(a) if b is None and a is not None else b
        if a is not None:
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, i=index: f"gradient {i}: {m}")


def unit_and_options(problem):
    """The module holding the problem's weights, and din_attention's keywords for the reference run on the
    module's own parameters (so that both runs' gradients reach the same tensors)."""
    unit = problem.unit()
    return unit, {**problem.case.options(), **unit_kwargs(unit)}


SHAPES = (
    Case(3, 7, 5, lengths=(7, 0, 3), candidates=4),    # an empty history among them
    Case(1, 1, 5, lengths=(1,), candidates=1),         # one of everything
    Case(2, 13, 5, lengths=(13, 5), candidates=7),     # prime C and T
    Case(40, 30, 5, candidates=3),                     # past the small-problem path: chunked composite, C++ plan
    Case(2, 5, 5, lengths=(5, 2), candidates=0),       # no candidates
    Case(0, 5, 5, lengths="empty", candidates=3),      # no histories
)


@pytest.mark.parametrize("case", cases(shape.replace(form=form, activation=activation, normalize="softmax")
                                       for form in ["concat", "outer"]
                                       for activation in ["sigmoid", "prelu", "dice"] for shape in SHAPES))
def test_every_candidate_matches_the_reference(backend, case):
    problem = build(case, requires_grad=True)
    unit, options = unit_and_options(problem)
    assert_matches_reference(unit, options, problem.query, problem.keys, problem.lengths)


@pytest.mark.parametrize("normalize", ["none", "softmax"])
def test_launchers_take_candidate_rows(normalize):
    """The launcher contract with query [R, D], R = B * C: Triton, C++ (with and without kept activations)
    and composite agree, and the keys' gradient sums over each history's candidates."""
    batch, candidates, seq_len, dim = 3, 5, 11, 6
    problem = build(Case(batch, seq_len, dim, (16, 8), lengths=(11, 0, 4), candidates=candidates))
    query, keys, lengths, weights = problem.query.reshape(batch * candidates, dim), *problem.op_args()[1:]
    args = (query, keys, lengths, weights, None, None, 1e-8)
    kw = dict(form="concat", activation="sigmoid", normalize=normalize, scale=0.5)
    results = {}
    paths = ["triton", "composite"] + (["cpp", "cpp-kept"] if "cpp" in BACKENDS else [])
    for path in paths:
        forward, backward = ATTENTION_LAUNCHERS[path.replace("-kept", "")]
        kept = dict(kept=[]) if path == "cpp-kept" else {}
        on = [t.cpu() if path.startswith("cpp") and isinstance(t, torch.Tensor) else  # (the C++ op: CPU)
              [w.cpu() for w in t] if path.startswith("cpp") and isinstance(t, list) else t for t in args]
        out, attn, lse = forward(*on, **kw, **kept)
        grads = backward(torch.ones_like(out), *on, out, attn, lse, **kw, **kept)
        results[path] = [t.cpu() for t in (out, attn, lse, grads[0], grads[1], *grads[2])]
        assert out.shape == (batch * candidates, dim) and attn.shape == (batch * candidates, seq_len)
        assert grads[1].shape == keys.shape
    for path in paths:
        for a, b in zip(results[path], results["composite"]):
            torch.testing.assert_close(a, b.to(a.dtype), atol=1e-5, rtol=1e-4)
    # one history scored once per candidate: the sum of C single-candidate keys gradients
    forward, backward = ATTENTION_LAUNCHERS["composite"]
    single = torch.zeros_like(keys)
    for c in range(candidates):
        q_c = query.view(batch, candidates, dim)[:, c]
        out, attn, lse = forward(q_c, keys, lengths, weights, None, None, 1e-8, **kw)
        single += backward(torch.ones_like(out), q_c, keys, lengths, weights, None, None, 1e-8,
                           out, attn, lse, **kw)[1]
    torch.testing.assert_close(results["composite"][4], single.cpu(), atol=1e-5, rtol=1e-4)


def test_the_plan_names_the_candidates():
    cpu = torch.device("cpu")  # (the C++ backend's plan: CPU tensors, also where CUDA is the test default)
    keys, lengths = torch.randn(40, 130, 4, device=cpu), torch.randint(0, 131, (40,), device=cpu)
    weights = dk.LocalActivationUnit(4, (8,)).to(cpu).weights()
    previous = dk.get_backend()
    try:
        dk.set_backend("cpp")
        for shape in ((40, 4), (40, 1, 4), (40, 3, 4)):
            assert dk.explain(torch.randn(*shape, device=cpu), keys, lengths, weights).startswith("cpp:")
        dk.set_backend("torch")
        assert dk.explain(torch.randn(40, 3, 4, device=cpu), keys, lengths, weights).startswith("composite:")
        assert dk.explain(torch.randn(4, 3, 4, device=cpu), keys[:4, :30], lengths[:4].clamp(max=30),
                          weights).startswith("composite-small:")  # B x C x T = 360
    finally:
        dk.set_backend(previous)


@pytest.mark.parametrize("case", cases(Case(batch, seq_len, 5, candidates=candidates, activation=activation,
                                            normalize="softmax")
                                       for activation in ["sigmoid", "dice"]
                                       for batch, candidates, seq_len in [(1, 1000, 50), (3, 7, 13), (40, 3, 30),
                                                                          (2, 0, 4)]))
def test_scoring_without_gradients_matches_the_reference(backend, case):
    """Serving: no gradient (the C++ op then spreads one history's candidates over its blocks)."""
    problem = build(case)
    unit, options = unit_and_options(problem)
    query, keys, lengths = problem.query, problem.keys, problem.lengths
    with torch.no_grad():
        out, attn = unit(query, keys, lengths, return_scores=True)
        want_out, want_attn = reference.din_attention(query, keys, lengths, unit.weights(), return_scores=True,
                                                      **options)
        path = dk.explain(query, keys, lengths, unit.weights(), **options).split(":")[0]
    assert path == {"triton": "triton", "cpp": "cpp", "torch": "composite"}[backend] or (
        backend == "torch" and path == "composite-small")
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(attn, want_attn, atol=1e-5, rtol=1e-4)


def test_dice_training_statistics_span_every_candidate(backend):
    problem = build(Case(4, 9, 5, (8, 4), lengths=(9, 0, 2, 5), candidates=3, activation="dice"))
    unit, twin = problem.unit().train(), problem.unit().train()
    query, keys, lengths = problem.query.requires_grad_(), problem.keys, problem.lengths
    out = unit(query, keys, lengths)
    q_ref = query.detach().clone().requires_grad_()
    want = reference.din_attention(q_ref, keys, lengths, twin.weights(), activation="dice", training=True,
                                   alphas=[d.alpha for d in twin.dice],
                                   dice_stats=[(d.running_mean, d.running_var) for d in twin.dice])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    grad = torch.randn_like(out)
    torch.testing.assert_close(grads_of(out, [query], grad)[0], grads_of(want, [q_ref], grad)[0],
                               atol=1e-5, rtol=1e-4)
    for ours, theirs in zip(unit.dice, twin.dice):  # the running statistics moved the same way
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
        torch.testing.assert_close(ours.running_var, theirs.running_var)


@pytest.mark.parametrize("query,match", [
    (torch.randn(3, 2, 2, 4), "query must be"),
    (torch.randn(4, 2, 4), "B=3"),
    (torch.randn(3, 2, 5), "D=4"),
])
def test_bad_candidate_shapes_raise(query, match):
    weights = dk.LocalActivationUnit(4, (8,)).weights()
    with pytest.raises(ValueError, match=match):
        dk.din_attention(query, torch.randn(3, 6, 4), torch.tensor([6, 0, 2]), weights)


@pytest.mark.parametrize("dtype,tf32", [(torch.float32, True), (torch.bfloat16, False)])
@pytest.mark.parametrize("activation", ["sigmoid", "dice"])
@pytest.mark.parametrize("hidden", [(8,), (20, 12)])
@pytest.mark.parametrize("normalize", ["none", "softmax"])
def test_the_candidate_block_kernel(monkeypatch, dtype, tf32, activation, hidden, normalize):
    """"concat" with several candidates, TF32 or 16-bit: the forward kernel that reads each key tile once per
    block of candidates (2 or 4 of them, the last block partly empty here) equals the reference."""
    from din_kernels.testing import attention_fused

    blocks = []
    choose = attention_fused._candidate_block
    monkeypatch.setattr(attention_fused, "_candidate_block",
                        lambda c, *rest: blocks.append(choose(c, *rest)) or blocks[-1])
    # 7 candidates: blocks of 4 (Dice: 2), the last one padded with an empty candidate. The module keeps its own
    # initialization: the 16-bit tolerance below is sized for a freshly built module's weights (the builder's
    # larger ones and slopes make unnormalized bf16 sums over 40 positions err up to 0.04).
    problem = build(Case(3, 40, 5, hidden, lengths=(40, 0, 23), candidates=7, activation=activation,
                         normalize=normalize, dtype=dtype))
    unit = dk.LocalActivationUnit(5, hidden, activation=activation, normalize=normalize).eval().to(dtype)
    query, keys, lengths = problem.query, problem.keys, problem.lengths
    options = dict(activation=activation, normalize=normalize)
    if activation == "dice":
        options.update(alphas=[d.alpha.float() for d in unit.dice],
                       dice_stats=[(d.running_mean.float(), d.running_var.float()) for d in unit.dice])
    previous, previous_tf32 = dk.get_backend(), torch.backends.cuda.matmul.allow_tf32
    try:
        dk.set_backend("triton")
        torch.backends.cuda.matmul.allow_tf32 = tf32  # (fp32 without TF32 runs a program per candidate)
        with torch.no_grad():
            out, attn = unit(query, keys, lengths, return_scores=True)
    finally:
        dk.set_backend(previous)
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32
    assert blocks == [2 if activation == "dice" else 4]  # (Dice: blocks of 2, ``_candidate_block``)
    want_out, want_attn = reference.din_attention(query.float(), keys.float(), lengths,
                                                  [w.float() for w in unit.weights()], return_scores=True,
                                                  **options)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out.float(), want_out, **tol)
    torch.testing.assert_close(attn.float(), want_attn, **tol)
