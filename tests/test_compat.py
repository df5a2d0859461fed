"""din_kernels.compat.AttentionSequencePoolingLayer against the real DeepCTR-Torch 0.3.0 layer: forward and
every gradient (inputs and parameters), running statistics, for each activation, weight_normalization,
return_score and supports_masking; state_dict compatibility and from_deepctr."""
import pytest
import torch

from din_kernels.compat import AttentionSequencePoolingLayer
from problems import Case, build

deepctr_sequence = pytest.importorskip("deepctr_torch.layers.sequence")  # prints a version-check line offline
DeepCTRLayer = deepctr_sequence.AttentionSequencePoolingLayer

EMB = 6


def randomize_(layer):
    """Weights large enough for the scores to matter (DeepCTR initialises the MLP with std 1e-4)."""
    with torch.no_grad():
        for name, param in layer.named_parameters():
            param.copy_(torch.randn_like(param) * (0.4 if "weight" in name else 0.2))
            if name.endswith("alpha") or name.endswith("activation_layers.0.weight"):
                param.copy_(torch.rand_like(param))
        for name, buf in layer.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn_like(buf) * 0.3)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand_like(buf) + 0.5)
    return layer


def pair(**config):
    theirs = randomize_(DeepCTRLayer(embedding_dim=EMB, **config))
    ours = AttentionSequencePoolingLayer.from_deepctr(theirs)
    return theirs, ours


def inputs(batch=5, seq_len=7, lengths="nonempty", seed=0):
    """A shared-builder problem in DeepCTR's layout: query [B, 1, E], keys [B, T, E], keys_length [B, 1]
    (the layers hold their own weights). Nonempty histories unless told: DeepCTR's softmax over an empty
    one differs by design (test_length_zero_rows)."""
    problem = build(Case(batch, seq_len, EMB, lengths=lengths, candidates=1), seed=seed)
    return problem.query, problem.keys, problem.lengths.reshape(batch, 1)


def run(layer, query, keys, keys_length, mask=None):
    """Output and the gradients of a random projection of it w.r.t. query, keys and every parameter."""
    query = query.clone().requires_grad_()
    keys = keys.clone().requires_grad_()
    out = layer(query, keys, keys_length, mask)
    torch.manual_seed(1)
    probe = torch.randn_like(out)
    params = [p for _, p in sorted(layer.named_parameters())]
    grads = torch.autograd.grad((out * probe).sum(), [query, keys] + params)
    return out.detach(), grads


def assert_same(theirs, ours, *args, atol=1e-5, rtol=1e-4):
    want_out, want_grads = run(theirs, *args)
    got_out, got_grads = run(ours, *args)
    assert got_out.shape == want_out.shape
    torch.testing.assert_close(got_out, want_out, atol=atol, rtol=rtol)
    assert len(got_grads) == len(want_grads)
    for index, (got, want) in enumerate(zip(got_grads, want_grads)):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"gradient {index}: {m}")


@pytest.mark.parametrize("return_score", [False, True])
@pytest.mark.parametrize("weight_normalization", [False, True])
@pytest.mark.parametrize("activation", ["sigmoid", "Dice", "relu", "prelu", "linear"])
def test_matches_deepctr_train_mode(activation, weight_normalization, return_score):
    # Dice in train mode: both normalise over every position, padding included, so any lengths agree.
    theirs, ours = pair(att_hidden_units=(8, 4), att_activation=activation,
                        weight_normalization=weight_normalization, return_score=return_score)
    assert_same(theirs, ours, *inputs())
    for name, buf in theirs.named_buffers():
        assert torch.allclose(dict(ours.named_buffers())[name], buf, atol=1e-6), name


@pytest.mark.parametrize("weight_normalization", [False, True])
def test_dice_eval_mode_matches_deepctr(weight_normalization):
    theirs, ours = pair(att_hidden_units=(8, 4), att_activation="dice", weight_normalization=weight_normalization)
    theirs.eval()
    ours.eval()
    assert_same(theirs, ours, *inputs(lengths=[7, 1, 3, 6, 2]))


@pytest.mark.parametrize("hidden", [(80, 40), (5,), (6, 5, 4)])
def test_depths_and_default_shape(hidden):
    theirs, ours = pair(att_hidden_units=hidden)
    assert_same(theirs, ours, *inputs(batch=4, seq_len=11))


def test_length_zero_rows():
    """Raw scores: a row without history pools to zeros in both. Softmax: DeepCTR spreads the weight over the
    padding (the mean of the padding embeddings); din_kernels returns zeros (documented difference)."""
    query, keys, keys_length = inputs(lengths=[7, 0, 3, 0, 1])
    theirs, ours = pair(att_hidden_units=(8, 4))
    assert_same(theirs, ours, query, keys, keys_length)
    theirs, ours = pair(att_hidden_units=(8, 4), weight_normalization=True)
    want, got = theirs(query, keys, keys_length), ours(query, keys, keys_length)
    nonempty = keys_length[:, 0] > 0
    torch.testing.assert_close(got[nonempty], want[nonempty], atol=1e-5, rtol=1e-4)
    assert torch.equal(got[~nonempty], torch.zeros_like(got[~nonempty]))
    torch.testing.assert_close(want[1, 0], keys[1].mean(0), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("return_score", [False, True])
def test_supports_masking(return_score):
    query, keys, _ = inputs(batch=4, seq_len=6)
    prefix = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    scattered = torch.tensor([[0, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 1], [0] * 5 + [1], [1, 1, 0, 1, 0, 0]],
                             dtype=torch.bool)
    for weight_normalization in (False, True):
        theirs, ours = pair(att_hidden_units=(8, 4), supports_masking=True, return_score=return_score,
                            weight_normalization=weight_normalization)
        for mask in (prefix, scattered):
            assert_same(theirs, ours, query, keys, None, mask)
    with pytest.raises(ValueError, match="masking"):
        ours(query, keys, None)


def test_float_and_out_of_range_lengths():
    theirs, ours = pair(att_hidden_units=(8, 4))
    query, keys, _ = inputs(batch=4, seq_len=6)
    for lengths in (torch.tensor([[2.0], [2.5], [6.0], [0.2]]), torch.tensor([[9], [6], [-1], [3]])):
        assert_same(theirs, ours, query, keys, lengths)


def test_state_dict_is_interchangeable():
    ours = randomize_(AttentionSequencePoolingLayer(att_hidden_units=(8, 4), att_activation="dice",
                                                    embedding_dim=EMB))
    theirs = DeepCTRLayer(att_hidden_units=(8, 4), att_activation="dice", embedding_dim=EMB)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    assert_same(theirs, ours, *inputs())


def test_constructor_matches_deepctr():
    layer = AttentionSequencePoolingLayer(embedding_dim=4, some_deepctr_kwarg=1)
    assert [lin.out_features for lin in layer.local_att.dnn.linears] == [80, 40]
    assert layer.local_att.dnn.linears[0].weight.std() < 1e-3  # DeepCTR's init_std = 1e-4
    query, keys, keys_length = inputs(batch=3, seq_len=4)
    assert layer(query[..., :4], keys[..., :4], keys_length).shape == (3, 1, 4)
    with pytest.raises(ValueError, match="att_activation"):
        AttentionSequencePoolingLayer(att_activation="tanh")
    with pytest.raises(ValueError, match="query"):
        layer(keys[..., :4], keys[..., :4], keys_length)


@pytest.mark.parametrize("dim", [2, 3])
def test_dice_state_dict_loads_both_ways(dim):
    """DeepCTR-Torch's Dice (alpha [H] for dim 2, [H, 1] for dim 3; bn.*) and ours: one state_dict, same
    outputs in training (batch statistics) and eval (running ones), and the running statistics agree."""
    from deepctr_torch.layers.activation import Dice as DeepCTRDice

    from din_kernels.compat import Dice

    theirs, ours = DeepCTRDice(5, dim=dim), Dice(5, dim=dim)
    randomize_(theirs)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(7, 5) if dim == 2 else torch.randn(4, 6, 5)
    for training in (True, False):
        theirs.train(training)
        ours.train(training)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.bn.running_mean, theirs.bn.running_mean)
    back = DeepCTRDice(5, dim=dim)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back.eval()(x), ours.eval()(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="takes a"):
        ours(torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="dim must be 2 or 3"):
        Dice(5, dim=4)


def test_numpy_integers_are_accepted():
    np = pytest.importorskip("numpy")
    layer = AttentionSequencePoolingLayer(att_hidden_units=[np.int64(8), np.int32(4)], embedding_dim=np.int64(EMB))
    assert [lin.out_features for lin in layer.local_att.dnn.linears] == [8, 4] and layer.embedding_dim == EMB
    assert layer(*inputs()).shape == (5, 1, EMB)
    with pytest.raises(ValueError, match="embedding_dim"):
        AttentionSequencePoolingLayer(embedding_dim=True)


@pytest.mark.parametrize("module_class", [torch.nn.Tanh, torch.nn.SiLU])  # din_attention's "tanh"; composite
@pytest.mark.parametrize("weight_normalization", [False, True])
def test_module_class_activation_matches_deepctr(weight_normalization, module_class):
    theirs, ours = pair(att_hidden_units=(8, 4), att_activation=module_class,
                        weight_normalization=weight_normalization)
    assert isinstance(ours.local_att.dnn.activation_layers[0], module_class)
    assert_same(theirs, ours, *inputs())
    direct = AttentionSequencePoolingLayer(att_hidden_units=(8, 4), att_activation=module_class,
                                           weight_normalization=weight_normalization, embedding_dim=EMB)
    direct.load_state_dict(theirs.state_dict())
    assert_same(theirs, direct, *inputs(seed=1))


def test_from_deepctr_takes_a_layer_already_holding_our_dice():
    from din_kernels.compat import Dice

    theirs = randomize_(DeepCTRLayer(att_hidden_units=(8, 4), att_activation="dice", embedding_dim=EMB))
    swapped = DeepCTRLayer(att_hidden_units=(8, 4), att_activation="dice", embedding_dim=EMB)
    for index, act in enumerate(theirs.local_att.dnn.activation_layers):
        ours_dice = Dice(act.bn.num_features, dim=3)
        ours_dice.load_state_dict(act.state_dict())
        swapped.local_att.dnn.activation_layers[index] = ours_dice
    swapped.load_state_dict(theirs.state_dict())
    copy = AttentionSequencePoolingLayer.from_deepctr(swapped)
    assert copy.att_activation == "dice"
    assert_same(theirs, copy, *inputs())
