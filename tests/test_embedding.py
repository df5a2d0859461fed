"""``din_kernels.embedding_concat``: several tables looked up into one concatenated output, against
``torch.cat`` of ``F.embedding`` (values and gradients) on every path, the C++ accumulation bit for bit
equal to ``index_add_``; bad arguments refused naming the argument."""
import pytest
import torch
import torch.nn.functional as F

import din_kernels as dk
from din_kernels.testing import cpu_extension


def tables_and_ids(shape=(4, 7), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(30, 5, generator=g, dtype=dtype).requires_grad_(),
               torch.randn(7, 3, generator=g, dtype=dtype).requires_grad_(),
               torch.randn(1, 2, generator=g, dtype=dtype).requires_grad_()]
    ids = [torch.randint(0, w.shape[0], shape, generator=g) for w in weights]
    return weights, ids


@pytest.mark.parametrize("shape", [(4, 7), (13,), (0, 3), (2, 1, 5)], ids=["B4-T7", "N13", "empty", "B2-C1-T5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_cat_of_embeddings(backend, shape, dtype):
    weights, ids = tables_and_ids(shape, dtype)
    padding = [0, None, None]
    out = dk.embedding_concat(weights, ids, padding)
    want = torch.cat([F.embedding(i, w, padding_idx=p) for i, w, p in zip(ids, weights, padding)], dim=-1)
    assert out.shape == (*shape, 10)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    grad = torch.randn(out.shape, dtype=dtype)
    got = torch.autograd.grad(out, weights, grad)
    expected = torch.autograd.grad(want, weights, grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    assert bool((got[0][0] == 0).all())  # the padding row


def test_cpp_accumulation_is_index_add_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    index = torch.randint(0, 50, (20_000,), generator=g)  # many repeats: the order of additions matters
    source = torch.randn(20_000, 18, generator=g)
    got = cpu_extension.ops().index_add_rows(torch.zeros(50, 18), index, source)
    assert torch.equal(got, torch.zeros(50, 18).index_add_(0, index, source))


def test_int32_ids_and_a_single_table():
    weights, ids = tables_and_ids()
    out = dk.embedding_concat(weights[:1], [ids[0].to(torch.int32)])
    torch.testing.assert_close(out, F.embedding(ids[0], weights[0]), rtol=0, atol=0)


@pytest.mark.parametrize("change,error,match", [
    (lambda w, i, p: (w, [i[0], i[1] + 100, i[2]], p), IndexError, r"ids\[1\] must lie in \[0, 7\)"),
    (lambda w, i, p: (w, [i[0], i[1], i[2] - 1], p), IndexError, r"ids\[2\] must lie in \[0, 1\)"),
    (lambda w, i, p: (w, i[:2], p), ValueError, "one ids tensor per weight"),
    (lambda w, i, p: (w, [i[0], i[1][:2], i[2]], p), ValueError, r"ids\[1\] must have ids\[0\]'s shape"),
    (lambda w, i, p: (w, [i[0].float(), i[1], i[2]], p), TypeError, r"ids\[0\] must be an int64 or int32"),
    (lambda w, i, p: ([w[0], w[1].double(), w[2]], i, p), ValueError, r"weights\[1\] must share"),
    (lambda w, i, p: ([w[0], w[1][0], w[2]], i, p), TypeError, r"weights\[1\] must be a floating \[N, D\]"),
    (lambda w, i, p: (w, i, [0, None]), ValueError, "padding_idx needs one entry per weight"),
    (lambda w, i, p: (w, i, [0, 7, None]), ValueError, r"padding_idx\[1\] must be None or a row"),
])
def test_bad_arguments_raise(change, error, match):
    weights, ids = tables_and_ids()
    with pytest.raises(error, match=match):
        dk.embedding_concat(*change(weights, ids, [0, None, None]))
