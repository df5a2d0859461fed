"""DIN and BaseModel: shapes, gradients, padding invariance, configuration errors, checkpoints."""
import pytest
import torch

from din import DIN, BaseModel, ModelConfig, build_model
from din.checkpoint import load_checkpoint, save_checkpoint
from din.data import Batch


def _batch(batch=4, seq_len=6, num_goods=30, num_cates=5, lengths=(0, 1, 4, 6)):
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor(lengths)
    hist_goods = torch.randint(1, num_goods, (batch, seq_len), generator=g)
    hist_cates = torch.randint(1, num_cates, (batch, seq_len), generator=g)
    valid = torch.arange(seq_len)[None, :] < lengths[:, None]
    return Batch(user=torch.arange(batch), hist_goods=hist_goods * valid, hist_cates=hist_cates * valid,
                 lengths=lengths, goods=torch.randint(1, num_goods, (batch,), generator=g),
                 cate=torch.randint(1, num_cates, (batch,), generator=g),
                 label=torch.randint(0, 2, (batch,), generator=g).float())


@pytest.mark.parametrize("model_name", ["din", "base"])
@pytest.mark.parametrize("activation", ["dice", "prelu"])
def test_forward_shape_and_all_parameters_get_gradients(model_name, activation):
    model = build_model(ModelConfig(model=model_name, num_goods=30, num_cates=5, activation=activation))
    assert isinstance(model, DIN if model_name == "din" else BaseModel)
    batch = _batch()
    logits = model(batch)
    assert logits.shape == (4,) and torch.isfinite(logits).all()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.label).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("model_name", ["din", "base"])
def test_padding_invariance(model_name):
    """Ids at padded positions must not change anything, in training (Dice statistics) or eval."""
    model = build_model(ModelConfig(model=model_name, num_goods=30, num_cates=5))
    batch = _batch()
    noisy = _batch()
    valid = torch.arange(6)[None, :] < batch.lengths[:, None]
    noisy.hist_goods = torch.where(valid, batch.hist_goods, torch.full_like(batch.hist_goods, 17))
    noisy.hist_cates = torch.where(valid, batch.hist_cates, torch.full_like(batch.hist_cates, 3))
    for training in (True, False):
        model.train(training)
        torch.testing.assert_close(model(batch), model(noisy))


def test_user_embedding_joins_when_asked():
    config = ModelConfig(model="din", num_goods=30, num_cates=5, num_users=4, use_user=True)
    model = build_model(config)
    assert model(_batch()).shape == (4,)
    with pytest.raises(ValueError, match="num_users"):
        ModelConfig(use_user=True, num_users=0)


@pytest.mark.parametrize("field, value", [("model", "dnn"), ("activation", "gelu"), ("num_goods", 0)])
def test_bad_config_raises(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: value})


def test_checkpoint_round_trip(tmp_path):
    model = build_model(ModelConfig(model="din", num_goods=30, num_cates=5)).eval()
    path = tmp_path / "sub" / "model.pt"
    save_checkpoint(path, model, note="x")
    restored, payload = load_checkpoint(path)
    assert payload["note"] == "x" and isinstance(restored, DIN)
    restored.eval()
    batch = _batch()
    torch.testing.assert_close(model(batch), restored(batch))
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["model.pt"]  # no temp files left


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a din checkpoint"):
        load_checkpoint(bad)
