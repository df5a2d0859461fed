"""Search before attention (din.search, SIM's retrieval): against a naive per-row reference, inside the model,
the long-range synthetic data it is measured on, and through the command line."""
import json

import numpy as np
import pytest
import torch

from din import ModelConfig, build_model
from din.checkpoint import load_checkpoint, save_checkpoint
from din.cli import main
from din.data import Batch, load_data, make_long_range_synthetic
from din.metrics import auc
from din.search import SEARCH_MODES, category_search, gather_history, inner_product_search
from din.train import evaluate


# ---------------------------------------------------------------------------------------------
# naive references: one Python loop per row, written from the definition
# ---------------------------------------------------------------------------------------------


def _naive_category(hist_cates, lengths, cate, k):
    rows = []
    for b in range(hist_cates.shape[0]):
        matches = [t for t in range(int(lengths[b])) if int(hist_cates[b, t]) == int(cate[b])]
        rows.append(matches[-k:] if matches else [])  # the k most recent, in time order
    return rows


def _naive_inner_product(query, keys, lengths, k):
    rows = []
    for b in range(keys.shape[0]):
        scores = [(float(query[b] @ keys[b, t]), t) for t in range(int(lengths[b]))]
        best = sorted(scores, key=lambda st: (-st[0], -st[1]))[:k]  # larger score first, ties: the newer
        rows.append(sorted(t for _, t in best))
    return rows


def _check_against(rows, positions, kept, width, k):
    assert positions.shape == (len(rows), min(k, width)) and kept.shape == (len(rows),)
    for b, expected in enumerate(rows):
        assert int(kept[b]) == len(expected), b
        assert positions[b, :len(expected)].tolist() == expected, b
        assert (positions[b, len(expected):] == 0).all(), b


def _history(batch, width, num_cates, seed, lengths=None):
    g = torch.Generator().manual_seed(seed)
    hist_cates = torch.randint(1, num_cates + 1, (batch, width), generator=g)
    lengths = torch.randint(0, width + 1, (batch,), generator=g) if lengths is None else torch.tensor(lengths)
    cate = torch.randint(1, num_cates + 1, (batch,), generator=g)
    # padding holds the candidate's own category: a search that looked past lengths would keep it
    padding = torch.arange(width)[None, :] >= lengths[:, None]
    return torch.where(padding, cate[:, None], hist_cates), lengths, cate


@pytest.mark.parametrize("batch, width, num_cates, k", [
    (8, 30, 3, 4),     # many matches: k binds
    (8, 30, 3, 50),    # k larger than T
    (5, 7, 20, 2),     # few matches: fewer than k, often none
    (1, 1, 1, 1),      # T = 1
    (6, 17, 2, 17),    # k = T
    (0, 10, 3, 4),     # no rows
])
@pytest.mark.parametrize("seed", [0, 1])
def test_category_search_matches_the_naive_reference(batch, width, num_cates, k, seed):
    hist_cates, lengths, cate = _history(batch, width, num_cates, seed)
    positions, kept = category_search(hist_cates, lengths, cate, k)
    _check_against(_naive_category(hist_cates, lengths, cate, k), positions, kept, width, k)


def test_category_search_edge_cases():
    hist_cates = torch.tensor([[1, 2, 1, 1, 2, 1],    # four matches, k = 2: the last two
                               [3, 3, 3, 3, 3, 3],    # no behaviour of the category
                               [2, 1, 9, 9, 9, 9],    # one match, then padding of the candidate's category
                               [1, 1, 1, 1, 1, 1]])   # empty history (length 0)
    lengths = torch.tensor([6, 6, 2, 0])
    cate = torch.tensor([1, 2, 9, 1])
    positions, kept = category_search(hist_cates, lengths, cate, 2)
    assert kept.tolist() == [2, 0, 0, 0]
    assert positions.tolist() == [[3, 5], [0, 0], [0, 0], [0, 0]]
    positions, kept = category_search(hist_cates, lengths, torch.tensor([2, 3, 1, 1]), 10)  # k > T
    assert kept.tolist() == [2, 6, 1, 0] and positions.shape == (4, 6)
    assert positions[0, :2].tolist() == [1, 4] and positions[1].tolist() == list(range(6))
    assert positions[2, :1].tolist() == [1]
    # a history of width 0
    positions, kept = category_search(torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, dtype=torch.long),
                                      torch.ones(3, dtype=torch.long), 5)
    assert positions.shape == (3, 0) and kept.tolist() == [0, 0, 0]
    assert gather_history(torch.zeros(3, 0, dtype=torch.long), positions, kept).shape == (3, 0)


@pytest.mark.parametrize("batch, width, dim, k", [(8, 30, 5, 4), (8, 30, 5, 50), (3, 1, 2, 1), (6, 13, 4, 13),
                                                  (0, 4, 3, 2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_inner_product_search_matches_the_naive_reference(batch, width, dim, k, seed):
    g = torch.Generator().manual_seed(seed)
    query, keys = torch.randn(batch, dim, generator=g), torch.randn(batch, width, dim, generator=g)
    lengths = torch.randint(0, width + 1, (batch,), generator=g)
    # padding that would outscore everything: it must never be chosen
    padding = torch.arange(width)[None, :, None] >= lengths[:, None, None]
    keys = torch.where(padding, 100 * query[:, None, :], keys)
    positions, kept = inner_product_search(query, keys, lengths, k)
    _check_against(_naive_inner_product(query, keys, lengths, k), positions, kept, width, k)


def test_inner_product_ties_keep_the_newer_behaviour_and_gradients_do_not_flow():
    query = torch.tensor([[1.0, 0.0]], requires_grad=True)
    keys = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [2.0, 5.0], [0.0, 0.0], [2.0, 1.0]]], requires_grad=True)
    positions, kept = inner_product_search(query, keys, torch.tensor([5]), 2)
    assert positions.tolist() == [[2, 4]] and kept.tolist() == [2]  # three tie at 2: the two newest
    assert not positions.requires_grad
    positions, kept = inner_product_search(query, keys, torch.tensor([0]), 3)  # empty history
    assert kept.tolist() == [0] and positions.tolist() == [[0, 0, 0]]


def test_gather_history_pads_with_zero():
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    out = gather_history(ids, torch.tensor([[1, 3], [2, 0]]), torch.tensor([2, 1]))
    assert out.tolist() == [[6, 8], [11, 0]]


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, None])
def test_bad_top_k_is_refused(bad):
    hist_cates, lengths, cate = _history(2, 5, 3, 0)
    with pytest.raises(ValueError, match="top_k"):
        category_search(hist_cates, lengths, cate, bad)
    with pytest.raises(ValueError, match="top_k"):
        inner_product_search(torch.zeros(2, 3), torch.zeros(2, 5, 3), lengths, bad)


def test_bad_shapes_are_refused():
    hist_cates, lengths, cate = _history(2, 5, 3, 0)
    with pytest.raises(ValueError, match="cate"):
        category_search(hist_cates, lengths, cate[:1], 3)
    with pytest.raises(ValueError, match="lengths"):
        category_search(hist_cates, lengths[:1], cate, 3)
    with pytest.raises(ValueError, match="query"):
        inner_product_search(torch.zeros(2, 4), torch.zeros(2, 5, 3), lengths, 3)


# ---------------------------------------------------------------------------------------------
# in the model
# ---------------------------------------------------------------------------------------------


def _batch(batch=6, width=12, num_goods=40, num_cates=4, seed=3):
    hist_cates, lengths, cate = _history(batch, width, num_cates - 1, seed)
    g = torch.Generator().manual_seed(seed + 100)
    valid = torch.arange(width)[None, :] < lengths[:, None]
    return Batch(user=torch.arange(batch), hist_goods=torch.randint(1, num_goods, (batch, width), generator=g) * valid,
                 hist_cates=hist_cates * valid, lengths=lengths,
                 goods=torch.randint(1, num_goods, (batch,), generator=g), cate=cate,
                 label=torch.randint(0, 2, (batch,), generator=g).float())


def _retrieved(batch, rows):
    """The batch a no-search model sees when the naive reference picks ``rows`` (time order, left-aligned)."""
    width = max(1, max(len(r) for r in rows))
    goods = torch.zeros(len(rows), width, dtype=torch.long)
    cates = torch.zeros(len(rows), width, dtype=torch.long)
    for b, picked in enumerate(rows):
        goods[b, :len(picked)] = batch.hist_goods[b, picked]
        cates[b, :len(picked)] = batch.hist_cates[b, picked]
    return Batch(user=batch.user, hist_goods=goods, hist_cates=cates,
                 lengths=torch.tensor([len(r) for r in rows]), goods=batch.goods, cate=batch.cate, label=batch.label)


@pytest.mark.parametrize("mode", ["category", "inner-product"])
@pytest.mark.parametrize("model_name", ["din", "base"])
def test_the_model_pools_exactly_the_retrieved_behaviours(mode, model_name):
    """A searching model's logits (and gradients) are those of the same weights without search on the
    history the naive reference retrieves."""
    config = dict(model=model_name, num_goods=40, num_cates=4, goods_dim=6, cate_dim=4)
    torch.manual_seed(0)
    searching = build_model(ModelConfig(**config, history_search=mode, search_top_k=3))
    plain = build_model(ModelConfig(**config))
    plain.load_state_dict(searching.state_dict())
    batch = _batch()
    if mode == "category":
        rows = _naive_category(batch.hist_cates, batch.lengths, batch.cate, 3)
    else:
        with torch.no_grad():
            query, keys = searching.items(batch.goods, batch.cate), searching.items(batch.hist_goods, batch.hist_cates)
        rows = _naive_inner_product(query, keys, batch.lengths, 3)
    assert any(len(r) == 0 for r in rows) and any(len(r) == 3 for r in rows)  # the batch covers both ends
    for training in (True, False):
        searching.train(training)
        plain.train(training)
        got, want = searching(batch), plain(_retrieved(batch, rows))
        torch.testing.assert_close(got, want)
    got.sum().backward()
    want.sum().backward()
    for (name, a), (_, b) in zip(searching.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    # the goods rows of the behaviours the search dropped get no gradient (they were never pooled)
    picked = {int(batch.hist_goods[b, t]) for b, r in enumerate(rows) for t in r} | set(batch.goods.tolist())
    dropped = set(batch.hist_goods[batch.hist_goods > 0].tolist()) - picked
    assert dropped and all((searching.items.goods.weight.grad[j] == 0).all() for j in dropped)


def test_search_trims_the_attention_to_the_most_kept():
    model = build_model(ModelConfig(num_goods=40, num_cates=4, history_search="category", search_top_k=50))
    batch = _batch(width=12)
    goods, cates, lengths = model.search(batch)
    assert goods.shape[1] == max(1, int(lengths.max())) <= 12
    assert (cates[torch.arange(12)[None, :goods.shape[1]] < lengths[:, None]] ==
            batch.cate.repeat_interleave(lengths)).all()


@pytest.mark.parametrize("field, value", [("history_search", "lsh"), ("history_search", None),
                                          ("search_top_k", 0), ("search_top_k", -5), ("search_top_k", 2.5),
                                          ("search_top_k", True)])
def test_bad_search_config_raises(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: value})


def test_checkpoints_keep_the_search_and_old_ones_load_without(tmp_path):
    model = build_model(ModelConfig(num_goods=40, num_cates=4, history_search="inner-product", search_top_k=7))
    save_checkpoint(tmp_path / "m.pt", model)
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    assert (loaded.config.history_search, loaded.config.search_top_k) == ("inner-product", 7)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    for key in ("history_search", "search_top_k"):  # a checkpoint written before search existed
        del payload["model_config"][key]
    torch.save(payload, tmp_path / "old.pt")
    old, _ = load_checkpoint(tmp_path / "old.pt")
    assert old.config.history_search == "none"
    assert SEARCH_MODES[0] == "none"


# ---------------------------------------------------------------------------------------------
# the long-range synthetic data
# ---------------------------------------------------------------------------------------------

_SMALL = dict(num_users=300, num_goods=400, num_cates=20, samples_per_user=6, min_history=120, max_history=200)


def test_long_range_synthetic_hides_half_the_interests_beyond_the_last_50():
    split = make_long_range_synthetic(**_SMALL, seed=0)
    data = split.train
    lengths = data.hist_end - data.hist_start
    assert lengths.min() >= 120 - 10 and lengths.max() <= 200
    assert not set(split.train.user.tolist()) & set(split.test.user.tolist())
    index = np.arange(len(data))
    whole, last50 = data.batch(index, 200), data.batch(index, 50)
    count_whole = (whole.hist_cates == whole.cate[:, None]).sum(1).numpy()
    count_last50 = (last50.hist_cates == last50.cate[:, None]).sum(1).numpy()
    labels = np.asarray(data.label)
    # the label follows the count over the whole history ...
    assert auc(labels, count_whole) > 0.9
    assert labels[count_whole >= 10].mean() > 0.85 and labels[count_whole == 0].mean() < 0.15
    # ... and the last 50 miss it: candidates without a behaviour of their category there are clicked often
    assert auc(labels, count_last50) < auc(labels, count_whole) - 0.1
    assert 0.3 < labels[count_last50 == 0].mean() < 0.8


def test_long_range_synthetic_is_deterministic_and_independent_of_max_len():
    a = make_long_range_synthetic(**_SMALL, seed=4)
    b = load_data("synthetic-long", max_len=50, seed=4, **_SMALL)
    c = make_long_range_synthetic(**_SMALL, seed=5)
    for column in ("user", "goods", "cate", "label", "hist_end"):
        assert np.array_equal(getattr(a.train, column), getattr(b.train, column)), column
    assert (b.train.history_lengths <= 50).all() and a.train.history_lengths.max() > 50
    assert not np.array_equal(a.train.goods, c.train.goods)


@pytest.mark.parametrize("kwargs, match", [
    ({"interests_per_user": 11}, "interests_per_user"),
    ({"recent": 5, "jitter": 10}, "jitter"),
    ({"recent": 150}, "recent"),
    ({"jitter": -1}, "jitter"),
    ({"min_history": 300}, "max_history"),
    ({"num_users": 1}, "num_users"),
    ({"noise": 0.6}, "noise"),
])
def test_long_range_synthetic_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_long_range_synthetic(**{**_SMALL, **kwargs})


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def test_train_with_search_then_evaluate_uses_the_same_search(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", "synthetic", "--epochs", "1", "--batch-size", "512", "--max-len", "30",
                 "--history-search", "category", "--top-k", "5", "--out", str(out), "--quiet"]) == 0
    history = json.loads((out / "metrics.json").read_text())
    assert history["model"]["history_search"] == "category" and history["model"]["search_top_k"] == 5
    assert history["train"]["max_len"] == 30
    epoch = history["epochs"][0]
    assert 0.5 < epoch["auc"] <= 1.0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "model.pt")]) == 0
    assert f"AUC {epoch['auc']:.4f}" in capsys.readouterr().out
    # the checkpoint's search is what evaluate ran: the same weights without it score otherwise
    model, _ = load_checkpoint(out / "model.pt")
    test = load_data("synthetic", max_len=30, seed=0).test
    assert evaluate(model, test, 30)["auc"] == pytest.approx(epoch["auc"], abs=1e-12)
    model.config.history_search = "none"
    assert evaluate(model, test, 30)["auc"] != pytest.approx(epoch["auc"], abs=1e-6)


def test_compare_runs_the_search_variants(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--data", "synthetic", "--variants", "din,din-search,din-search-ip", "--epochs", "1",
                 "--batch-size", "512", "--max-len", "20", "--top-k", "4", "--out", str(out), "--quiet"]) == 0
    assert "DIN+search-ip" in capsys.readouterr().out
    for key, mode in (("din", "none"), ("din-search", "category"), ("din-search-ip", "inner-product")):
        model = json.loads((out / key / "seed0" / "metrics.json").read_text())["model"]
        assert model["history_search"] == mode and model["search_top_k"] == 4


def test_bad_search_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--history-search", "nearest"])
    assert "invalid choice" in capsys.readouterr().err
    for bad in ("0", "-3", "x"):
        with pytest.raises(SystemExit):
            main(["train", "--history-search", "category", "--top-k", bad])
        assert "--top-k" in capsys.readouterr().err
    assert main(["train", "--data", "synthetic", "--top-k", "5", "--quiet"]) == 2
    assert "--top-k applies to a history search only" in capsys.readouterr().err
    assert main(["compare", "--data", "synthetic", "--variants", "din", "--top-k", "5", "--quiet"]) == 2
    assert "din-search" in capsys.readouterr().err
