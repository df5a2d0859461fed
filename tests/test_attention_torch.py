"""The CPU paths of the local activation unit, launcher by launcher, against ``reference.din_attention``: the
torch composite path (``din_kernels/attention/composite.py``: chunked, and its small autograd variant,
``small.py``) and the C++ op (``cpu.py``, with and without kept activations): forward, the [B, T] weights, the
softmax log-sum-exp and every gradient (query, keys, each weight and bias, the prelu/dice slopes), fp32 and
low precision; fp64 gradcheck through a test-local autograd.Function; chunking (several chunks, lengths
unsorted) and edge shapes. C++-only behaviour (blocks, threads, build and fallback): test_attention_cpu.py."""
import math

import pytest
import torch

from din_kernels import reference
from din_kernels.testing import attention_composite as at
from din_kernels.testing import attention_cpu as ac
from din_kernels.testing import attention_first_layer, attention_small
from problems import WEIRD_SHAPES, Case, build, cases

FORMS = ("concat", "outer")
ACTIVATIONS = ("sigmoid", "relu", "identity", "prelu", "dice")


def reference_grads(query, keys, lengths, weights, alphas, dice_eval, grad_out, **options):
    """out, attn and the gradients of <out, grad_out> with respect to query, keys, weights, alphas."""
    leaves = [t.detach().clone().requires_grad_() for t in [query, keys, *weights, *(alphas or [])]]
    q, k, ws, als = leaves[0], leaves[1], leaves[2:2 + len(weights)], leaves[2 + len(weights):]
    out, attn = reference.din_attention(q, k, lengths, ws, return_scores=True, alphas=als or None,
                                        dice_stats=dice_eval, training=False, eps=1e-8, **options)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), attn.detach(), grads


def small(query, keys, lengths, weights, alphas, dice_eval, grad_out, **options):
    """``attention_torch_small`` (autograd) in the shape of ``composite``'s results; lse is None."""
    leaves = [t.detach().clone().requires_grad_() for t in [query, keys, *weights, *(alphas or [])]]
    q, k, ws, als = leaves[0], leaves[1], leaves[2:2 + len(weights)], leaves[2 + len(weights):]
    out, attn = attention_small(q, k, lengths, tuple(ws), tuple(als) if alphas is not None else None,
                                         dice_eval, 1e-8, **options)
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]  # e.g. B=0 or T=0
    return out.detach(), attn.detach(), None, grads


def composite(query, keys, lengths, weights, alphas, dice_eval, grad_out, **options):
    out, attn, lse = at.attention_torch_forward(query, keys, lengths, tuple(weights),
                                                None if alphas is None else tuple(alphas), dice_eval, 1e-8,
                                                **options)
    dq, dk, dws, das = at.attention_torch_backward(grad_out, query, keys, lengths, tuple(weights),
                                                   None if alphas is None else tuple(alphas), dice_eval, 1e-8,
                                                   out, attn, lse, **options)
    return out, attn, lse, [dq, dk, *dws, *(das or ())]


def expected_lse(query, keys, lengths, weights, alphas, dice_eval, *, scale, **options):
    """log-sum-exp of the scaled scores over the valid positions, from the reference MLP."""
    h = reference.attention_features(query.double(), keys.double(), options["form"])
    for layer in range(len(weights) // 2 - 1):
        h = torch.nn.functional.linear(h, weights[2 * layer].double(), weights[2 * layer + 1].double())
        h = reference._hidden_activation(
            h, options["activation"], layer, None, None if alphas is None else [a.double() for a in alphas],
            None if dice_eval is None else [(m.double(), v.double()) for m, v in dice_eval], False, 0.1, 1e-8)
    scores = torch.nn.functional.linear(h, weights[-2].double(), weights[-1].double()).squeeze(-1)
    scores = scores * (1.0 if scale is None else scale)
    valid = reference.valid_mask(lengths, keys.shape[1])
    return torch.logsumexp(scores.masked_fill(~valid, -math.inf), dim=1)


def cpp(query, keys, lengths, weights, alphas, dice_eval, grad_out, *, kept=None, **options):
    """The C++ op's launchers; ``kept=[]`` keeps the forward's activations for the backward."""
    alphas = None if alphas is None else tuple(alphas)
    out, attn, lse = ac.attention_cpu_forward(query, keys, lengths, tuple(weights), alphas, dice_eval, 1e-8,
                                              kept=kept, **options)
    dq, dk, dws, das = ac.attention_cpu_backward(grad_out, query, keys, lengths, tuple(weights), alphas,
                                                 dice_eval, 1e-8, out, attn, lse, kept=kept, **options)
    return out, attn, lse, [dq, dk, *dws, *(das or ())]


def cpp_kept(*args, **options):
    return cpp(*args, kept=[], **options)


PATHS = {"chunked": composite, "small": small, "cpp": cpp, "cpp-kept": cpp_kept}


def assert_matches(problem, options, atol=1e-5, rtol=1e-4, path="chunked"):
    query, keys, lengths, weights, alphas, dice_eval = problem
    grad_out = torch.randn_like(query)
    out_ref, attn_ref, grads_ref = reference_grads(*problem, grad_out, **options)
    out, attn, lse, grads = PATHS[path](*problem, grad_out, **options)
    assert out.dtype == query.dtype and out.shape == query.shape
    torch.testing.assert_close(out, out_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(attn, attn_ref.to(attn.dtype), atol=atol, rtol=rtol)
    assert torch.all(attn[~reference.valid_mask(lengths, keys.shape[1])] == 0)
    if lse is None:  # the small path keeps no log-sum-exp
        pass
    elif options["normalize"] == "softmax":
        lse_ref = expected_lse(query, keys, lengths, weights, alphas, dice_eval, **options)
        nonempty = lengths > 0
        torch.testing.assert_close(lse[nonempty].double(), lse_ref[nonempty], atol=atol, rtol=rtol)
        assert torch.isfinite(lse).all()
    else:
        assert lse.numel() == 0
    names = ["query", "keys"] + [f"weights[{i}]" for i in range(len(weights))] + \
        [f"alphas[{i}]" for i in range(len(alphas or []))]
    assert len(grads) == len(grads_ref)
    for name, got, want in zip(names, grads, grads_ref):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------------------------------------
# fp32 against the reference: every form x activation x normalization, nominal and weird shapes
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", cases(
    Case(6, 9, 5, (8, 4), lengths=(9, 0, 3, 1, 7, 9), form=form, activation=activation, normalize=normalize,
         scale=scale)
    for form in FORMS for activation in ACTIVATIONS
    for normalize, scale in [("none", None), ("softmax", None), ("softmax", 0.4), ("none", 1.7)]))
def test_matches_reference(case, path):
    assert_matches(build(case), case.options(), path=path)


@pytest.mark.parametrize("path", ["chunked", "small"])
@pytest.mark.parametrize("normalize", ["none", "softmax"])
@pytest.mark.parametrize("form", FORMS)
def test_an_activation_without_fused_kernels_runs_on_the_composite_paths(form, normalize, path):
    # tanh: a registry entry without a kernel code, so only the composite paths take it
    problem = build(Case(6, 9, 5, (8, 4), form=form, activation="tanh", lengths=(9, 0, 3, 1, 7, 9)))
    assert_matches(problem, dict(form=form, activation="tanh", normalize=normalize, scale=None), path=path)
    with pytest.raises(ValueError, match="no C\\+\\+ kernel"):
        cpp(*problem, torch.randn(6, 5), form=form, activation="tanh", normalize=normalize, scale=None)


@pytest.mark.parametrize("case", cases(WEIRD_SHAPES, [
    Case(4, 8, 4, (6, 5, 4, 3), lengths="full"),      # four hidden layers, full histories (in-order chunks)
    Case(5, 11, 6, (9, 2), lengths=(1, 2, 3, 4, 11)),  # increasing lengths: the sort reverses them
]))
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("normalize", ["none", "softmax"])
def test_weird_shapes(case, normalize, path):
    for form, activation in (("concat", "sigmoid"), ("outer", "dice")):
        variant = case.replace(form=form, activation=activation, normalize=normalize)
        assert_matches(build(variant), variant.options(), path=path)


@pytest.mark.parametrize("chunk_floats", [1, 300, 2000])
@pytest.mark.parametrize("normalize", ["none", "softmax"])
def test_many_chunks_unsorted_lengths(monkeypatch, chunk_floats, normalize):
    """Chunks of a row (or a few) at a time, gathered out of order and cut to their longest history."""
    monkeypatch.setattr(at, "CHUNK_FLOATS", chunk_floats)
    problem = build(Case(17, 10, 6, (7, 5), activation="prelu"))
    assert_matches(problem, dict(form="concat", activation="prelu", normalize=normalize, scale=0.5))
    problem = build(Case(9, 10, 6, (7, 5), form="outer", activation="sigmoid", lengths="full"))
    assert_matches(problem, dict(form="outer", activation="sigmoid", normalize=normalize, scale=None))


@pytest.mark.parametrize("normalize", ["none", "softmax"])
def test_both_first_layer_strategies(monkeypatch, normalize):
    """concat applies M_b per row (bmm) for long chunks and per position (one GEMM over [k, k*q]) for chunks
    with Tc <= PER_POSITION_MAX_LEN; one call with chunks of every length takes both."""
    monkeypatch.setattr(at, "CHUNK_FLOATS", 400)
    monkeypatch.setattr(attention_first_layer, "PER_POSITION_MAX_LEN", 6)
    used = []
    per_position = attention_first_layer.FirstLayer.per_position

    def spy(self, length):
        used.append(per_position(self, length))
        return used[-1]

    monkeypatch.setattr(attention_first_layer.FirstLayer, "per_position", spy)
    problem = build(Case(14, 12, 8, (9, 5), lengths=tuple(range(13)) + (12,)))
    assert_matches(problem, dict(form="concat", activation="sigmoid", normalize=normalize, scale=None))
    assert True in used and False in used


@pytest.mark.parametrize("form", FORMS)
def test_first_layer_whole_batch_reduction(form):
    """``FirstLayer.row_grads`` (the Triton launchers' reduction of every row's dM at once) gives the chunk path's
    dq, dW1 and db1 (``m_backward``), and no op in it outputs a tensor of dM's size (on a GPU each would be
    one more write and read of the kernels' largest output)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    rows, dim, hidden = 11, 5, 6  # dM's 330 elements: more than any weight or its gradient
    in_width = 4 * dim if form == "concat" else 2 * dim + dim * dim
    w1, b1 = torch.randn(hidden, in_width, dtype=torch.float64), torch.randn(hidden, dtype=torch.float64)
    q, du = torch.randn(rows, dim, dtype=torch.float64), torch.randn(rows, hidden, dtype=torch.float64)
    dm = torch.randn(rows, dim, hidden, dtype=torch.float64)

    class Sizes(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(a, torch.Tensor)}
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:  # not a view
                    self.largest = max(self.largest, t.numel())
            return out

    first = attention_first_layer.FirstLayer(w1, b1, dim, form, torch.float64)
    with Sizes() as sizes:
        got = first.row_grads(q, du, dm, w1, b1)
    assert sizes.largest < dm.numel()
    chunked = attention_first_layer.FirstLayer(w1, b1, dim, form, torch.float64)
    chunked.start_backward()
    dq = chunked.m_backward(q, dm, chunked.u_backward(q, du))
    for g, want in zip(got, (dq, *chunked.weight_grads(w1, b1))):
        torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ["prelu", "dice"])
def test_shared_slope_broadcasts(activation):
    """A slope tensor with one entry (nn.PReLU()) is shared by every unit; its gradient is the sum."""
    problem = build(Case(4, 6, 3, (5, 4), activation=activation, shared_alpha=True, lengths=(6, 2, 0, 5)))
    assert_matches(problem, dict(form="concat", activation=activation, normalize="softmax", scale=None))


def test_padding_values_are_ignored():
    query, keys, lengths, weights, alphas, dice_eval = build(Case(3, 7, 4, (6, 3), lengths=(2, 7, 0)))
    noisy = keys.clone()
    noisy[0, 2:] = 1e4
    noisy[2] = float("nan")
    grad_out = torch.randn_like(query)
    options = dict(form="concat", activation="sigmoid", normalize="softmax", scale=None)
    clean = composite(query, keys, lengths, weights, alphas, dice_eval, grad_out, **options)
    dirty = composite(query, noisy, lengths, weights, alphas, dice_eval, grad_out, **options)
    assert torch.equal(clean[0], dirty[0])
    for got, want in zip(dirty[3], clean[3]):
        assert torch.equal(got, want)


def test_noncontiguous_inputs():
    problem = build(Case(4, 10, 5, (6, 3), lengths=(10, 3, 7, 0)))
    wide = torch.randn(4, 20, 10)
    wide[:, ::2, ::2] = problem.keys
    problem = problem.replace(query=torch.randn(5, 4).t(), keys=wide[:, ::2, ::2])
    assert not problem.keys.is_contiguous() and not problem.query.is_contiguous()
    assert_matches(problem, dict(form="concat", activation="sigmoid", normalize="none", scale=None))


# --------------------------------------------------------------------------------------------------------
# low precision: computed in fp32, so no worse than torch's own low-precision reference (flash-attn rule)
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("normalize", ["none", "softmax"])
def test_low_precision(dtype, normalize, path):
    options = dict(form="concat", activation="sigmoid", normalize=normalize, scale=None)
    query, keys, lengths, weights, alphas, dice_eval = build(Case(8, 12, 6, (10, 5)))
    grad_out = torch.randn_like(query)
    want_out, _, want = reference_grads(query, keys, lengths, weights, alphas, dice_eval, grad_out, **options)
    low = [t.to(dtype) for t in (query, keys, *weights)]
    lp_out, _, lp_grads = reference_grads(low[0], low[1], lengths, low[2:], None, None, grad_out.to(dtype),
                                          **options)
    out, attn, lse, grads = PATHS[path](low[0], low[1], lengths, low[2:], None, None, grad_out.to(dtype),
                                        **options)
    assert out.dtype == dtype and attn.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    atol = 1e-2
    for got, lp, ref in zip([out, *grads], [lp_out, *lp_grads], [want_out, *want]):
        err = (got.float() - ref).abs().max().item()
        err_lp = (lp.float() - ref).abs().max().item()
        assert err <= 2 * err_lp + atol, (err, err_lp)


# --------------------------------------------------------------------------------------------------------
# fp64 gradcheck through an autograd.Function around the two launchers
# --------------------------------------------------------------------------------------------------------

LAUNCHERS = {"chunked": (at.attention_torch_forward, at.attention_torch_backward),
             "cpp": (ac.attention_cpu_forward, ac.attention_cpu_backward)}


class _LauncherFunction(torch.autograd.Function):
    """A pair of launchers (``LAUNCHERS``) as an autograd.Function, for gradcheck."""

    @staticmethod
    def forward(ctx, query, keys, lengths, path, options, n_weights, *params):
        weights, alphas = params[:n_weights], params[n_weights:]
        options = dict(options)
        dice_eval = options.pop("dice_eval")
        out, attn, lse = LAUNCHERS[path][0](query, keys, lengths, weights, alphas or None, dice_eval, 1e-8,
                                            **options)
        ctx.save_for_backward(query, keys, lengths, out, attn, lse, *params)
        ctx.path, ctx.options, ctx.dice_eval, ctx.n_weights = path, options, dice_eval, n_weights
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, keys, lengths, out, attn, lse, *params = ctx.saved_tensors
        weights, alphas = tuple(params[:ctx.n_weights]), tuple(params[ctx.n_weights:])
        dq, dk, dws, das = LAUNCHERS[ctx.path][1](grad_out, query, keys, lengths, weights, alphas or None,
                                                  ctx.dice_eval, 1e-8, out, attn, lse, **ctx.options)
        return (dq, dk, None, None, None, None, *dws, *(das or ()))


@pytest.mark.parametrize("path", LAUNCHERS)
@pytest.mark.parametrize("form,activation,normalize,scale", [
    ("concat", "sigmoid", "none", None),
    ("concat", "prelu", "softmax", 0.5),
    ("outer", "dice", "softmax", None),
    ("outer", "relu", "none", 2.0),
    ("concat", "identity", "softmax", None),
])
def test_gradcheck_fp64(monkeypatch, form, activation, normalize, scale, path):
    monkeypatch.setattr(at, "CHUNK_FLOATS", 1)  # a chunk per row, out of order; Tc=1 runs per position
    query, keys, lengths, weights, alphas, dice_eval = build(
        Case(4, 5, 3, (4, 3), form=form, activation=activation, lengths=(3, 5, 0, 1), dtype=torch.float64),
        requires_grad=True)
    params = [*weights, *(alphas or ())]

    def fn(q, k, *p):
        options = dict(form=form, activation=activation, normalize=normalize, scale=scale, dice_eval=dice_eval)
        return _LauncherFunction.apply(q, k, lengths, path, options, len(weights), *p)

    assert torch.autograd.gradcheck(fn, (query, keys, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("form,activation,normalize,scale", [
    ("concat", "prelu", "softmax", 0.5),
    ("outer", "dice", "softmax", None),
    ("concat", "sigmoid", "none", 2.0),
])
def test_gradcheck_fp64_small_path(form, activation, normalize, scale):
    query, keys, lengths, weights, alphas, dice_eval = build(
        Case(4, 5, 3, (4, 3), form=form, activation=activation, lengths=(3, 5, 0, 1), dtype=torch.float64),
        requires_grad=True)
    params = [*weights, *(alphas or ())]

    def fn(q, k, *p):
        ws, als = p[:len(weights)], p[len(weights):]
        return attention_small(q, k, lengths, ws, als or None, dice_eval, 1e-8, form=form,
                                        activation=activation, normalize=normalize, scale=scale)[0]

    inputs = (query, keys, *params)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------
# launcher arguments
# --------------------------------------------------------------------------------------------------------

def test_launcher_rejects_bad_options():
    query, keys, lengths, weights, _, _ = build(Case(2, 3, 2, (3,), lengths=(3, 1)))
    options = dict(form="concat", activation="sigmoid", normalize="none", scale=None)

    def forward(weights=weights, alphas=None, dice_eval=None, **change):
        return at.attention_torch_forward(query, keys, lengths, weights, alphas, dice_eval, 1e-8,
                                          **{**options, **change})

    for change, match in [(dict(activation="swish"), "activation"), (dict(form="dot"), "form"),
                          (dict(normalize="sum"), "normalize"), (dict(activation="prelu"), "alphas"),
                          (dict(activation="dice", alphas=(torch.zeros(3),)), "dice_eval"),
                          (dict(weights=weights[-2:]), "hidden layer")]:
        with pytest.raises(ValueError, match=match):
            forward(**change)


@pytest.mark.parametrize("form", ["concat", "outer"])
def test_workspace_sized_once_for_the_largest_chunk(monkeypatch, form):
    """Chunks grow in rows as the sorted histories get shorter; each scratch buffer is still allocated once
    per call (a buffer grown chunk by chunk faults in fresh pages every time)."""
    monkeypatch.setattr(at, "CHUNK_FLOATS", 3000)
    monkeypatch.setattr(attention_first_layer, "PER_POSITION_MAX_LEN", 3)
    storages = {}
    take = at.Workspace.take

    def spy(self, name, *shape):
        buffer = take(self, name, *shape)
        # keyed by the workspace itself (kept alive, so no later workspace reuses its id or memory)
        storages.setdefault((self, name), set()).add(buffer.untyped_storage().data_ptr())
        return buffer

    monkeypatch.setattr(at.Workspace, "take", spy)
    problem = build(Case(40, 12, 6, (7, 5), form=form))
    assert_matches(problem, dict(form=form, activation="sigmoid", normalize="none", scale=None))
    assert storages and all(len(pointers) == 1 for pointers in storages.values())


def test_chunks_split_rows_evenly():
    """No last sliver of a chunk: the rows left at a length are spread evenly over the chunks they need."""
    floats = lambda length: (313, 5760)  # D=36, H=(80, 40), per row
    macs = lambda length: 24_480
    chunks = at._row_chunks(torch.full((1024,), 100), 100, 1024, floats, macs)
    sizes = [at._row_count(rows) for rows, _ in chunks]
    assert sum(sizes) == 1024 and max(sizes) - min(sizes) <= 1
    assert max(sizes) * (100 * 313 + 5760) <= at.CHUNK_FLOATS
    lengths = torch.tensor([0, 7, 3, 0, 7, 1])
    chunks = at._row_chunks(lengths, 7, 6, floats, macs)
    assert [(rows.tolist(), length) for rows, length in chunks] == [([1, 4, 2, 5], 7)]  # empty rows left out


def test_chunks_end_where_the_histories_get_shorter_if_that_pays():
    """A few long histories and many short ones (Amazon-like): the long ones get a chunk of their own rather
    than padding every short one to their length; a small saving does not pay for one more chunk."""
    floats = lambda length: (313, 5760)
    macs = lambda length: 24_480
    lengths = torch.tensor([50] * 20 + [8] * 236)
    chunks = at._row_chunks(lengths, 50, 256, floats, macs)
    assert [(at._row_count(rows), length) for rows, length in chunks] == [(20, 50), (236, 8)]
    # 240 short rows padded by 1: 240 * 1 * 24,480 multiply-adds saved < CHUNK_OVERHEAD_MACS (24 M)
    lengths = torch.tensor([9] * 16 + [8] * 240)
    chunks = at._row_chunks(lengths, 9, 256, floats, macs)
    assert [(at._row_count(rows), length) for rows, length in chunks] == [(256, 9)]


@pytest.mark.parametrize("form,activation,normalize", [
    ("concat", "sigmoid", "none"), ("concat", "prelu", "softmax"), ("outer", "dice", "softmax"),
])
@pytest.mark.parametrize("keep_floats", [0, 3000, 10 ** 9])
def test_kept_activations_skip_the_recompute_with_the_same_results(monkeypatch, form, activation, normalize,
                                                                   keep_floats):
    """The forward keeps its first chunks' activations (none, some, all); the backward uses them instead of
    recomputing: the same numbers bit for bit, within the budget, and reusable (a second backward)."""
    monkeypatch.setattr(at, "CHUNK_FLOATS", 2500)  # several chunks, both first-layer strategies for concat
    monkeypatch.setattr(attention_first_layer, "PER_POSITION_MAX_LEN", 5)
    monkeypatch.setattr(at, "KEEP_FLOATS", keep_floats)
    query, keys, lengths, weights, alphas, dice_eval = build(Case(30, 11, 6, (7, 5), form=form,
                                                                  activation=activation))
    options = dict(form=form, activation=activation, normalize=normalize, scale=0.5)
    args = (query, keys, lengths, weights, alphas, dice_eval, 1e-8)
    grad_out = torch.randn_like(query)

    plain = at.attention_torch_forward(*args, **options)
    kept = []
    forward = at.attention_torch_forward(*args, **options, kept=kept)
    for a, b in zip(plain, forward):
        assert torch.equal(a, b)
    mlp = at._MLP(weights, 6, form, activation, alphas, dice_eval, 1e-8, torch.float32, keys.device)
    chunks = mlp.plan(lengths, 11, 30)
    assert len(chunks) > 2
    sizes = [mlp.kept_floats(at._row_count(rows), length) for rows, length in chunks]
    expected = 0
    while expected < len(chunks) and sum(sizes[:expected + 1]) <= keep_floats:
        expected += 1
    assert len(kept) == expected
    if 0 < keep_floats < 10 ** 9:
        assert 0 < expected < len(chunks)  # some chunks kept, the rest recomputed

    def flat(grads):
        dquery, dkeys, dweights, dalphas = grads
        return [dquery, dkeys, *dweights, *(dalphas or ())]

    recomputed = flat(at.attention_torch_backward(grad_out, *args, *plain, **options))
    for _ in range(2):  # the kept tensors are read, never written
        reused = flat(at.attention_torch_backward(grad_out, *args, *forward, **options, kept=kept))
        for a, b in zip(recomputed, reused):
            assert torch.equal(a, b)
