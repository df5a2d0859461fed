"""Our AttentionSequencePoolingLayer swapped into DeepCTR-Torch's own DIN and DIEN models: the models' outputs
and every parameter's gradient stay those of the originals (issue 13, item 5)."""
import copy

import numpy as np
import pytest
import torch

from din_kernels.compat import AttentionSequencePoolingLayer

deepctr_models = pytest.importorskip("deepctr_torch.models")  # prints a version-check line offline
from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat  # noqa: E402

from test_compat import randomize_  # noqa: E402

B, T, GOODS, CATES, DIM = 6, 5, 30, 7, 4


def _columns():
    return [SparseFeat("goods", GOODS, embedding_dim=DIM), SparseFeat("cate", CATES, embedding_dim=DIM),
            VarLenSparseFeat(SparseFeat("hist_goods", GOODS, embedding_dim=DIM, embedding_name="goods"),
                             maxlen=T, length_name="seq_length"),
            VarLenSparseFeat(SparseFeat("hist_cate", CATES, embedding_dim=DIM, embedding_name="cate"),
                             maxlen=T, length_name="seq_length")]


def _inputs(model) -> torch.Tensor:
    """The [B, columns] tensor DeepCTR's forward reads, laid out by the model's own feature_index."""
    gen = np.random.default_rng(0)
    lengths = gen.integers(1, T + 1, B)
    hist_mask = np.arange(T)[None, :] < lengths[:, None]
    values = {"goods": gen.integers(1, GOODS, (B, 1)), "cate": gen.integers(1, CATES, (B, 1)),
              "hist_goods": gen.integers(1, GOODS, (B, T)) * hist_mask,
              "hist_cate": gen.integers(1, CATES, (B, T)) * hist_mask, "seq_length": lengths[:, None]}
    width = max(end for _, end in model.feature_index.values())
    x = np.zeros((B, width), dtype=np.float32)
    for name, (start, end) in model.feature_index.items():
        x[:, start:end] = values[name].reshape(B, end - start)
    return torch.from_numpy(x)


def _outputs_and_grads(model, x):
    model.zero_grad()
    out = model(x)
    out.sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _swap_and_compare(model, holder, atol=1e-5, rtol=1e-4):
    # every weight of the model at a scale that lets the attention matter (DeepCTR initialises embeddings and
    # MLPs with std 1e-4, under which a changed score would not move the fp32 output at all)
    randomize_(model)
    ours = copy.deepcopy(model)
    ours_holder = ours if holder is model else ours.interest_evolution
    ours_holder.attention = AttentionSequencePoolingLayer.from_deepctr(ours_holder.attention)
    x = _inputs(model)
    want, want_grads = _outputs_and_grads(model, x)
    got, got_grads = _outputs_and_grads(ours, x)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    assert set(got_grads) == set(want_grads)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=atol, rtol=rtol, msg=name)
    # and the comparison can tell: a changed scoring weight moves the output past the tolerance
    with torch.no_grad():
        ours_holder.attention.local_att.dense.weight.add_(0.5)  # (a bias would cancel in a softmax)
    assert (ours(x) - want).abs().max() > atol  # beyond the tolerance above


@pytest.mark.parametrize("att_activation,normalize", [("sigmoid", False), ("dice", True), ("prelu", True)])
def test_din_with_our_layer_matches_deepctr(att_activation, normalize):
    torch.manual_seed(0)
    model = deepctr_models.DIN(_columns(), ["goods", "cate"], dnn_hidden_units=(8, 4), att_hidden_size=(8, 4),
                               att_activation=att_activation, att_weight_normalization=normalize, device="cpu")
    _swap_and_compare(model, model)


@pytest.mark.parametrize("gru_type", ["GRU", "AIGRU", "AUGRU"])
def test_dien_with_our_layer_matches_deepctr(gru_type):
    torch.manual_seed(0)
    model = deepctr_models.DIEN(_columns(), ["goods", "cate"], gru_type=gru_type, dnn_hidden_units=(8, 4),
                                att_hidden_units=(8, 4), device="cpu")
    _swap_and_compare(model, model.interest_evolution)
