"""Local activation unit: behaviour that does not depend on the path (validation, the module, the custom op
under torch.compile and opcheck). Numerical agreement with the reference lives in test_attention_triton.py."""
import pytest
import torch

import din_kernels as dk
from din_kernels import reference
from din_kernels.testing import ATTENTION_LAUNCHERS, attention_function, attention_plan, attention_small
from din_kernels.testing import attention_small_module

from conftest import BACKENDS
from problems import Case, build


def linear_weights(dim, hidden, form="concat"):
    unit = dk.LocalActivationUnit(dim, hidden, form=form)
    return [w.detach() for w in unit.weights()]


@pytest.fixture
def args():
    """query [3, 4], keys [3, 5, 4], lengths [5, 0, 2], weights of one hidden layer of 8."""
    return build(Case(3, 5, 4, (8,), lengths=(5, 0, 2))).op_args()


# --------------------------------------------------------------------------------------------------------
# validation: a clear error naming the argument, before anything runs
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change,error,match", [
    (dict(query=torch.randn(3, 5)), ValueError, "query"),
    (dict(query=torch.randn(3, 4, dtype=torch.float64)), TypeError, "query and keys"),
    (dict(keys=torch.randn(3, 4)), ValueError, "keys"),
    (dict(keys=torch.ones(3, 5, 4, dtype=torch.int64)), TypeError, "keys"),
    (dict(query=[[0.0] * 4] * 3), TypeError, "query"),
    (dict(lengths=torch.tensor([5, 0, 6])), ValueError, "lengths"),
    (dict(lengths=torch.tensor([5, -1, 2])), ValueError, "lengths"),
    (dict(lengths=torch.tensor([5.0, 0.0, 2.0])), TypeError, "lengths"),
    (dict(lengths=torch.tensor([5, 0])), ValueError, "lengths"),
    (dict(weights="w1"), TypeError, "weights must be a sequence of tensors"),
    (dict(weights=None), TypeError, "weights must be a sequence of tensors"),
    (dict(form="inner"), ValueError, "form"),
    (dict(activation="swish"), ValueError, "activation"),
    (dict(normalize="sum"), ValueError, "normalize"),
    (dict(scale=float("nan")), ValueError, "scale"),
    (dict(eps=float("nan")), ValueError, "eps"),
    (dict(eps=-1e-8), ValueError, "eps"),
    (dict(momentum=1.5), ValueError, "momentum"),
    (dict(momentum=True), TypeError, "momentum"),
    (dict(activation="prelu"), ValueError, "alphas"),
])
def test_bad_arguments_raise(args, change, error, match):
    query, keys, lengths, weights = args
    call = dict(query=query, keys=keys, lengths=lengths, weights=weights)
    call.update(change)
    options = {k: call.pop(k) for k in list(call) if k not in ("query", "keys", "lengths", "weights")}
    with pytest.raises(error, match=match):
        dk.din_attention(call["query"], call["keys"], call["lengths"], call["weights"], **options)


@pytest.mark.parametrize("lengths", [[5, 0, 6], [5, -1, 2]])
def test_the_device_length_check_asserts_without_reading_the_lengths(args, lengths, monkeypatch):
    """``set_length_check("device")``: no host read of the lengths (a CUDA step can then be captured in a
    graph); a bad length still fails (on CPU at once, on CUDA at a later call), good ones run as before."""
    query, keys, good, weights = args
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: pytest.fail("the lengths were read on the host"))
    try:
        dk.set_length_check("device")
        assert dk.get_length_check() == "device"
        torch.testing.assert_close(dk.din_attention(query, keys, good, weights),
                                   reference.din_attention(query, keys, good, weights))
        with pytest.raises(RuntimeError):
            dk.din_attention(query, keys, torch.tensor(lengths), weights)
    finally:
        dk.set_length_check("host")
    with pytest.raises(ValueError, match="length check must be one of"):
        dk.set_length_check("never")


def test_bad_weight_shapes_raise(args):
    query, keys, lengths, weights = args
    with pytest.raises(ValueError, match=r"weights\[0\]"):
        dk.din_attention(query, keys, lengths, [weights[0][:, :7]] + weights[1:])
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        dk.din_attention(query, keys, lengths, [weights[0], weights[1][:3]] + weights[2:])
    with pytest.raises(ValueError, match="output layer"):
        dk.din_attention(query, keys, lengths, weights[:2] + [torch.randn(2, 8), torch.randn(2)])
    with pytest.raises(ValueError, match="weights must be"):
        dk.din_attention(query, keys, lengths, weights[:3])


def test_dice_eval_needs_running_statistics(args):
    query, keys, lengths, weights = args
    alphas = [torch.zeros(8)]
    with pytest.raises(ValueError, match="dice_stats"):
        dk.din_attention(query, keys, lengths, weights, activation="dice", alphas=alphas, training=False)
    with pytest.raises(ValueError, match=r"dice_stats\[0\].running_var"):
        dk.din_attention(query, keys, lengths, weights, activation="dice", alphas=alphas,
                         dice_stats=[(torch.zeros(8), torch.ones(7))])
    with pytest.raises(ValueError, match=r"alphas\[0\]"):
        dk.din_attention(query, keys, lengths, weights, activation="prelu", alphas=[torch.zeros(3)])


def test_lengths_forms_accepted(args):
    """[B, 1] lengths (DeepCTR style), int32 lengths and non-contiguous keys give the same result."""
    query, keys, lengths, weights = args
    expected = dk.din_attention(query, keys, lengths, weights)
    torch.testing.assert_close(dk.din_attention(query, keys, lengths[:, None], weights), expected)
    torch.testing.assert_close(dk.din_attention(query, keys, lengths.int(), weights), expected)
    strided = torch.randn(3, 4, 5).transpose(1, 2)  # [3, 5, 4], not contiguous
    torch.testing.assert_close(dk.din_attention(query, strided, lengths, weights),
                               dk.din_attention(query, strided.contiguous(), lengths, weights))


# --------------------------------------------------------------------------------------------------------
# return_scores and the module
# --------------------------------------------------------------------------------------------------------

def test_return_scores_are_detached_weights(backend, args):
    query, keys, lengths, weights = args
    query = query.requires_grad_(True)
    out, attn = dk.din_attention(query, keys, lengths, weights, normalize="softmax", return_scores=True)
    assert out.requires_grad and not attn.requires_grad
    assert attn.shape == (3, 5) and attn.dtype == torch.float32
    torch.testing.assert_close(attn.sum(1), torch.tensor([1.0, 0.0, 1.0]))
    assert bool((attn[2, 2:] == 0).all())


def test_module_parameters_and_forward(backend):
    unit = dk.LocalActivationUnit(6, (16, 8), activation="prelu", form="outer", normalize="softmax", scale=0.5)
    names = [n for n, _ in unit.named_parameters()]
    assert names == ["hidden.0.weight", "hidden.0.bias", "hidden.1.weight", "hidden.1.bias", "output.weight",
                     "output.bias", "prelu_alphas.0", "prelu_alphas.1"]
    assert unit.hidden[0].in_features == 2 * 6 + 36
    assert "form='outer'" in repr(unit)
    query, keys, lengths = torch.randn(2, 6), torch.randn(2, 4, 6), torch.tensor([4, 1])
    out = unit(query, keys, lengths)
    expected = reference.din_attention(query, keys, lengths, unit.weights(), form="outer", activation="prelu",
                                       normalize="softmax", scale=0.5, alphas=list(unit.prelu_alphas))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    out.sum().backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in unit.parameters())


def test_module_dice_train_updates_statistics_eval_uses_them(backend):
    unit = dk.LocalActivationUnit(4, (8,), activation="dice")
    query, keys, lengths = torch.randn(3, 4), torch.randn(3, 5, 4), torch.tensor([5, 2, 0])
    before = unit.dice[0].running_mean.clone()
    unit.train()
    unit(query, keys, lengths)
    assert not torch.equal(unit.dice[0].running_mean, before)
    unit.eval()
    moved = unit.dice[0].running_mean.clone()
    out = unit(query, keys, lengths)
    assert torch.equal(unit.dice[0].running_mean, moved)  # eval mode leaves the statistics alone
    expected = reference.din_attention(query, keys, lengths, unit.weights(), activation="dice",
                                       alphas=[unit.dice[0].alpha],
                                       dice_stats=[(unit.dice[0].running_mean, unit.dice[0].running_var)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_module_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="embedding_dim"):
        dk.LocalActivationUnit(bad)
    with pytest.raises(ValueError, match="hidden_units"):
        dk.LocalActivationUnit(4, (8, bad))


def test_module_names_a_mismatched_embedding_dim():
    unit = dk.LocalActivationUnit(8, (16,))
    with pytest.raises(ValueError, match=r"D=embedding_dim=8, got shape \(2, 5, 7\)"):
        unit(torch.randn(2, 7), torch.randn(2, 5, 7), torch.tensor([1, 2]))


# --------------------------------------------------------------------------------------------------------
# the custom op: torch.compile(fullgraph=True) and opcheck
# --------------------------------------------------------------------------------------------------------

def assert_compiled_matches_eager(compiled_unit, eager_unit):
    """One graph (fullgraph=True, aot_eager) of ``compiled_unit`` against ``eager_unit`` (the same weights, or
    the same module): the output and the query's gradient on a batch with an empty history."""
    torch._dynamo.reset()
    compiled = torch.compile(compiled_unit, fullgraph=True, backend="aot_eager")
    query = torch.randn(4, 8, requires_grad=True)
    keys, lengths = torch.randn(4, 6, 8), torch.tensor([0, 6, 2, 3])
    out = compiled(query, keys, lengths)
    out.square().sum().backward()
    grad_compiled = query.grad.clone()
    query.grad = None
    expected = eager_unit(query, keys, lengths)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad_compiled, query.grad)
    return compiled, query, keys


def test_torch_compile_fullgraph_dice_training():
    """Dice in the attention MLP in training mode compiles as one graph (the composite pass with masked batch
    statistics: the C++ op and Dice's launchers have no fake kernels for training) and gives the eager
    results (the C++ op here): outputs, gradients and the running statistics it updates."""
    eager = dk.LocalActivationUnit(8, (16, 8), activation="dice", normalize="softmax", scale=8 ** -0.5).train()
    twin = dk.LocalActivationUnit(8, (16, 8), activation="dice", normalize="softmax", scale=8 ** -0.5).train()
    twin.load_state_dict(eager.state_dict())
    compiled, query, keys = assert_compiled_matches_eager(twin, eager)
    for ours, theirs in zip(twin.dice, eager.dice):
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
        torch.testing.assert_close(ours.running_var, theirs.running_var)
        torch.testing.assert_close(ours.alpha.grad, theirs.alpha.grad)
    # no valid position: zeros out, the running statistics left as they were (the count is a traced tensor)
    before = [(d.running_mean.clone(), d.running_var.clone()) for d in twin.dice]
    assert bool((compiled(query, keys, torch.zeros(4, dtype=torch.int64)) == 0).all())
    for dice, (mean, var) in zip(twin.dice, before):
        assert torch.equal(dice.running_mean, mean) and torch.equal(dice.running_var, var)


def test_torch_compile_fullgraph_composite_path():
    """On CPU without the interpreter the op runs the composite path; it compiles as one graph."""
    previous = dk.get_backend()
    dk.set_backend("torch")
    try:
        unit = dk.LocalActivationUnit(8, (16, 8), normalize="softmax", scale=8 ** -0.5)
        assert_compiled_matches_eager(unit, unit)
    finally:
        dk.set_backend(previous)


@pytest.mark.parametrize("activation,normalize", [("sigmoid", "softmax"), ("dice", "none")])
def test_opcheck(backend, activation, normalize):
    query, keys, lengths, weights, alphas, stats = build(
        Case(2, 3, 4, (16,), lengths=(0, 3), activation=activation, normalize=normalize), seed=1, requires_grad=True)
    torch.library.opcheck(torch.ops.din_kernels.din_attention.default,
                          (query, keys, lengths, weights, alphas or [], [m for m, _ in stats or ()],
                           [v for _, v in stats or ()], 1e-8, "concat", activation, normalize, 0.5))


@pytest.mark.parametrize("activation,normalize", [("sigmoid", "none"), ("prelu", "softmax"), ("dice", "softmax")])
def test_eager_function_matches_the_custom_op(monkeypatch, backend, activation, normalize):
    """Eager calls go through DinAttentionFunction, compiled ones through the custom op: same launchers, so
    the same outputs and gradients, bit for bit."""
    monkeypatch.setattr(attention_small_module, "SMALL_POSITIONS", 0)  # not the small-problem path
    torch.manual_seed(2)  # (grad_out)
    query, keys, lengths, weights, alphas, stats = build(
        Case(3, 7, 5, (8, 4), lengths=(7, 0, 3), activation=activation, normalize=normalize), seed=2,
        requires_grad=True)
    alphas, stats = alphas or [], stats or []
    inputs = [query, keys, *weights, *alphas]
    grad_out = torch.randn(3, 5)

    out, attn = dk.din_attention(query, keys, lengths, weights, activation=activation, normalize=normalize,
                                 scale=0.5, return_scores=True, alphas=alphas or None, dice_stats=stats or None)
    grads = torch.autograd.grad(out, inputs, grad_out)
    op_out, op_attn, _ = torch.ops.din_kernels.din_attention(
        query, keys, lengths, weights, alphas, [m for m, _ in stats], [v for _, v in stats], 1e-8, "concat",
        activation, normalize, 0.5)
    op_grads = torch.autograd.grad(op_out, inputs, grad_out)
    assert torch.equal(out, op_out) and torch.equal(attn, op_attn)
    assert not attn.requires_grad
    for grad, op_grad in zip(grads, op_grads):
        assert torch.equal(grad, op_grad)


def test_activations_kept_only_when_a_backward_follows(monkeypatch):
    """Inference (no_grad, or inputs without grad) keeps nothing for a backward that never comes; training
    keeps the composite forward's activations in the autograd context."""
    monkeypatch.setattr(attention_small_module, "SMALL_POSITIONS", 0)  # not the small-problem path
    previous = dk.get_backend()
    dk.set_backend("torch")
    calls = []
    forward = ATTENTION_LAUNCHERS["composite"][0]

    def spy(*args, kept=None, **options):
        calls.append(kept)
        return forward(*args, kept=kept, **options)

    monkeypatch.setattr(attention_plan, "attention_torch_forward", spy)
    try:
        unit = dk.LocalActivationUnit(6, (8, 4))
        query, keys, lengths = torch.randn(3, 6), torch.randn(3, 5, 6), torch.tensor([5, 2, 0])
        with torch.no_grad():
            unit(query, keys, lengths)
        unit.requires_grad_(False)
        unit(query, keys, lengths)
        unit.requires_grad_(True)
        out = unit(query, keys, lengths)
        assert calls[0] is None and calls[1] is None
        assert calls[2] is not None and len(calls[2]) == 1  # one chunk, kept
        out.sum().backward()
        assert all(p.grad is not None for p in unit.parameters())
    finally:
        dk.set_backend(previous)


def test_small_problems_take_the_autograd_path(monkeypatch):
    """On the composite path, eager calls with B x T <= SMALL_POSITIONS run attention_torch_small (autograd,
    no chunks); larger ones DinAttentionFunction; the Triton path never the small one."""
    used = []
    small = attention_small

    def spy(*args, **options):
        used.append(args[1].shape)
        return small(*args, **options)

    monkeypatch.setattr(attention_function, "attention_torch_small", spy)
    monkeypatch.setattr(attention_small_module, "SMALL_POSITIONS", 12)
    previous = dk.get_backend()
    try:
        unit = dk.LocalActivationUnit(4, (8,), normalize="softmax")
        for backend in ("torch", "triton"):
            dk.set_backend(backend)
            for batch, seq_len in ((3, 4), (3, 5)):  # 12 positions: small; 15: not
                query, keys = torch.randn(batch, 4, requires_grad=True), torch.randn(batch, seq_len, 4)
                out, attn = unit(query, keys, torch.tensor([seq_len, 0, 2]), return_scores=True)
                expected = reference.din_attention(query, keys, torch.tensor([seq_len, 0, 2]), unit.weights(),
                                                   normalize="softmax")
                torch.testing.assert_close(out, expected)
                assert not attn.requires_grad
                out.sum().backward()
        assert used == [torch.Size([3, 4, 4])]
    finally:
        dk.set_backend(previous)


def test_one_plan_per_eager_call_kept_for_the_backward(monkeypatch):
    """The eager forward + backward decides its path once; the backward reuses the forward's plan."""
    made = []
    original = attention_function.plan_attention

    def counting(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(attention_function, "plan_attention", counting)
    unit = dk.LocalActivationUnit(4, (8,))
    query, keys = torch.randn(40, 4, requires_grad=True), torch.randn(40, 130, 4)
    unit(query, keys, torch.randint(0, 131, (40,))).sum().backward()
    assert len(made) == 1 and made[0].path in ("triton", "cpp", "composite")
    assert query.grad is not None


@pytest.mark.parametrize("backend_name", [b for b in BACKENDS if b != "triton"])  # (triton: CPU tensors here)
def test_explain_names_the_path_and_why(backend_name):
    path = {"torch": "composite", "cpp": "cpp"}[backend_name]
    weights = linear_weights(4, (8,))
    query, keys, lengths = torch.randn(40, 4), torch.randn(40, 130, 4), torch.randint(0, 131, (40,))
    previous = dk.get_backend()
    try:
        dk.set_backend(backend_name)
        text = dk.explain(query, keys, lengths, weights)
        assert text.startswith(path + ": ")
        small = dk.explain(query[:2], keys[:2, :3], lengths[:2].clamp(max=3), weights)
        assert small.startswith("composite-small: " if backend_name == "torch" else "cpp: ")
        assert "backend 'torch'" in text if backend_name == "torch" else "C++" in text
        unit = dk.LocalActivationUnit(4, (8,), activation="dice").train()
        dice = dict(activation="dice", alphas=[d.alpha for d in unit.dice], training=True)
        explained = dk.explain(query, keys, lengths, unit.weights(), **dice)
        assert explained.startswith("composite-autograd: Dice in training mode" if backend_name == "torch" else
                                    "cpp: the C++ CPU op, Dice in training mode")
        # several candidates per history: Dice's statistics span every candidate row, on the composite pass
        several = dk.explain(torch.randn(40, 3, 4), keys, lengths, unit.weights(), **dice)
        assert several.startswith("composite-autograd: Dice in training mode")
    finally:
        dk.set_backend(previous)
    with pytest.raises(ValueError, match="lengths"):
        dk.explain(query, keys, torch.full((40,), 131), weights)


def test_each_call_logs_its_plan_at_debug_level(caplog):
    weights = linear_weights(4, (8,))
    with caplog.at_level("DEBUG", logger="din_kernels"):
        dk.din_attention(torch.randn(3, 4), torch.randn(3, 5, 4), torch.tensor([5, 0, 2]), weights)
    assert any("din_attention B=3 C=1 T=5 D=4:" in record.getMessage() for record in caplog.records)


def test_dice_training_never_runs_the_reference(monkeypatch):
    """Eager Dice training runs the composite autograd pass (din_kernels.dice over the valid positions),
    not reference.din_attention (whose results it matches: test_attention_triton.py)."""
    monkeypatch.setattr(reference, "din_attention", lambda *a, **k: pytest.fail("the reference ran"))
    unit = dk.LocalActivationUnit(4, (8, 6), activation="dice").train()
    query = torch.randn(5, 4, requires_grad=True)
    unit(query, torch.randn(5, 7, 4), torch.tensor([7, 0, 3, 1, 5])).sum().backward()
    assert query.grad is not None and unit.dice[0].alpha.grad is not None
    assert not torch.equal(unit.dice[0].running_mean, torch.zeros(8))
