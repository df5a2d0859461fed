"""Embedding initialisation, the validation part (no leak, the test's protocol) and early stopping."""
import json
import math

import numpy as np
import pytest
import torch

import din.train as train_module
from din import ModelConfig, build_model
from din.checkpoint import load_checkpoint
from din.cli import main
from din.data import Split, carve_validation, load_movielens, make_synthetic
from din.data.amazon import next_item_split
from din.features import EMBEDDING_INITS, init_embedding_
from din.regularization import embedding_setup
from din.train import TrainConfig, train

# ---------------------------------------------------------------------------------------------
# initialisation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme, std", [("normal", 1e-4), ("normal", 0.05), ("uniform", 1e-3), ("glorot", 1.0),
                                         ("torch", 1.0)])
def test_fresh_table_statistics_match_the_configured_init(scheme, std):
    torch.manual_seed(0)
    rows, dim = 4001, 18
    config = ModelConfig(num_goods=rows, num_cates=7, embedding_init=scheme, embedding_init_std=std)
    weight = build_model(config).items.goods.weight.detach()
    assert torch.count_nonzero(weight[0]) == 0  # the padding row
    body = weight[1:]
    expected = {"normal": std, "uniform": std, "torch": 1.0, "glorot": math.sqrt(6 / (rows + dim) / 3)}[scheme]
    assert body.std().item() == pytest.approx(expected, rel=0.03)
    assert body.mean().abs().item() < 0.05 * expected
    if scheme == "uniform":
        assert body.abs().max().item() <= std * math.sqrt(3) + 1e-12
    if scheme == "glorot":
        assert body.abs().max().item() <= math.sqrt(6 / (rows + dim)) + 1e-12


def test_default_init_is_normal_1e4_on_every_table_mba_included():
    torch.manual_seed(0)
    config = ModelConfig(num_goods=3000, num_cates=500, num_users=2000, use_user=True)
    assert (config.embedding_init, config.embedding_init_std) == ("normal", 1e-4)
    data = make_synthetic(num_users=30, num_goods=3000, num_cates=500, samples_per_user=3, max_len=6, seed=1).train
    setup = embedding_setup("mba", 0.01, data, 6, "adagrad", 0.05, config.goods_dim, config.cate_dim)
    model = build_model(config, goods_table=setup.goods_table, cate_table=setup.cate_table)
    assert type(model.items.goods).__name__ == "MBAEmbedding"
    for table in (model.items.goods, model.items.cates, model.users):
        weight = table.weight.detach()
        assert torch.count_nonzero(weight[0]) == 0
        assert weight[1:].std().item() == pytest.approx(1e-4, rel=0.1)


@pytest.mark.parametrize("field, value", [("embedding_init", "xavier"), ("embedding_init_std", 0.0),
                                          ("embedding_init_std", float("nan")), ("hidden_units", ()),
                                          ("attention_units", (80, 0)), ("attention_activation", "swish"),
                                          ("user_dim", 0)])
def test_bad_model_shape_or_init_raises(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: value})


def test_init_embedding_checks_its_arguments():
    weight = torch.empty(5, 3)
    with pytest.raises(ValueError, match="one of"):
        init_embedding_(weight, "zeros", 1e-4)
    with pytest.raises(ValueError, match="std"):
        init_embedding_(weight, "normal", -1.0)
    assert set(EMBEDDING_INITS) == {"normal", "uniform", "glorot", "torch"}


# ---------------------------------------------------------------------------------------------
# the validation part
# ---------------------------------------------------------------------------------------------


def _next_item_split(num_users=40, seed=0):
    """Amazon-style samples: every user trained on earlier positions, tested on the last."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 15, num_users)  # reviews per user
    user = np.repeat(np.arange(1, num_users + 1), lengths)
    item = rng.integers(1, 60, len(user))
    split, _ = next_item_split(user, item, np.concatenate(([0], rng.integers(1, 6, 60))), num_users=num_users,
                               num_items=59, num_cates=5, seed=seed, name="toy")
    return split


def _targets(data):
    return set(zip(data.user.tolist(), data.hist_end.tolist(), data.goods.tolist(), data.label.tolist()))


def test_latest_validation_keeps_time_order_and_never_touches_the_test():
    split = _next_item_split()
    carved = carve_validation(split, 0.2, seed=0)
    assert carved.test is split.test
    train, valid, test = _targets(carved.train), _targets(carved.valid), _targets(carved.test)
    assert not (train & valid) and not (train & test) and not (valid & test)
    assert train | valid == _targets(split.train)  # nothing lost, nothing added
    for user in np.unique(carved.valid.user):
        kept_ends = carved.train.hist_end[carved.train.user == user]
        valid_ends = carved.valid.hist_end[carved.valid.user == user]
        test_ends = carved.test.hist_end[carved.test.user == user]
        assert len(kept_ends) > 0  # no user loses all training
        assert valid_ends.min() > kept_ends.max()  # the validation targets are the user's latest
        assert test_ends.min() > valid_ends.max()
        targets = len(np.unique(np.concatenate([kept_ends, valid_ends])))
        assert len(np.unique(valid_ends)) == min(max(1, round(0.2 * targets)), targets - 1)
    # a positive and its sampled negative share one target: they stay together
    assert carved.valid.label.sum() * 2 == len(carved.valid)


def test_by_user_validation_when_test_users_are_unseen(tmp_path):
    split = load_movielens(None, max_len=20, seed=0)
    carved = carve_validation(split, 0.1, seed=3)
    users = {part: set(getattr(carved, part).user.tolist()) for part in ("train", "valid", "test")}
    assert not users["train"] & users["valid"] and not users["valid"] & users["test"]
    assert users["train"] | users["valid"] == set(split.train.user.tolist())
    assert len(users["valid"]) == round(0.1 * len(set(split.train.user.tolist())))
    again = carve_validation(split, 0.1, seed=3)
    assert np.array_equal(again.valid.user, carved.valid.user)  # seeded
    assert carved.summary()["valid_samples"] == len(carved.valid)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, "0.1", True])
def test_bad_validation_fraction_raises(fraction):
    with pytest.raises(ValueError, match="fraction"):
        carve_validation(_next_item_split(), fraction)
    with pytest.raises(ValueError, match="protocol"):
        carve_validation(_next_item_split(), 0.1, protocol="random")


# ---------------------------------------------------------------------------------------------
# early stopping keeps the best validation epoch
# ---------------------------------------------------------------------------------------------


def test_early_stopping_restores_the_best_validation_epoch(tmp_path, monkeypatch):
    split = carve_validation(make_synthetic(num_users=60, num_goods=80, num_cates=5, samples_per_user=4,
                                            max_len=8, seed=0), 0.2, seed=0)
    scripted = iter([0.60, 0.70, 0.65, 0.64, 0.99])  # validation GAUC of epochs 1..5
    snapshots = []
    real_evaluate = train_module.evaluate

    def evaluate(model, data, *args, **kwargs):
        result = real_evaluate(model, data, *args, **kwargs)
        if data is split.valid:
            result["gauc"] = next(scripted)
            snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return result

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    model = build_model(ModelConfig(num_goods=split.num_goods, num_cates=split.num_cates))
    config = TrainConfig(epochs=5, batch_size=64, max_len=8, patience=2, progress=False)
    history = train(model, split, config, out_dir=tmp_path, log=lambda line: None)
    assert [e["epoch"] for e in history["epochs"]] == [1, 2, 3, 4]  # stopped: 2 epochs without a better one
    assert history["stopped_early"] and history["best"]["epoch"] == 2 and history["last"]["epoch"] == 4
    for name, value in model.state_dict().items():  # the model holds epoch 2's weights, not epoch 4's
        torch.testing.assert_close(value, snapshots[1][name], rtol=0, atol=0)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["best"]["valid_gauc"] == 0.70 and saved["best"]["gauc"] == history["epochs"][1]["gauc"]
    loaded, payload = load_checkpoint(tmp_path / "model.pt")
    assert payload["metrics"]["epoch"] == 2
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, snapshots[1][name], rtol=0, atol=0)


def test_without_validation_the_last_epoch_is_kept(tmp_path):
    split = make_synthetic(num_users=40, num_goods=50, num_cates=4, samples_per_user=3, max_len=6, seed=1)
    model = build_model(ModelConfig(num_goods=split.num_goods, num_cates=split.num_cates))
    history = train(model, split, TrainConfig(epochs=2, batch_size=64, max_len=6, valid_fraction=0.0,
                                              progress=False), log=lambda line: None)
    assert history["best"]["epoch"] == 2 and "valid_gauc" not in history["best"]
    assert history["selection"].startswith("last epoch")


def test_cli_records_the_model_shape_and_selection(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", "synthetic", "--epochs", "2", "--batch-size", "512", "--max-len", "10",
                 "--goods-dim", "8", "--cate-dim", "4", "--hidden-units", "32,16", "--attention-units", "16",
                 "--attention-activation", "dice", "--use-user", "--user-dim", "6", "--embedding-init", "uniform",
                 "--embedding-init-std", "0.01", "--valid-fraction", "0.2", "--patience", "1", "--quiet",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "best validation GAUC" in printed
    history = json.loads((out / "metrics.json").read_text())
    model = history["model"]
    assert (model["goods_dim"], model["cate_dim"], model["user_dim"], model["use_user"]) == (8, 4, 6, True)
    assert model["hidden_units"] == [32, 16] and model["attention_units"] == [16]
    assert model["attention_activation"] == "dice" and model["attention_scale"] == pytest.approx(12 ** -0.5)
    assert (model["embedding_init"], model["embedding_init_std"]) == ("uniform", 0.01)
    assert history["train"]["valid_fraction"] == 0.2 and history["data"]["valid_samples"] > 0
    assert history["command"]["hidden_units"] == [32, 16]
    assert all("valid_gauc" in epoch and "gauc" in epoch for epoch in history["epochs"])
    loaded, payload = load_checkpoint(out / "model.pt")
    assert loaded.config.hidden_units == (32, 16) and payload["metrics"]["epoch"] == history["best"]["epoch"]


@pytest.mark.parametrize("flag, value", [("--hidden-units", "200,x"), ("--hidden-units", "0"),
                                         ("--valid-fraction", "1"), ("--patience", "0"),
                                         ("--embedding-init-std", "0")])
def test_cli_rejects_bad_shape_and_selection_flags(flag, value):
    with pytest.raises(SystemExit):
        main(["train", flag, value])


def test_split_keeps_valid_out_of_saved_folders(tmp_path):
    split = carve_validation(_next_item_split(), 0.2)
    split.save(tmp_path / "saved")
    loaded = Split.load(tmp_path / "saved")
    assert loaded.valid is None and len(loaded.train) == len(split.train)
