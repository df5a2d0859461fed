"""The oracle itself: small hand-computed cases and float64 gradchecks of din_kernels.reference."""
import math

import pytest
import torch

from din_kernels import reference as ref
from problems import Case, build


def test_attention_hand_computed_none_and_softmax():
    # D=1, output layer only, scoring s_t = q: the pooled vector is q * sum of the valid keys (none)
    # or the mean of the valid keys (softmax over equal scores).
    query = torch.tensor([[2.0]])
    keys = torch.tensor([[[1.0], [3.0], [100.0]]])
    lengths = torch.tensor([2])
    weights = (torch.tensor([[1.0, 0.0, 0.0, 0.0]]), torch.tensor([0.0]))
    out, attn = ref.din_attention(query, keys, lengths, weights, return_scores=True)
    assert torch.allclose(out, torch.tensor([[8.0]]))
    assert torch.allclose(attn, torch.tensor([[2.0, 2.0, 0.0]]))
    out = ref.din_attention(query, keys, lengths, weights, normalize="softmax", scale=0.3)
    assert torch.allclose(out, torch.tensor([[2.0]]))


def test_attention_features_layout():
    query = torch.tensor([[1.0, 2.0]])
    keys = torch.tensor([[[3.0, 5.0]]])
    concat = ref.attention_features(query, keys, "concat")
    assert concat.tolist() == [[[1.0, 2.0, 3.0, 5.0, -2.0, -3.0, 3.0, 10.0]]]
    outer = ref.attention_features(query, keys, "outer")
    # element (a, c) = q_a * k_c at index 2D + a*D + c
    assert outer.tolist() == [[[1.0, 2.0, 3.0, 5.0, 3.0, 5.0, 6.0, 10.0]]]


def test_attention_empty_rows_are_zero_with_finite_gradients():
    query, keys, _, weights, _, _ = build(Case(2, 4, 3, (5,), lengths="empty"), requires_grad=True)
    for normalize in ("none", "softmax"):
        out = ref.din_attention(query, keys, torch.tensor([0, 0]), weights, normalize=normalize)
        assert torch.equal(out, torch.zeros(2, 3))
        grads = torch.autograd.grad(out.sum() + query.sum(), [query, keys] + weights, allow_unused=True)
        assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_attention_padding_is_ignored():
    query, keys, lengths, weights, _, _ = build(Case(3, 6, 4, (8, 4), lengths=(2, 6, 0)))
    noisy = keys.clone()
    noisy[0, 2:] = 1e3
    noisy[2] = -7.0
    for normalize in ("none", "softmax"):
        a = ref.din_attention(query, keys, lengths, weights, normalize=normalize)
        b = ref.din_attention(query, noisy, lengths, weights, normalize=normalize)
        assert torch.allclose(a, b)


@pytest.mark.parametrize("form", ["concat", "outer"])
@pytest.mark.parametrize("activation", ["sigmoid", "relu", "identity", "prelu", "dice"])
@pytest.mark.parametrize("normalize", ["none", "softmax"])
def test_attention_gradcheck(form, activation, normalize):
    # dice in training mode (batch statistics): no running statistics needed
    query, keys, lengths, weights, alphas, _ = build(
        Case(2, 3, 3, (4, 3), lengths=(3, 1), form=form, activation=activation, dtype=torch.float64),
        requires_grad=True)
    alphas = alphas or []

    def fn(q, k, *params):
        return ref.din_attention(q, k, lengths, params[:6], form=form, activation=activation,
                                 normalize=normalize, scale=0.7, alphas=params[6:] or None, training=True)

    assert torch.autograd.gradcheck(fn, (query, keys, *weights, *alphas))


def test_dice_hand_computed_and_running_stats():
    x = torch.tensor([[1.0], [3.0]])
    alpha = torch.tensor([0.5])
    running_mean, running_var = torch.zeros(1), torch.ones(1)
    out = ref.dice(x, alpha, running_mean, running_var, training=True, eps=0.0)
    p = torch.sigmoid(torch.tensor([[-1.0], [1.0]]))
    assert torch.allclose(out, p * x + (1 - p) * 0.5 * x)
    assert torch.allclose(running_mean, torch.tensor([0.2]))
    assert torch.allclose(running_var, torch.tensor([0.9 + 0.1 * 2.0]))  # unbiased variance 2
    # eval uses the running statistics
    out = ref.dice(x, alpha, torch.tensor([1.0]), torch.tensor([4.0]), training=False, eps=0.0)
    p = torch.sigmoid((x - 1.0) / 2.0)
    assert torch.allclose(out, p * x + (1 - p) * 0.5 * x)


def test_dice_mask_excludes_padding_from_statistics():
    x = torch.tensor([[[1.0], [3.0], [1e6]]])
    mask = torch.tensor([[True, True, False]])
    masked = ref.dice(x, torch.zeros(1), None, None, training=True, mask=mask)
    unpadded = ref.dice(x[:, :2], torch.zeros(1), None, None, training=True)
    assert torch.allclose(masked[:, :2], unpadded)


@pytest.mark.parametrize("masked", [False, True])
def test_dice_gradcheck(masked):
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    alpha = torch.rand(3, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(3, dtype=torch.float64, requires_grad=True)
    bias = torch.rand(3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]]) if masked else None
    fn = lambda x, a, w, b: ref.dice(x, a, None, None, training=True, mask=mask, weight=w, bias=b)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, alpha, weight, bias))


def test_mba_sgd_hand_computed_and_untouched_rows():
    weight = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    before = weight.clone()
    ids = torch.tensor([1, 1, 2])
    grad_rows = torch.tensor([[1.0, 0.0], [1.0, 2.0], [0.5, 0.5]])
    inv_freq = torch.tensor([1.0, 0.5, 0.25, 1.0])
    ref.mba_sgd_(weight, ids, grad_rows, inv_freq, lr=0.1, lam=0.2)
    # row 1: g = (2, 2), w - 0.1 * (g + 0.2 * 0.5 * w)
    assert torch.allclose(weight[1], torch.tensor([3.0 - 0.1 * (2 + 0.3), 4.0 - 0.1 * (2 + 0.4)]))
    assert torch.allclose(weight[2], torch.tensor([5.0 - 0.1 * (0.5 + 0.25), 6.0 - 0.1 * (0.5 + 0.3)]))
    assert torch.equal(weight[0], before[0]) and torch.equal(weight[3], before[3])


def test_mba_adagrad_hand_computed():
    weight = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    state = torch.tensor([0.0, 1.0])
    ids = torch.tensor([1])
    grad_rows = torch.tensor([[1.0, 1.0]])
    inv_freq = torch.tensor([1.0, 0.5])
    ref.mba_adagrad_(weight, state, ids, grad_rows, inv_freq, lr=0.1, lam=2.0, eps=0.0)
    grad = torch.tensor([1.0 + 3.0, 1.0 + 4.0])        # g + lam * inv_freq * w
    accumulated = 1.0 + (16.0 + 25.0) / 2               # state + mean(g'^2)
    assert torch.allclose(state, torch.tensor([0.0, accumulated]))
    assert torch.allclose(weight[1], torch.tensor([3.0, 4.0]) - 0.1 * grad / math.sqrt(accumulated))
    assert torch.equal(weight[0], torch.tensor([1.0, 2.0]))


def test_mba_embedding_gradient_is_coalesced_sparse_with_penalty():
    weight = torch.randn(5, 3, requires_grad=True)
    inv_freq = torch.tensor([1.0, 0.5, 0.25, 0.2, 1.0])
    ids = torch.tensor([[3, 1], [3, 3]])
    out = ref.mba_embedding(ids, weight, inv_freq, lam=0.1)
    assert torch.equal(out, weight.detach()[ids])
    upstream = torch.randn(2, 2, 3)
    (grad,) = torch.autograd.grad(out, weight, upstream)
    assert grad.is_sparse and grad.is_coalesced()
    assert grad._indices().tolist() == [[1, 3]]
    expected3 = upstream[0, 0] + upstream[1, 0] + upstream[1, 1] + 0.1 * 0.2 * weight.detach()[3]
    assert torch.allclose(grad.to_dense()[3], expected3)
    assert torch.allclose(grad.to_dense()[1], upstream[0, 1] + 0.1 * 0.5 * weight.detach()[1])


def test_row_frequencies():
    counts = ref.row_frequencies(torch.tensor([[0, 2], [2, 2]]), 4)
    assert counts.tolist() == [1, 0, 3, 0]
