"""MBA regularisation: the fused sparse steps, the MBA embedding and MBAEmbedding against reference.py.

Every kernel test runs on both paths (``backend`` fixture: Triton under the interpreter, torch composite).
Tables are wrapped in sentinel rows (``_table``): the interpreter does not bounds-check, so an unmasked or
mis-strided store would show up as a changed sentinel.
"""
import math

import pytest
import torch

import din_kernels as dk
from din_kernels import reference

N = 23  # rows; prime so that no block size divides it

# name -> flat ids; "repeated" is longer than one BLOCK_P chunk (16) of the segment loop
ID_CASES = {
    "duplicates": [3, 7, 3, 3, 22, 0, 7, 11, 3, 5],
    "single": [9],
    "repeated": [4] * 37,
    "empty": [],
}
# (dtype, atol, rtol): low precision tables compute in fp32 and round once, as the reference: 1 ulp apart at most;
# fp64 tables compute in fp64 on every path (din_kernels/_dtypes.py), the reference included
DTYPES = [(torch.float32, 1e-6, 1e-5), (torch.float16, 1e-3, 1e-3), (torch.bfloat16, 1e-2, 8e-3),
          (torch.float64, 1e-12, 1e-12)]


def _table(num_rows, dim, dtype, *, stride_pad=0):
    """A [num_rows, dim] table inside a larger buffer: one sentinel row above and below, and ``stride_pad``
    extra columns (a non-contiguous table) when asked. Returns (base, table view)."""
    base = torch.randn(num_rows + 2, dim + stride_pad).to(dtype)
    return base, base[1:-1, :dim]


def _inv_freq(num_rows):
    counts = torch.randint(1, 9, (num_rows,))
    return 1.0 / counts.float()


def _untouched(num_rows, ids):
    mask = torch.ones(num_rows, dtype=torch.bool)
    mask[torch.as_tensor(ids, dtype=torch.long)] = False
    return mask


# ----------------------------------------------------------------------------------------------------------
# Fused steps against the reference
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("case", list(ID_CASES))
@pytest.mark.parametrize("dim", [8, 5])
def test_sgd_matches_reference(backend, case, dim, dtype, atol, rtol):
    ids = torch.tensor(ID_CASES[case], dtype=torch.long)
    base, weight = _table(N, dim, dtype)
    grad_rows = torch.randn(ids.numel(), dim).to(dtype)
    inv_freq = _inv_freq(N)
    original = base.clone()
    expected = weight.clone()
    reference.mba_sgd_(expected, ids, grad_rows, inv_freq, 0.1, 0.7)

    out = dk.mba_sgd_(weight, ids, grad_rows, inv_freq, 0.1, 0.7)

    assert out is weight
    torch.testing.assert_close(weight.float(), expected.float(), atol=atol, rtol=rtol)
    rest = _untouched(N, ID_CASES[case])
    assert torch.equal(weight[rest], original[1:-1][rest])  # untouched rows bit-identical
    assert torch.equal(base[0], original[0]) and torch.equal(base[-1], original[-1])
    if case != "empty":
        assert not torch.equal(weight, original[1:-1])


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("case", list(ID_CASES))
@pytest.mark.parametrize("dim", [8, 5])
def test_adagrad_matches_reference(backend, case, dim, dtype, atol, rtol):
    ids = torch.tensor(ID_CASES[case], dtype=torch.long)
    base, weight = _table(N, dim, dtype)
    grad_rows = torch.randn(ids.numel(), dim).to(dtype)
    inv_freq = _inv_freq(N)
    state = torch.rand(N)
    original, original_state = base.clone(), state.clone()
    expected, expected_state = weight.clone(), state.clone()
    reference.mba_adagrad_(expected, expected_state, ids, grad_rows, inv_freq, 0.05, 0.3, eps=1e-10)

    dk.mba_adagrad_(weight, state, ids, grad_rows, inv_freq, 0.05, 0.3, eps=1e-10)

    torch.testing.assert_close(weight.float(), expected.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(state, expected_state, atol=1e-6, rtol=1e-5)
    rest = _untouched(N, ID_CASES[case])
    assert torch.equal(weight[rest], original[1:-1][rest])
    assert torch.equal(state[rest], original_state[rest])
    assert torch.equal(base[0], original[0]) and torch.equal(base[-1], original[-1])


def test_fp64_tables_are_computed_in_fp64(backend):
    """The precision contract: an fp64 table's step, by hand in fp64, to 1e-12 (fp32 arithmetic anywhere
    would leave errors near 1e-8 at these magnitudes)."""
    ids = torch.tensor([3, 7, 3, 11])
    weight = torch.randn(N, 6, dtype=torch.float64) * 10
    grad_rows = torch.randn(4, 6, dtype=torch.float64) * 10
    inv_freq = torch.rand(N, dtype=torch.float64) + 0.1
    expected = weight.clone()
    for j in (3, 7, 11):
        g = grad_rows[ids == j].sum(0) + 0.7 * inv_freq[j] * weight[j]
        expected[j] = weight[j] - 0.1 * g
    for step in (dk.mba_sgd_, reference.mba_sgd_):
        got = weight.clone()
        step(got, ids, grad_rows, inv_freq, 0.1, 0.7)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    state, expected_state = torch.rand(N, dtype=torch.float64), None
    expected = weight.clone()
    expected_state = state.clone()
    for j in (3, 7, 11):
        g = grad_rows[ids == j].sum(0) + 0.7 * inv_freq[j] * weight[j]
        expected_state[j] = state[j] + g.square().mean()
        expected[j] = weight[j] - 0.1 * g / (expected_state[j].sqrt() + 1e-10)
    for step in (dk.mba_adagrad_, reference.mba_adagrad_):
        got, got_state = weight.clone(), state.clone()
        step(got, got_state, ids, grad_rows, inv_freq, 0.1, 0.7)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(got_state, expected_state, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("op", ["sgd", "adagrad"])
def test_wide_rows_and_strided_table(backend, op):
    """D = 300 > 256 loops over D tiles (Adagrad: two passes); the table is a column slice (row stride 304)."""
    dim = 300
    ids = torch.tensor([2, 17, 2, 0, 22, 2], dtype=torch.int32)
    base, weight = _table(N, dim, torch.float32, stride_pad=4)
    grad_rows = torch.randn(ids.numel(), dim)
    inv_freq = _inv_freq(N)
    state = torch.rand(N)
    original = base.clone()
    expected, expected_state = weight.clone(), state.clone()
    if op == "sgd":
        reference.mba_sgd_(expected, ids.long(), grad_rows, inv_freq, 0.1, 0.5)
        dk.mba_sgd_(weight, ids, grad_rows, inv_freq, 0.1, 0.5)
    else:
        reference.mba_adagrad_(expected, expected_state, ids.long(), grad_rows, inv_freq, 0.1, 0.5)
        dk.mba_adagrad_(weight, state, ids, grad_rows, inv_freq, 0.1, 0.5)
        torch.testing.assert_close(state, expected_state, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weight, expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(base[:, dim:], original[:, dim:])  # the columns beside the table
    rest = _untouched(N, ids.tolist())
    assert torch.equal(weight[rest], original[1:-1, :dim][rest])


def test_batch_shaped_ids_and_low_precision_grads(backend):
    """ids [B, T] with grad_rows [B*T, D]; fp16 gradient rows are summed in fp32."""
    ids = torch.tensor([[1, 4, 4], [0, 1, 1]])
    weight = torch.randn(N, 6)
    grad_rows = torch.randn(6, 6).half()
    inv_freq = _inv_freq(N)
    expected = weight.clone()
    reference.mba_sgd_(expected, ids.reshape(-1), grad_rows, inv_freq, 0.2, 1.0)
    dk.mba_sgd_(weight, ids, grad_rows, inv_freq, 0.2, 1.0)
    torch.testing.assert_close(weight, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("op", ["sgd", "adagrad"])
def test_padding_idx_is_left_alone(backend, op):
    ids = torch.tensor([0, 3, 0, 5, 3])
    weight = torch.randn(N, 8)
    grad_rows = torch.randn(5, 8)
    inv_freq = _inv_freq(N)
    state = torch.rand(N)
    keep = ids != 0
    expected, expected_state = weight.clone(), state.clone()
    original_pad, original_state_pad = weight[0].clone(), state[0].clone()
    if op == "sgd":
        reference.mba_sgd_(expected, ids[keep], grad_rows[keep], inv_freq, 0.1, 0.5)
        dk.mba_sgd_(weight, ids, grad_rows, inv_freq, 0.1, 0.5, padding_idx=0)
    else:
        reference.mba_adagrad_(expected, expected_state, ids[keep], grad_rows[keep], inv_freq, 0.1, 0.5)
        dk.mba_adagrad_(weight, state, ids, grad_rows, inv_freq, 0.1, 0.5, padding_idx=0)
        assert torch.equal(state[0], original_state_pad)
    assert torch.equal(weight[0], original_pad)
    torch.testing.assert_close(weight, expected, atol=1e-6, rtol=1e-5)


def test_in_place_step_bumps_the_version(backend):
    """A graph that saved the table before a step must fail loudly, as after any in-place torch op."""
    weight = torch.randn(N, 4, requires_grad=True)
    loss = weight.pow(2).sum()  # saves weight
    dk.mba_sgd_(weight, torch.tensor([1]), torch.ones(1, 4), torch.ones(N), 0.1, 0.1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_strided_ids_lookup(backend):
    weight = torch.randn(N, 5)
    ids = torch.tensor([4, 0, 9, 0, 4, 0, 22, 0])[::2]  # a strided 1-D view
    assert torch.equal(dk.mba_embedding(ids, weight, torch.ones(N), 0.1), weight[ids])


def test_explicit_penalty_gives_the_same_step(backend):
    """SGD on a dense copy with ``lam/2 * sum_{j in unique(batch)} ||w_j||^2 / n_j`` added to the batch-mean
    loss, differentiated by autograd, equals the kernel's step on every row."""
    ids = torch.tensor([[2, 5, 2, 2], [7, 5, 0, 11]])
    weight = torch.randn(N, 8)
    inv_freq = _inv_freq(N)
    target = torch.randn(2, 4)
    lam, lr = 0.8, 0.3

    dense = weight.clone().requires_grad_()
    out = dense[ids]  # [B, T, D]
    loss = (out.sum(-1) - target).pow(2).mean()
    (grad_out,) = torch.autograd.grad(loss, out, retain_graph=True)
    unique = torch.unique(ids)
    penalty = lam / 2 * (dense[unique].pow(2).sum(-1) * inv_freq[unique]).sum()
    (dense_grad,) = torch.autograd.grad(loss + penalty, dense)
    expected = weight - lr * dense_grad

    dk.mba_sgd_(weight, ids, grad_out.reshape(-1, 8), inv_freq, lr, lam)
    torch.testing.assert_close(weight, expected, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# mba_embedding: gather forward, sparse coalesced backward
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("case", list(ID_CASES))
def test_mba_embedding_forward_and_sparse_grad(backend, case, dtype, atol, rtol):
    ids = torch.tensor(ID_CASES[case], dtype=torch.long).reshape(-1, 1 if case != "duplicates" else 2)
    weight = torch.randn(N, 7).to(dtype).requires_grad_()
    inv_freq = _inv_freq(N)
    grad_out = torch.randn(*ids.shape, 7).to(dtype)

    out = dk.mba_embedding(ids, weight, inv_freq, 0.6)
    (grad,) = torch.autograd.grad(out, weight, grad_out)
    ref_out = reference.mba_embedding(ids, weight, inv_freq, 0.6)
    (ref_grad,) = torch.autograd.grad(ref_out, weight, grad_out)

    assert out.shape == (*ids.shape, 7) and out.dtype == dtype
    assert torch.equal(out, weight.detach()[ids])  # a gather is exact
    assert grad.is_sparse and grad.is_coalesced() and grad.dtype == dtype and grad.shape == weight.shape
    assert torch.equal(grad._indices()[0], torch.unique(ids))
    torch.testing.assert_close(grad._values().float(), ref_grad._values().float(), atol=atol, rtol=rtol)


def test_mba_embedding_padding_left_out_of_the_gradient(backend):
    ids = torch.tensor([[0, 6, 6], [2, 0, 0]])
    weight = torch.randn(N, 4, requires_grad=True)
    inv_freq = _inv_freq(N)
    out = dk.mba_embedding(ids, weight, inv_freq, 0.5, padding_idx=0)
    (grad,) = torch.autograd.grad(out.sum(), weight)
    assert grad._indices()[0].tolist() == [2, 6]
    w = weight.detach()
    expected = torch.stack([1 + 0.5 * inv_freq[2] * w[2], 2 + 0.5 * inv_freq[6] * w[6]])
    torch.testing.assert_close(grad._values(), expected)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")  # torch.optim.Adagrad's own internal warning
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "sparse_adam"])
def test_sparse_grad_steps_torch_optimizers(backend, optimizer):
    ids = torch.tensor([3, 8, 3, 1])
    weight = torch.nn.Parameter(torch.randn(N, 6))
    inv_freq = _inv_freq(N)
    original = weight.detach().clone()
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1), "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
            "sparse_adam": lambda p: torch.optim.SparseAdam(p, lr=0.1)}[optimizer]
    opt = make([weight])
    dk.mba_embedding(ids, weight, inv_freq, 0.5).pow(2).sum().backward()
    assert weight.grad.is_sparse
    opt.step()
    rest = _untouched(N, ids.tolist())
    assert torch.equal(weight.detach()[rest], original[rest])
    assert not torch.equal(weight.detach()[~rest], original[~rest])
    if optimizer == "sgd":
        expected = original.clone()
        reference.mba_sgd_(expected, ids, 2 * original[ids], inv_freq, 0.1, 0.5)
        torch.testing.assert_close(weight.detach(), expected, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# MBAEmbedding: optimizer in backward, padding, frequencies
# ----------------------------------------------------------------------------------------------------------

def _modules(optimizer, dim=8, lam=0.4, lr=0.2, padding_idx=0, dtype=None):
    frequencies = torch.randint(1, 6, (N,))
    fused = dk.MBAEmbedding(N, dim, frequencies, lam, optimizer=optimizer, lr=lr, padding_idx=padding_idx,
                            dtype=dtype)
    explicit = dk.MBAEmbedding(N, dim, frequencies, lam, padding_idx=padding_idx, dtype=dtype)
    explicit.load_state_dict({"weight": fused.weight.detach().clone(), "inv_freq": fused.inv_freq},
                             strict=False)
    return fused, explicit


def _loss(out, target):
    return (out.float().sum(-1) - target).pow(2).mean()


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_fused_in_backward_equals_sparse_gradient_route(backend, optimizer):
    fused, explicit = _modules(optimizer)
    ids = torch.tensor([[0, 4, 4, 9], [13, 4, 0, 0], [22, 9, 1, 0]])
    target = torch.randn(3, 4)
    state = torch.zeros(N)
    for _ in range(2):  # two steps: the Adagrad state carries over
        _loss(fused(ids), target).backward()
        _loss(explicit(ids), target).backward()
        grad = explicit.weight.grad.coalesce()
        assert 0 not in grad._indices()[0].tolist()  # padding has no gradient
        with torch.no_grad():  # the sparse gradient already holds the MBA term: step it with lam = 0
            step = reference.mba_sgd_ if optimizer == "sgd" else (
                lambda w, *a: reference.mba_adagrad_(w, state, *a))
            step(explicit.weight, grad._indices()[0], grad._values(), explicit.inv_freq, 0.2, 0.0)
        explicit.weight.grad = None

    assert fused.weight.grad is None  # no gradient for the table was materialised
    torch.testing.assert_close(fused.weight, explicit.weight, atol=1e-6, rtol=1e-5)
    assert torch.equal(fused.weight[0], torch.zeros(8))  # padding stays as initialised
    if optimizer == "adagrad":
        torch.testing.assert_close(fused.state, state, atol=1e-6, rtol=1e-5)


def test_fused_module_matches_explicit_penalty(backend):
    """The module's in-backward SGD step equals autograd through the explicit penalty on a dense copy."""
    fused, _ = _modules("sgd", lam=0.9, lr=0.1, padding_idx=None)
    ids = torch.tensor([[5, 5, 2], [2, 17, 5]])
    target = torch.randn(2, 3)
    dense = fused.weight.detach().clone().requires_grad_()
    unique = torch.unique(ids)
    penalty = 0.9 / 2 * (dense[unique].pow(2).sum(-1) * fused.inv_freq[unique]).sum()
    (dense_grad,) = torch.autograd.grad(_loss(dense[ids], target) + penalty, dense)
    expected = dense.detach() - 0.1 * dense_grad

    _loss(fused(ids), target).backward()
    torch.testing.assert_close(fused.weight.detach(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_module_low_precision_table(backend, dtype):
    fused, explicit = _modules("sgd", dtype=dtype)
    ids = torch.tensor([[3, 3, 0, 8]])
    target = torch.randn(1, 4)
    out = fused(ids)
    assert out.dtype == dtype
    (grad_out,) = torch.autograd.grad(_loss(out, target), out, retain_graph=True)
    expected = explicit.weight.detach().clone()
    reference.mba_sgd_(expected, ids[ids != 0], grad_out[ids != 0], fused.inv_freq, 0.2, 0.4)
    torch.autograd.backward(out, grad_out)
    torch.testing.assert_close(fused.weight.detach().float(), expected.float(), atol=1e-3, rtol=8e-3)


def test_module_padding_lookup_and_no_grad(backend):
    fused, _ = _modules("adagrad")
    ids = torch.tensor([[0, 2], [0, 0]])
    out = fused(ids)
    assert torch.equal(out[0, 0], torch.zeros(8)) and torch.equal(out[0, 1], fused.weight.detach()[2])
    with torch.no_grad():
        looked_up = fused(ids)
    assert not looked_up.requires_grad and torch.equal(looked_up, out.detach())
    del out  # (its graph, never stepped: a fused table takes one lookup per step)
    empty = fused(torch.zeros(0, 3, dtype=torch.long))
    assert empty.shape == (0, 3, 8)
    before = fused.weight.detach().clone()
    empty.sum().backward()  # an empty batch steps nothing
    assert torch.equal(fused.weight.detach(), before)


def test_module_second_lookup_in_one_graph_raises():
    fused, _ = _modules("sgd")
    ids = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="one call"):
        fused(ids).sum() + fused(ids).sum()
    # the backward's own check stays for the lookups the module cannot see (the Function applied directly)
    from din_kernels.testing import mba_module
    weight, state = fused.weight, None
    apply = mba_module.MBAEmbeddingFunction.apply
    loss = sum(apply(ids, weight, fused.inv_freq, 0.1, 0, "sgd", 0.1, 1e-10, state, None).sum() for _ in range(2))
    with pytest.raises(RuntimeError, match="one call"):
        loss.backward()


def test_module_settable_lr_and_zero_frequency():
    frequencies = torch.tensor([0, 3, 0] + [1] * (N - 3))
    module = dk.MBAEmbedding(N, 4, frequencies, 0.5, optimizer="sgd", lr=0.1)
    assert module.inv_freq[2] == 0 and module.inv_freq[1] == pytest.approx(1 / 3)
    module(torch.tensor([0, 1])).sum().backward()  # row 0 is padding: its zero count is fine
    with pytest.raises(ValueError, match="contains 2"):
        module(torch.tensor([1, 2]))
    with torch.no_grad():
        module(torch.tensor([1, 2]))  # lookups that are not trained on are fine
    module.lam = 0.0
    module(torch.tensor([1, 2]))  # no penalty: frequencies do not matter
    module.lr = 0.5
    assert module.lr == 0.5
    with pytest.raises(ValueError, match="lr"):
        module.lr = -1.0
    assert "optimizer='sgd'" in repr(module)


def test_row_and_inverse_frequencies():
    ids = torch.tensor([[1, 3, 3], [3, 0, 1]])
    counts = dk.row_frequencies(ids, 5)
    assert counts.tolist() == [1, 2, 0, 3, 0]
    inv = dk.inverse_frequencies(counts)
    assert inv.dtype == torch.float32
    torch.testing.assert_close(inv, torch.tensor([1.0, 0.5, 0.0, 1 / 3, 0.0]))


# ----------------------------------------------------------------------------------------------------------
# Bad arguments: the right error class, raised before anything is written
# ----------------------------------------------------------------------------------------------------------

def _step_args(**changes):
    args = dict(weight=torch.randn(N, 4), ids=torch.tensor([1, 2]), grad_rows=torch.randn(2, 4),
                inv_freq=torch.ones(N), lr=0.1, lam=0.1)
    args.update(changes)
    return args


BAD_STEPS = [
    ("ids above N", dict(ids=torch.tensor([1, N])), IndexError, f"contains {N}"),
    ("negative id", dict(ids=torch.tensor([-1, 2])), IndexError, "contains -1"),
    ("float ids", dict(ids=torch.tensor([1.0, 2.0])), TypeError, "ids"),
    ("grad_rows shape", dict(grad_rows=torch.randn(3, 4)), ValueError, "grad_rows"),
    ("grad_rows dtype", dict(grad_rows=torch.ones(2, 4, dtype=torch.long)), TypeError, "grad_rows"),
    ("1-D weight", dict(weight=torch.randn(N)), ValueError, "weight"),
    ("inv_freq shape", dict(inv_freq=torch.ones(N + 1)), ValueError, "inv_freq"),
    ("negative inv_freq", dict(inv_freq=torch.full((N,), -1.0)), ValueError, "inv_freq"),
    ("nan inv_freq", dict(inv_freq=torch.full((N,), math.nan)), ValueError, "inv_freq"),
    ("negative lr", dict(lr=-0.1), ValueError, "lr"),
    ("nan lr", dict(lr=math.nan), ValueError, "lr"),
    ("inf lam", dict(lam=math.inf), ValueError, "lam"),
    ("string lam", dict(lam="0.1"), TypeError, "lam"),
]


@pytest.mark.parametrize("label,changes,error,match", BAD_STEPS, ids=[case[0] for case in BAD_STEPS])
def test_bad_step_arguments(backend, label, changes, error, match):
    args = _step_args(**changes)
    before = args["weight"].clone()
    with pytest.raises(error, match=match):
        dk.mba_sgd_(**args)
    state = torch.zeros(N)
    with pytest.raises(error, match=match):
        dk.mba_adagrad_(args["weight"], state, args["ids"], args["grad_rows"], args["inv_freq"], args["lr"],
                        args["lam"])
    assert torch.equal(args["weight"], before) and torch.equal(state, torch.zeros(N))


def test_bad_adagrad_and_embedding_arguments(backend):
    weight, ids, grad_rows, inv_freq = torch.randn(N, 4), torch.tensor([1, 2]), torch.randn(2, 4), torch.ones(N)
    with pytest.raises(ValueError, match="state"):
        dk.mba_adagrad_(weight, torch.zeros(N - 1), ids, grad_rows, inv_freq, 0.1, 0.1)
    with pytest.raises(ValueError, match="eps"):
        dk.mba_adagrad_(weight, torch.zeros(N), ids, grad_rows, inv_freq, 0.1, 0.1, eps=-1.0)
    with pytest.raises(ValueError, match="padding_idx"):
        dk.mba_sgd_(weight, ids, grad_rows, inv_freq, 0.1, 0.1, padding_idx=N)
    with pytest.raises(IndexError, match=f"contains {N + 3}"):
        dk.mba_embedding(torch.tensor([0, N + 3]), weight, inv_freq, 0.1)
    with pytest.raises(ValueError, match="lam"):
        dk.mba_embedding(ids, weight, inv_freq, -0.1)
    with pytest.raises(TypeError, match="padding_idx"):
        dk.mba_embedding(ids, weight, inv_freq, 0.1, padding_idx=1.0)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(optimizer="adam"), ValueError, "optimizer"),
    (dict(frequencies=torch.ones(N + 1, dtype=torch.long)), ValueError, "frequencies"),
    (dict(frequencies=torch.full((N,), -1)), ValueError, "frequencies"),
    (dict(frequencies=torch.ones(N, dtype=torch.bool)), TypeError, "frequencies"),
    (dict(padding_idx=N), ValueError, "padding_idx"),
    (dict(lr=math.inf), ValueError, "lr"),
    (dict(lam=-1.0), ValueError, "lam"),
    (dict(embedding_dim=0), ValueError, "embedding_dim"),
])
def test_bad_module_arguments(kwargs, error, match):
    args = dict(num_embeddings=N, embedding_dim=4, frequencies=torch.ones(N, dtype=torch.long), lam=0.1,
                optimizer="sgd")
    args.update(kwargs)
    with pytest.raises(error, match=match):
        dk.MBAEmbedding(**args)


def test_bad_module_ids():
    module = dk.MBAEmbedding(N, 4, torch.ones(N, dtype=torch.long), 0.1, optimizer="sgd")
    with pytest.raises(IndexError, match=f"contains {N}"):
        module(torch.tensor([N]))
    with pytest.raises(TypeError, match="ids"):
        module(torch.tensor([1.0]))


def test_fp64_module_keeps_its_adagrad_state_in_fp64():
    table = dk.MBAEmbedding(10, 4, torch.ones(10), lam=0.1, optimizer="adagrad", dtype=torch.float64)
    assert table.weight.dtype == torch.float64 and table.state.dtype == torch.float64
    assert dk.MBAEmbedding(10, 4, torch.ones(10), lam=0.1, optimizer="adagrad").state.dtype == torch.float32


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_a_fused_table_looked_up_twice_in_one_step_is_refused_before_any_update(backend, optimizer):
    table = dk.MBAEmbedding(10, 4, torch.ones(10), lam=0.1, optimizer=optimizer, lr=0.1)
    before = table.weight.detach().clone()
    first = table(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="looked up again before the previous lookup's backward"):
        table(torch.tensor([2, 3]))
    assert torch.equal(table.weight.detach(), before)  # nothing stepped
    first.sum().backward()  # the first lookup's step, then the next lookup is free
    stepped = table.weight.detach().clone()
    assert not torch.equal(stepped, before)
    table(torch.tensor([2, 3])).sum().backward()
    table(torch.tensor([4])).sum()  # a graph dropped without backward ...
    table(torch.tensor([5]))  # ... does not hold up the next lookup (its node is gone)
    table.eval()  # eval mode is not tracked (no step is expected there)
    kept = table(torch.tensor([1]))
    table(torch.tensor([2]))
    del kept
