"""The training step's fast paths give the same results as the plain ones: the dense embedding lookup with an
index_add backward, the item split, the fused optimisers, and the CLI's thread set-up."""
import pytest
import torch
from torch import nn

import din_kernels as dk
from din.cli import configure_threads, keep_freed_memory
from din.features import ItemEmbedding, lookup, lookup_concat
from din.train import make_optimizer


def test_dense_lookup_matches_nn_embedding():
    table = nn.Embedding(30, 5, padding_idx=0)
    ids = torch.tensor([[0, 3, 3, 29], [7, 0, 3, 1]])
    grad = torch.randn(2, 4, 5)
    out = lookup(table, ids)
    (want_grad,) = torch.autograd.grad(table(ids), table.weight, grad)
    (got_grad,) = torch.autograd.grad(out, table.weight, grad)
    torch.testing.assert_close(out, table(ids))
    torch.testing.assert_close(got_grad, want_grad)
    assert torch.all(got_grad[0] == 0)  # padding row


@pytest.mark.parametrize("grad_enabled", [True, False])
def test_concatenated_lookup_matches_cat_of_embeddings(grad_enabled):
    tables = [nn.Embedding(30, 5, padding_idx=0), nn.Embedding(7, 3, padding_idx=None), nn.Embedding(4, 1)]
    ids = [torch.tensor([[0, 3, 3, 29], [7, 0, 3, 1]]), torch.tensor([[6, 6, 0, 2], [1, 1, 1, 5]]),
           torch.tensor([[0, 1, 2, 3], [3, 3, 3, 3]])]
    with torch.set_grad_enabled(grad_enabled):
        out = lookup_concat(tables, ids)
        want = torch.cat([t(i) for t, i in zip(tables, ids)], dim=-1)
    assert out.shape == (2, 4, 9) and out.requires_grad == grad_enabled
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    if grad_enabled:
        grad = torch.randn(2, 4, 9)
        got = torch.autograd.grad(out, [t.weight for t in tables], grad)
        expected = torch.autograd.grad(want, [t.weight for t in tables], grad)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e)
        assert torch.all(got[0][0] == 0)  # padding row


def test_concatenated_lookup_leaves_mixed_tables_to_themselves():
    tables = [nn.Embedding(10, 3), nn.Embedding(10, 2, sparse=True)]
    ids = [torch.tensor([1, 2]), torch.tensor([3, 3])]
    out = lookup_concat(tables, ids)
    torch.testing.assert_close(out, torch.cat([t(i) for t, i in zip(tables, ids)], dim=-1))
    out.sum().backward()
    assert not tables[0].weight.grad.is_sparse and tables[1].weight.grad.is_sparse


def test_lookup_leaves_other_tables_to_themselves():
    table = nn.Embedding(10, 3, sparse=True)
    out = lookup(table, torch.tensor([1, 2]))
    out.sum().backward()
    assert table.weight.grad.is_sparse


def test_candidate_and_history_are_contiguous_and_exact():
    items = ItemEmbedding(20, 6, 4, 3)
    goods, cates = torch.randint(1, 20, (5,)), torch.randint(1, 6, (5,))
    hist_goods, hist_cates = torch.randint(0, 20, (5, 7)), torch.randint(0, 6, (5, 7))
    candidate, history = items.candidate_and_history(goods, cates, hist_goods, hist_cates)
    assert candidate.is_contiguous() and history.is_contiguous()
    torch.testing.assert_close(candidate, items(goods, cates))
    torch.testing.assert_close(history, items(hist_goods, hist_cates))
    (candidate.sum() + history.square().sum()).backward()
    want = [p.grad.clone() for p in items.parameters()]
    items.zero_grad()
    (items(goods, cates).sum() + items(hist_goods, hist_cates).square().sum()).backward()
    for got, expected in zip(want, [p.grad for p in items.parameters()]):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", ["adam", "adagrad", "sgd"])
def test_fused_optimisers_follow_the_plain_ones(name):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))]
    plain = [nn.Parameter(p.detach().clone()) for p in params]
    fused = make_optimizer(params, name, 0.01)
    reference = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}[name](
        plain, lr=0.01)
    assert fused.defaults.get("fused") is True
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, plain, grads):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        reference.step()
    for p, q in zip(params, plain):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_configure_threads_gives_the_attention_op_the_threads():
    threads = torch.get_num_threads()
    try:
        configure_threads(2)
        assert dk.get_cpu_threads() == 2 and torch.get_num_threads() == 1
        configure_threads(2, torch_threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
        dk.set_cpu_threads(0)
    assert dk.get_cpu_threads() == torch.get_num_threads()
    with pytest.raises(ValueError, match="threads must be an int >= 0"):
        dk.set_cpu_threads(-1)


def test_keep_freed_memory_is_harmless():
    keep_freed_memory()
    assert torch.ones(2 ** 20).sum().item() == 2 ** 20
